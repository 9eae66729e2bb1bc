// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// Paged attention as an MLX primitive on CPU streams (the contract is in
// mlx_ray/kernels/paged_attention.py; the pure-MLX twin there is the reference):
//   out[b, h, l] = softmax_t((scale * q[b, h, l]) . K[b, h // G, t]) @ V[b, h // G, t],
//   t = 0 ..= context_lens[b] - L + l, K/V read in place from the block pool:
//   position t of row b at slot block_tables[b, t / block_size] * block_size + t % block_size.
// Caches: float [S, Hkv, D] (the queries' dtype), or MLX affine 4/8-bit
// (packed [S, Hkv, D * bits / 32] uint32 + scales/biases [S, Hkv, D / group_size]).
// Float32 online softmax per chunk of 32 keys, segments of 256 keys merged in
// order; parallel over (row, kv head, query tile[, segment]) on the kernel thread
// pool; every query's result depends only on its own row (batch-invariant).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlx_ray {

namespace mx = mlx::core;

// queries [B, Hq, L, D] float32/float16/bfloat16, D in {64, 128}; block_tables [B, MB]
// int32; context_lens [B] int32. bits: nullopt (float cache) or 4 / 8 with the four
// scale/bias arrays. Shape/dtype mismatches throw std::invalid_argument (Python:
// ValueError). Only CPU streams. A row whose context_lens[b] is outside
// [L, MB * block_size] or whose used block-table entries are outside
// [0, num_blocks) gets NaN outputs (those values are only known at eval time).
mx::array paged_attention(
    const mx::array& queries,
    const mx::array& k_cache,
    const mx::array& v_cache,
    const mx::array& block_tables,
    const mx::array& context_lens,
    const std::optional<mx::array>& k_scales,
    const std::optional<mx::array>& k_biases,
    const std::optional<mx::array>& v_scales,
    const std::optional<mx::array>& v_biases,
    float scale,
    int block_size,
    std::optional<int> bits,
    int group_size,
    mx::StreamOrDevice s = {});

class PagedAttentionCpu : public mx::UnaryPrimitive {
 public:
  PagedAttentionCpu(mx::Stream stream, float scale, int block_size, int bits, int group_size)
      : mx::UnaryPrimitive(stream), scale_(scale), block_size_(block_size), bits_(bits), group_size_(group_size) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxRayPagedAttentionCpu";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  float scale_;
  int block_size_;
  int bits_;  // 0: float cache
  int group_size_;
};

// The build in use ("avx512", "avx2" or "scalar": the matmul kernels' ISA switch, force_isa).
std::string paged_attention_isa();

}  // namespace mlx_ray
