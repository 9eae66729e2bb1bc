// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// What the sampler's translation units share: the per-row parameters, the
// per-thread scratch and the row function of each ISA build (sampler_row.h is
// compiled once with the baseline flags, in sampler.cpp, and once with
// -mavx2 -mfma, in sampler_avx2.cpp; both with -ffp-contract=off).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace mlx_ray::sampler {

struct RowParams {
  float inv_t;    // 1 / temperature
  int k;          // top_k (on when 0 < k < V)
  uint64_t tp24;  // ceil(top_p * 2^24), 0: top_p off
  float min_p;    // 0: off, else clamped to <= 1
  uint64_t u32;   // floor(u * 2^32)
};

struct Scratch {
  std::vector<float> row;  // the row as float32 when it is not already
  std::vector<float> p;    // exp(l - m), or exp((l - m) / T)
  std::vector<uint64_t> hist;
  std::vector<float> topk;  // small-k top_k: the candidate values
  std::vector<uint32_t> cand_k;
  std::vector<std::pair<uint32_t, uint64_t>> cand_p;
  std::vector<int32_t> kept_idx;
  std::vector<uint64_t> kept_w;
};

// The token for one row of V logits (see sampler.cpp for the semantics).
int32_t sample_row_base(const float* l, int V, const RowParams& rp, Scratch& s);
// y[i] = exp(x[i]) as MLX's CPU exp computes it.
void exp_base(const float* x, float* y, int n);
#if defined(__x86_64__) || defined(_M_X64)
#define MLX_RAY_SAMPLER_AVX2 1
int32_t sample_row_avx2(const float* l, int V, const RowParams& rp, Scratch& s);
void exp_avx2(const float* x, float* y, int n);
#endif

}  // namespace mlx_ray::sampler
