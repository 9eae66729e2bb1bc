// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// Portable fallback: plain float activations, one dot product per group.
// Used when the CPU lacks AVX2/FMA (or when forced, for tests).
#include "kernel.h"

namespace mlx_ray::qmm {

int64_t padded_k_scalar(const Problem& p) {
  return p.K;
}

void pack_scalar(const XView& x, const Problem& p, float* xp, float* xsum, int m0, int m1) {
  const int64_t isz = dt_size(x.dt);
  for (int m = m0; m < m1; ++m) {
    const char* src = x.base + x.row_off[m] * isz;
    float* dst = xp + int64_t(m) * p.Kp;
    for (int k = 0; k < p.K; ++k) {
      dst[k] = load_f(src + k * x.stride_k * isz, x.dt);
    }
    for (int g = 0; g < p.G; ++g) {
      float s = 0.f;
      for (int k = g * p.group_size; k < (g + 1) * p.group_size; ++k) s += dst[k];
      xsum[int64_t(m) * p.G + g] = s;
    }
  }
}

void rows_scalar(const Problem& p, int n0, int n1, int m0, int m1) {
  const int epw = 32 / p.bits;
  const uint32_t mask = (1u << p.bits) - 1u;
  const int wpg = p.group_size / epw;  // words per group
  const int64_t sbs = dt_size(p.sb_dt);
  for (int n = n0; n < n1; ++n) {
    const uint32_t* wr = p.w + int64_t(n) * p.w_ld;
    for (int m = m0; m < m1; ++m) {
      const float* xr = p.xp + int64_t(m) * p.Kp;
      const float* xs = p.xsum + int64_t(m) * p.G;
      float total = 0.f;
      for (int g = 0; g < p.G; ++g) {
        const int64_t sb = int64_t(n) * p.sb_ld0 + int64_t(g) * p.sb_ld1;
        const float s = load_f(p.scales + sb * sbs, p.sb_dt);
        const float b = load_f(p.biases + sb * sbs, p.sb_dt);
        float dot = 0.f;
        for (int wi = g * wpg; wi < (g + 1) * wpg; ++wi) {
          uint32_t v = wr[wi];
          const float* xk = xr + int64_t(wi) * epw;
          for (int j = 0; j < epw; ++j, v >>= p.bits) {
            dot += float(v & mask) * xk[j];
          }
        }
        total += s * dot + b * xs[g];
      }
      store_f(p.out, int64_t(m) * p.N + n, p.out_dt, total);
    }
  }
}

void dequantize_rows(const Problem& p, float* dst, int n0, int n1) {
  const int epw = 32 / p.bits;
  const uint32_t mask = (1u << p.bits) - 1u;
  const int64_t sbs = dt_size(p.sb_dt);
  for (int n = n0; n < n1; ++n) {
    const uint32_t* wr = p.w + int64_t(n) * p.w_ld;
    float* d = dst + int64_t(n - n0) * p.K;
    for (int g = 0; g < p.G; ++g) {
      const int64_t sb = int64_t(n) * p.sb_ld0 + int64_t(g) * p.sb_ld1;
      const float s = load_f(p.scales + sb * sbs, p.sb_dt);
      const float b = load_f(p.biases + sb * sbs, p.sb_dt);
      for (int k = g * p.group_size; k < (g + 1) * p.group_size; k += epw) {
        uint32_t v = wr[k / epw];
        for (int j = 0; j < epw; ++j, v >>= p.bits) d[k + j] = float(v & mask) * s + b;
      }
    }
  }
}

}  // namespace mlx_ray::qmm

namespace mlx_ray::qmm {

// Same order as the SIMD kernels' single accumulator would give per lane is not
// attempted here; the scalar path only needs to be batch-invariant (it is:
// one sequential sum per output) and correct.
void dense_rows_scalar(const DenseProblem& p, int n0, int n1) {
  const int64_t ws = dt_size(p.w_dt);
  for (int n = n0; n < n1; ++n) {
    const char* wr = p.w + int64_t(n) * p.w_ld * ws;
    for (int m = 0; m < p.M; ++m) {
      const float* xr = p.x + int64_t(m) * p.x_ld;
      float acc = 0.f;
      for (int k = 0; k < p.K; ++k) acc += load_f(wr + k * ws, p.w_dt) * xr[k];
      store_f(p.out, int64_t(m) * p.N + n, p.out_dt, acc);
    }
  }
}

}  // namespace mlx_ray::qmm
