// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The CPU batched sampler (see sampler.h). Per row, with m = max logit and
// p_i = exp(l_i - m) (MLX's float32 exp), q_i = floor(p_i * 2^40) (exact integers):
//   top_p  (0 < top_p < 1): t_p = the smallest logit value v with
//          sum(q_j : l_j > v) < C, C = ceil(tp24 * sum(q) / 2^24), tp24 = ceil(top_p * 2^24);
//          this is mlx-lm's apply_top_p (drop from the bottom while the mass above is
//          >= top_p * total; keep every token tied with the threshold) in exact arithmetic.
//   top_k  (0 < k < V): t_k = the k-th largest logit value (counting ties); every
//          token tied with it is kept.
//   min_p  (0 < min_p): keep p_i >= min_p.
//   kept_i = l_i >= max(t_p, t_k) and (min_p off or p_i >= min_p); every filter is computed
//          on the full row, which equals mlx-lm's chain top_p -> min_p -> top_k (each keeps
//          an upper set of the logits, so the chain's thresholds are the full row's).
//   w_i = kept_i ? floor(exp((l_i - m) * (1 / T)) * 2^40) : 0, S = sum(w),
//   target = floor(S * u32 / 2^32), u32 = floor(u * 2^32);
//   token = the smallest i with w_0 + ... + w_i > target (inverse CDF in token-id order).
// No sort of the row (sampler_row.h): the max; for top_p, one vectorized pass computes
// p, the total and the masses above a few cut-offs of d = l - m, a second one finer
// cut-offs inside the bracket that holds t_p, and a radix select over the
// order-preserving 32-bit keys of the bracket's tokens only (11 + 11 + 10 bits);
// for top_k <= 1024, a buffer of the values above a running k-th largest
// (nth_element on it), else the same radix select over the whole row; then the
// weights per block of 64 ids and the inverse-CDF scan (blocks, then one block).
// One row per task on the kernel thread pool.
#include "sampler.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "kernel.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"
#include "sampler_core.h"
#include "thread_pool.h"

#define MLX_RAY_SAMPLER_SUFFIX base
#include "sampler_row.h"
#undef MLX_RAY_SAMPLER_SUFFIX

