// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// A tiny fork-join pool for the kernel's parallel-for over N. Hand-written
// because MLX's CPU backend has no exported parallel-for, and decode calls
// are short (tens of microseconds): workers spin briefly before sleeping so
// that back-to-back matmuls do not pay a futex wake-up each.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_ray::qmm {

class ThreadPool {
 public:
  static ThreadPool& instance();

  // Total threads including the caller; <= 0 means "all CPUs this process may use".
  void set_num_threads(int n);
  // Never waits for a running job once the pool has started (callers hold the GIL).
  int num_threads();
  // How long idle workers spin before sleeping.
  void set_spin_us(int us) {
    spin_us_.store(us);
  }

  // Runs fn(i) for every i in [0, ntasks); the calling thread takes part.
  // Concurrent callers (several MLX streams) are serialized.
  void parallel_for(int ntasks, const std::function<void(int)>& fn);

  ~ThreadPool();

 private:
  ThreadPool() = default;
  void start(int n);
  void stop();
  void worker_loop();
  struct Job {
    const std::function<void(int)>* fn;
    int ntasks;
    std::atomic<int> next{0};
    std::atomic<int> done{0};
    std::atomic<int> refs{0};  // workers holding a pointer to this job
  };
  static void drain(Job& job);

  std::mutex call_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::atomic<int> nthreads_{0};  // written under call_mu_; read without it once started
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> quit_{false};
  std::atomic<int> spin_us_{200};
  Job* job_ = nullptr;  // guarded by mu_
};

int available_cpus();

}  // namespace mlx_ray::qmm
