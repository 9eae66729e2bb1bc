// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// An MLX primitive for affine-quantized matmul on CPU streams:
//   out = x @ dequantize(w, scales, biases, group_size, bits).T
// It is queued through MLX's CPU command encoder like MLX's own ops, so it
// composes with lazy evaluation, async_eval, streams and mx.compile.
#pragma once

#include <string>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlx_ray {

namespace mx = mlx::core;

// Same contract as mx::quantized_matmul(x, w, scales, biases, transpose=true,
// group_size, bits, "affine"). On a non-CPU stream it returns MLX's own op.
mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

class QuantizedMatmulCpu : public mx::UnaryPrimitive {
 public:
  QuantizedMatmulCpu(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxRayQuantizedMatmulCpu";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int group_size_;
  int bits_;
};

// out = x @ w.T for float weights (f32/bf16/f16), float32 accumulation; for
// decode-sized M (the Python dispatch sends larger M to MLX's matmul). On a
// non-CPU stream it returns MLX's own matmul.
mx::array dense_matmul(const mx::array& x, const mx::array& w, mx::StreamOrDevice s = {});

class DenseMatmulCpu : public mx::UnaryPrimitive {
 public:
  explicit DenseMatmulCpu(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxRayDenseMatmulCpu";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};
void set_dense_max_m(int m);  // rows up to which the Python dispatch uses dense_matmul
int dense_max_m();

// Run-time configuration and introspection (exposed to Python).
std::string isa_name();                 // "avx512", "avx2" or "scalar"
bool force_isa(const std::string& isa);  // "auto", "avx512", "avx2", "scalar"; false if unsupported
std::string blas_name();                // "openblas" when a fast sgemm is loaded, else "none"
void set_blas_min_m(int m);             // rows from which dequantize+sgemm is used (<=0: never)
int blas_min_m();

}  // namespace mlx_ray