namespace mlx_ray {

using namespace mlx_ray::qmm;
using sampler::RowParams;
using sampler::Scratch;

namespace {

constexpr float kTwo32 = 4294967296.0f;  // 2^32
constexpr float kTwo24 = 16777216.0f;    // 2^24
constexpr float kUMax = 0x1.fffffep-1f;  // the largest float32 below 1

using RowFn = int32_t (*)(const float*, int, const RowParams&, Scratch&);
using ExpFn = void (*)(const float*, float*, int);

bool has_avx2() {
#if defined(MLX_RAY_SAMPLER_AVX2)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::atomic<bool> g_use_avx2{has_avx2()};

RowFn row_fn() {
#if defined(MLX_RAY_SAMPLER_AVX2)
  if (g_use_avx2.load()) return sampler::sample_row_avx2;
#endif
  return sampler::sample_row_base;
}

ExpFn exp_fn() {
#if defined(MLX_RAY_SAMPLER_AVX2)
  if (g_use_avx2.load()) return sampler::exp_avx2;
#endif
  return sampler::exp_base;
}

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

}  // namespace

float mlx_exp(float x) {
  float y;
  exp_fn()(&x, &y, 1);
  return y;
}

mx::array mlx_exp_array(const mx::array& x) {
  auto c = mx::flatten(mx::contiguous(mx::astype(x, mx::float32, mx::Device::cpu), false, mx::Device::cpu), mx::Device::cpu);
  mx::eval(c);
  std::vector<float> y(c.size());
  exp_fn()(c.data<float>(), y.data(), int(y.size()));
  return mx::reshape(mx::array(y.begin(), {int(y.size())}, mx::float32), x.shape(), mx::Device::cpu);
}

std::string sampler_isa() {
  return g_use_avx2.load() ? "avx2" : "base";
}

bool sampler_force_isa(const std::string& isa) {
  if (isa == "auto") {
    g_use_avx2 = has_avx2();
    return true;
  }
  if (isa == "base") {
    g_use_avx2 = false;
    return true;
  }
  if (isa == "avx2" && has_avx2()) {
    g_use_avx2 = true;
    return true;
  }
  return false;
}

namespace {

// The per-row parameters, derived exactly as the twin derives them.
RowParams row_params(float temperature, int32_t top_k, float top_p, float min_p, float u) {
  RowParams rp{};
  rp.inv_t = 1.0f / temperature;
  rp.k = top_k;
  if (top_p < 1.0f) {
    const float c = std::ceil(top_p * kTwo24);
    rp.tp24 = uint64_t(std::min(std::max(c, 1.0f), kTwo24));
  }
  rp.min_p = min_p > 0.0f ? std::min(min_p, 1.0f) : 0.0f;
  u = u >= 0.0f ? std::min(u, kUMax) : 0.0f;  // NaN -> 0
  rp.u32 = uint64_t(std::floor(u * kTwo32));
  return rp;
}

template <class T>
T elem(const mx::array& a, int64_t i) {
  return a.data<T>()[i * a.strides(0)];
}

void run_sampler(const std::vector<mx::array>& in, mx::array& out) {
  const mx::array& logits = in[0];
  const int B = int(logits.shape(0)), V = int(logits.shape(1));
  int32_t* tok = out.data<int32_t>();
  if (B == 0) return;
  const DT dt = logits.dtype() == mx::float32 ? DT::f32 : logits.dtype() == mx::float16 ? DT::f16 : DT::bf16;
  const bool direct = dt == DT::f32 && logits.strides(1) == 1;
  const RowFn fn = row_fn();
  ThreadPool::instance().parallel_for(B, [&](int b) {
    Scratch& s = scratch();
    const float* row;
    if (direct) {
      row = logits.data<float>() + int64_t(b) * logits.strides(0);
    } else {
      s.row.resize(V);
      const char* base = logits.data<char>();
      const int64_t isz = logits.itemsize();
      for (int i = 0; i < V; ++i) {
        const char* src = base + (int64_t(b) * logits.strides(0) + int64_t(i) * logits.strides(1)) * isz;
        s.row[i] = load_f(src, dt);
      }
      row = s.row.data();
    }
    const RowParams rp = row_params(elem<float>(in[1], b), elem<int32_t>(in[2], b), elem<float>(in[3], b),
                                    elem<float>(in[4], b), elem<float>(in[5], b));
    tok[b] = fn(row, V, rp, s);
  });
}

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("[mlx_ray.sampler_cpu] " + msg);
}

}  // namespace

mx::array sample(
    const mx::array& logits,
    const mx::array& temperature,
    const mx::array& top_k,
    const mx::array& top_p,
    const mx::array& min_p,
    const mx::array& uniforms,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check(stream.device.type == mx::Device::DeviceType::cpu, "runs on CPU streams only.");
  check(logits.ndim() == 2, "logits must be 2-D (B, V).");
  const auto t = logits.dtype();
  check(t == mx::float32 || t == mx::float16 || t == mx::bfloat16, "logits must be float32, float16 or bfloat16.");
  const int B = logits.shape(0);
  check(logits.shape(1) >= 1 && logits.shape(1) <= (1 << 20), "V must be in [1, 2^20].");
  auto vec = [&](const mx::array& a, mx::Dtype dt, const char* what) {
    check(a.ndim() == 1 && a.shape(0) == B, std::string(what) + " must have shape (B,).");
    return a.dtype() == dt ? a : mx::astype(a, dt, stream);
  };
  std::vector<mx::array> inputs{logits,
                                vec(temperature, mx::float32, "temperature"),
                                vec(top_k, mx::int32, "top_k"),
                                vec(top_p, mx::float32, "top_p"),
                                vec(min_p, mx::float32, "min_p"),
                                vec(uniforms, mx::float32, "uniforms")};
  return mx::array({B}, mx::int32, std::make_shared<SamplerCpu>(stream), std::move(inputs));
}

void SamplerCpu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  std::vector<mx::array> ins;
  for (auto& in : inputs) {
    enc.set_input_array(in);
    ins.push_back(mx::array::unsafe_weak_copy(in));
  }
  enc.set_output_array(out);
  enc.dispatch([ins = std::move(ins), out = mx::array::unsafe_weak_copy(out)]() mutable { run_sampler(ins, out); });
}

void SamplerCpu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mlx_ray.sampler_cpu] this primitive runs on CPU streams only.");
}

std::vector<mx::Shape> SamplerCpu::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0)}};
}

}  // namespace mlx_ray
