// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The batched sampler as an MLX primitive on CPU streams (see mlx_ray/kernels/sampler.py
// for the contract and mlx_ray/kernels/README.md for the exact semantics):
//   tokens[b] = sample(logits[b], temperature[b], top_k[b], top_p[b], min_p[b], uniforms[b])
// One row per task on the kernel thread pool; per row a few O(V) passes (max,
// exp + mass, a radix select of the top-k / top-p thresholds over the float
// keys, the kept weights, the inverse-CDF scan), never a sort of the row.
// Masses are exact integers (float32 probabilities in units of 2^-40), so the
// result is bit-identical to the pure-MLX twin whatever the summation order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlx_ray {

namespace mx = mlx::core;

// logits (B, V) float32/float16/bfloat16; temperature, top_p, min_p, uniforms (B,)
// float32; top_k (B,) int32. Returns (B,) int32. Any other stream: an error (the
// Python dispatch sends non-CPU devices to the twin or the Metal kernel).
mx::array sample(
    const mx::array& logits,
    const mx::array& temperature,
    const mx::array& top_k,
    const mx::array& top_p,
    const mx::array& min_p,
    const mx::array& uniforms,
    mx::StreamOrDevice s = {});

class SamplerCpu : public mx::UnaryPrimitive {
 public:
  explicit SamplerCpu(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxRaySamplerCpu";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

// The build of the row algorithm in use ("avx2" or "base") and a switch for tests
// ("auto", "avx2", "base"; false if this CPU cannot run it).
std::string sampler_isa();
bool sampler_force_isa(const std::string& isa);

// MLX's own CPU exp (mlx/backend/cpu/simd/math.h), bit for bit: the sampler's
// probabilities must equal mx.exp's so that it agrees exactly with the twin.
float mlx_exp(float x);
// Elementwise mlx_exp of a float32 array, evaluated now (for the test that pins it to mx.exp).
mx::array mlx_exp_array(const mx::array& x);

}  // namespace mlx_ray
