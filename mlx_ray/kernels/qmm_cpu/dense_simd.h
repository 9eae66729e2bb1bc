// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The dense small-M kernel: out = x @ w.T with float weights (f32/bf16/f16),
// x already packed to contiguous float32 rows. Written once over the same
// vector traits as the quantized kernel (kernel_simd.h) and instantiated per
// ISA by MLX_RAY_DENSE_ENTRY_POINTS.
//
// Why it exists: for decode-sized M, OpenBLAS's sgemm (what MLX's CPU matmul
// calls) packs the whole weight matrix on every call, so a weight streams
// through memory about three times (perf: sgemm_incopy is the top symbol of a
// batch-16 decode step, ahead of the multiply). Here every weight row is read
// once from memory and multiplied with all M activation rows while it sits in
// L1 (tiles of NR weight rows x MR activation rows, one accumulator each).
//
// Batch invariance: each output element is one accumulator that walks K in
// the same order (full vectors, then one masked tail vector, then a horizontal
// sum), whatever M, the tile it falls in, or the thread that computes it. A
// row's result is thus bit-identical alone or in a batch.
#pragma once

#include <algorithm>

#include "kernel.h"

namespace mlx_ray::qmm {
namespace {

template <class V, DT WT, int NR, int MR>
inline void dense_tile(const DenseProblem& p, int n, int m) {
  using F = typename V::F;
  constexpr int L = V::L;
  constexpr int WS = WT == DT::f32 ? 4 : 2;
  F acc[MR][NR];
  for (int a = 0; a < MR; ++a)
    for (int r = 0; r < NR; ++r) acc[a][r] = V::zero();
  const char* wr[NR];
  for (int r = 0; r < NR; ++r) wr[r] = p.w + int64_t(n + r) * p.w_ld * WS;
  const float* xr[MR];
  for (int a = 0; a < MR; ++a) xr[a] = p.x + int64_t(m + a) * p.x_ld;
  int k = 0;
  for (; k + L <= p.K; k += L) {
    F w[NR];
    for (int r = 0; r < NR; ++r) w[r] = V::template load_dt<WT>(wr[r] + int64_t(k) * WS);
    for (int a = 0; a < MR; ++a) {
      const F xv = V::loadu(xr[a] + k);
      for (int r = 0; r < NR; ++r) acc[a][r] = V::fmadd(w[r], xv, acc[a][r]);
    }
  }
  if (k < p.K) {
    const int t = p.K - k;
    F w[NR];
    for (int r = 0; r < NR; ++r) w[r] = V::template load_n<WT>(wr[r] + int64_t(k) * WS, t);
    for (int a = 0; a < MR; ++a) {
      const F xv = V::loadu_n(xr[a] + k, t);
      for (int r = 0; r < NR; ++r) acc[a][r] = V::fmadd(w[r], xv, acc[a][r]);
    }
  }
  for (int a = 0; a < MR; ++a)
    for (int r = 0; r < NR; ++r) V::store_out(p.out, int64_t(m + a) * p.N + n + r, p.out_dt, V::hsum(acc[a][r]));
}

template <class V, DT WT, int NR>
inline void dense_column(const DenseProblem& p, int n, int m0, int m1) {
  constexpr int MR = V::DMR;
  int m = m0;
  for (; m + MR <= m1; m += MR) dense_tile<V, WT, NR, MR>(p, n, m);
  for (; m + 2 <= m1; m += 2) dense_tile<V, WT, NR, 2>(p, n, m);
  for (; m < m1; ++m) dense_tile<V, WT, NR, 1>(p, n, m);
}

template <class V, DT WT>
void dense_rows_impl(const DenseProblem& p, int n0, int n1) {
  // Activation rows in chunks of ~512 KiB so they stay in L2 while N is swept.
  const int mc = std::max<int>(V::DMR, int((512 << 10) / (int64_t(p.K) * 4)) / V::DMR * V::DMR);
  for (int c0 = 0; c0 < p.M; c0 += mc) {
    const int c1 = std::min(p.M, c0 + mc);
    int n = n0;
    if (c1 - c0 == 1) {
      for (; n + V::DNR1 <= n1; n += V::DNR1) dense_tile<V, WT, V::DNR1, 1>(p, n, c0);
    }
    for (; n + V::DNR <= n1; n += V::DNR) dense_column<V, WT, V::DNR>(p, n, c0, c1);
    for (; n < n1; ++n) dense_column<V, WT, 1>(p, n, c0, c1);
  }
}

template <class V>
void dense_rows(const DenseProblem& p, int n0, int n1) {
  switch (p.w_dt) {
    case DT::f32:
      return dense_rows_impl<V, DT::f32>(p, n0, n1);
    case DT::bf16:
      return dense_rows_impl<V, DT::bf16>(p, n0, n1);
    default:
      return dense_rows_impl<V, DT::f16>(p, n0, n1);
  }
}

}  // namespace
}  // namespace mlx_ray::qmm

#define MLX_RAY_DENSE_ENTRY_POINTS(suffix, Traits)                    \
  namespace mlx_ray::qmm {                                            \
  void dense_rows_##suffix(const DenseProblem& p, int n0, int n1) {   \
    dense_rows<Traits>(p, n0, n1);                                    \
  }                                                                   \
  }
