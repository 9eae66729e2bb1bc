// Copyright 2026 mlx-ray authors. Apache-2.0.
#include "thread_pool.h"

#include <chrono>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#define MLX_RAY_PAUSE() _mm_pause()
#else
#define MLX_RAY_PAUSE() std::this_thread::yield()
#endif

namespace mlx_ray::qmm {

int available_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  unsigned n = std::thread::hardware_concurrency();
  return n ? int(n) : 1;
}

ThreadPool& ThreadPool::instance() {
  // Leaked on purpose: joining threads during static destruction at interpreter
  // exit can deadlock.
  static ThreadPool* pool = new ThreadPool();
  return *pool;
}

ThreadPool::~ThreadPool() {
  stop();
}

int ThreadPool::num_threads() {
  // call_mu_ is held for a whole parallel_for: taking it here made a Python caller (holding the
  // GIL) wait for the kernel that MLX's CPU stream was running.
  if (int n = nthreads_.load(std::memory_order_acquire)) return n;
  std::lock_guard<std::mutex> lk(call_mu_);
  if (nthreads_ == 0) start(available_cpus());
  return nthreads_;
}

void ThreadPool::set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(call_mu_);
  if (n <= 0) n = available_cpus();
  if (n == nthreads_) return;
  stop();
  start(n);
}

void ThreadPool::start(int n) {
  quit_ = false;
  nthreads_ = n;
  for (int i = 1; i < n; ++i) workers_.emplace_back([this] { worker_loop(); });
}

void ThreadPool::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    quit_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
  nthreads_ = 0;
}

void ThreadPool::drain(Job& job) {
  for (int i = job.next.fetch_add(1); i < job.ntasks; i = job.next.fetch_add(1)) {
    (*job.fn)(i);
    job.done.fetch_add(1, std::memory_order_release);
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = generation_.load();
  for (;;) {
    // Spin for a while: the next matmul of a decode step is usually close.
    auto t0 = std::chrono::steady_clock::now();
    const auto budget = std::chrono::microseconds(spin_us_.load());
    int iter = 0;
    while (generation_.load(std::memory_order_acquire) == seen && !quit_.load()) {
      MLX_RAY_PAUSE();
      if (++iter % 64 == 0 && std::chrono::steady_clock::now() - t0 > budget) break;
    }
    Job* job = nullptr;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return quit_.load() || generation_.load() != seen; });
      if (quit_.load()) return;
      seen = generation_.load();
      job = job_;
      if (job) job->refs.fetch_add(1);
    }
    if (job) {
      drain(*job);
      job->refs.fetch_sub(1, std::memory_order_release);
    }
  }
}

void ThreadPool::parallel_for(int ntasks, const std::function<void(int)>& fn) {
  if (ntasks <= 0) return;
  std::lock_guard<std::mutex> call(call_mu_);
  if (nthreads_ == 0) start(available_cpus());
  if (ntasks == 1 || nthreads_ == 1) {
    for (int i = 0; i < ntasks; ++i) fn(i);
    return;
  }
  Job job;
  job.fn = &fn;
  job.ntasks = ntasks;
  {
    std::lock_guard<std::mutex> lk(mu_);
    job_ = &job;
    generation_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  drain(job);
  // Spin briefly for the stragglers, then yield: on an oversubscribed machine
  // a descheduled worker needs this core more than our spinning does.
  auto wait = [](auto&& ready) {
    for (int i = 0; !ready(); ++i) {
      if (i < 4096) {
        MLX_RAY_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
  };
  wait([&] { return job.done.load(std::memory_order_acquire) >= ntasks; });
  {
    std::lock_guard<std::mutex> lk(mu_);
    job_ = nullptr;
  }
  wait([&] { return job.refs.load(std::memory_order_acquire) == 0; });
}

}  // namespace mlx_ray::qmm
