// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// AVX2 + FMA + F16C kernel. Compiled with those flags in its own translation
// unit and only called after a run-time CPUID check (see qmm_cpu.cpp).
//
// Idea: 8 packed words of one weight row form a "block" (8 * 32/bits
// elements). One 256-bit load holds the block; element j of every word is
// extracted into the 8 lanes at once with a shift and a mask at a byte
// boundary, converted to float and multiplied with activations that were
// permuted to match (lane w, element j  <->  x[w * 32/bits + j]). Masking at
// bit 8*i instead of shifting down multiplies q by 2^(8*i); the packed
// activations carry the inverse power of two, which is exact. Per group:
//   out += scale * sum(q * x) + bias * sum(x)
// so the bias costs one dot product with the per-group sums of x.
#include <immintrin.h>

#include <algorithm>

#include "kernel.h"

namespace mlx_ray::qmm {

namespace {

inline float load1(const char* p, DT t) {
  if (t == DT::f16) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
  }
  return load_f(p, t);
}

inline void store1(void* out, int64_t i, DT t, float v) {
  if (t == DT::f16) {
    static_cast<uint16_t*>(out)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
  } else {
    store_f(out, i, t, v);
  }
}

template <DT T>
inline __m256 load8(const char* p) {
  if constexpr (T == DT::f32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else if constexpr (T == DT::bf16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

template <DT T>
inline float load_scalar(const char* p) {
  if constexpr (T == DT::f32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  } else if constexpr (T == DT::bf16) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return bf16_to_f32(h);
  } else {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Power-of-two factor carried by packed activation j (see file comment).
inline float act_factor(int bits, int j) {
  const int per = 8 / bits;  // elements per byte
  const int i = j / per;
  if (bits == 8 && i == 3) return 1.f;  // top byte is shifted down instead
  return 1.f / float(1u << (8 * i));
}

struct Geometry {
  int epw, E, Kw, nfull, tail, nblk, gw;
  __m256i tailmask;
  explicit Geometry(const Problem& p) {
    epw = 32 / p.bits;
    E = 8 * epw;
    Kw = p.K / epw;
    nfull = Kw / 8;
    tail = Kw % 8;
    nblk = nfull + (tail ? 1 : 0);
    gw = p.group_size / epw;
    alignas(32) int32_t m[8];
    for (int i = 0; i < 8; ++i) m[i] = i < tail ? -1 : 0;
    tailmask = _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
  }
};

// out[m : m+MR, n : n+NR]
template <int B, DT SB, int NR, int MR>
inline void tile(const Problem& p, const Geometry& geo, int n, int m) {
  constexpr int per = 8 / B;
  constexpr int EPW = 32 / B;
  constexpr int E = 8 * EPW;
  constexpr int SBS = SB == DT::f32 ? 4 : 2;
  __m256 acc[MR][NR], tot[MR][NR];
  for (int a = 0; a < MR; ++a)
    for (int r = 0; r < NR; ++r) acc[a][r] = tot[a][r] = _mm256_setzero_ps();
  const uint32_t* wr[NR];
  for (int r = 0; r < NR; ++r) wr[r] = p.w + int64_t(n + r) * p.w_ld;
  const float* xr[MR];
  for (int a = 0; a < MR; ++a) xr[a] = p.xp + int64_t(m + a) * p.Kp;
  auto scale_at = [&](int r, int g) {
    return load_scalar<SB>(p.scales + (int64_t(n + r) * p.sb_ld0 + int64_t(g) * p.sb_ld1) * SBS);
  };

  for (int b = 0; b < geo.nblk; ++b) {
    __m256i v[NR];
    if (b < geo.nfull) {
      for (int r = 0; r < NR; ++r) v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r] + 8 * b));
    } else {
      for (int r = 0; r < NR; ++r)
        v[r] = _mm256_maskload_epi32(reinterpret_cast<const int*>(wr[r] + 8 * b), geo.tailmask);
    }
#pragma GCC unroll 16
    for (int j = 0; j < EPW; ++j) {
      const int i = j / per, t = j % per;
      __m256 q[NR];
      for (int r = 0; r < NR; ++r) {
        __m256i e;
        if (B == 8 && i == 3) {
          e = _mm256_srli_epi32(v[r], 24);
        } else {
          __m256i sh = t ? _mm256_srli_epi32(v[r], B * t) : v[r];
          e = _mm256_and_si256(sh, _mm256_set1_epi32(((1 << B) - 1) << (8 * i)));
        }
        q[r] = _mm256_cvtepi32_ps(e);
      }
      for (int a = 0; a < MR; ++a) {
        const __m256 xv = _mm256_load_ps(xr[a] + int64_t(b) * E + 8 * j);
        for (int r = 0; r < NR; ++r) acc[a][r] = _mm256_fmadd_ps(q[r], xv, acc[a][r]);
      }
    }
    if (geo.gw >= 8) {  // whole blocks per group: scale once per group
      if ((8 * (b + 1)) % geo.gw == 0 || b == geo.nblk - 1) {
        const int g = (8 * b) / geo.gw;
        for (int r = 0; r < NR; ++r) {
          const __m256 s = _mm256_set1_ps(scale_at(r, g));
          for (int a = 0; a < MR; ++a) {
            tot[a][r] = _mm256_fmadd_ps(acc[a][r], s, tot[a][r]);
            acc[a][r] = _mm256_setzero_ps();
          }
        }
      }
    } else {  // 2 or 4 groups inside a block: per-lane scales
      for (int r = 0; r < NR; ++r) {
        alignas(32) float sv[8];
        for (int w = 0; w < 8; ++w) sv[w] = scale_at(r, std::min((8 * b + w) / geo.gw, p.G - 1));
        const __m256 s = _mm256_load_ps(sv);
        for (int a = 0; a < MR; ++a) {
          tot[a][r] = _mm256_fmadd_ps(acc[a][r], s, tot[a][r]);
          acc[a][r] = _mm256_setzero_ps();
        }
      }
    }
  }
  // Epilogue: horizontal sums plus the bias term sum_g bias[g] * xsum[g].
  for (int r = 0; r < NR; ++r) {
    const char* brow = p.biases + int64_t(n + r) * p.sb_ld0 * SBS;
    for (int a = 0; a < MR; ++a) {
      const float* xs = p.xsum + int64_t(m + a) * p.G;
      float bias_dot = 0.f;
      int g = 0;
      if (p.sb_ld1 == 1) {
        __m256 bv = _mm256_setzero_ps();
        for (; g + 8 <= p.G; g += 8) bv = _mm256_fmadd_ps(load8<SB>(brow + int64_t(g) * SBS), _mm256_loadu_ps(xs + g), bv);
        bias_dot = hsum(bv);
      }
      for (; g < p.G; ++g) bias_dot += load_scalar<SB>(brow + int64_t(g) * p.sb_ld1 * SBS) * xs[g];
      store1(p.out, int64_t(m + a) * p.N + n + r, p.out_dt, hsum(tot[a][r]) + bias_dot);
    }
  }
}

template <int B, DT SB, int NR>
inline void column(const Problem& p, const Geometry& geo, int n, int m0, int m1) {
  constexpr int MR = 4;
  int m = m0;
  for (; m + MR <= m1; m += MR) tile<B, SB, NR, MR>(p, geo, n, m);
  switch (m1 - m) {
    case 3:
      tile<B, SB, NR, 3>(p, geo, n, m);
      break;
    case 2:
      tile<B, SB, NR, 2>(p, geo, n, m);
      break;
    case 1:
      tile<B, SB, NR, 1>(p, geo, n, m);
      break;
    default:
      break;
  }
}

template <int B, DT SB>
void rows_impl(const Problem& p, int n0, int n1, int m0, int m1) {
  const Geometry geo(p);
  // Keep a chunk of packed activations (~1 MiB) hot in L2 while sweeping N.
  const int mc = std::max<int>(4, int((1 << 20) / (p.Kp * 4)) / 4 * 4);
  for (int c0 = m0; c0 < m1; c0 += mc) {
    const int c1 = std::min(m1, c0 + mc);
    int n = n0;
    if (c1 - c0 == 1) {
      for (; n + 4 <= n1; n += 4) tile<B, SB, 4, 1>(p, geo, n, c0);
    }
    for (; n + 2 <= n1; n += 2) column<B, SB, 2>(p, geo, n, c0, c1);
    for (; n < n1; ++n) column<B, SB, 1>(p, geo, n, c0, c1);
  }
}

template <int B>
void rows_bits(const Problem& p, int n0, int n1, int m0, int m1) {
  switch (p.sb_dt) {
    case DT::f32:
      return rows_impl<B, DT::f32>(p, n0, n1, m0, m1);
    case DT::bf16:
      return rows_impl<B, DT::bf16>(p, n0, n1, m0, m1);
    default:
      return rows_impl<B, DT::f16>(p, n0, n1, m0, m1);
  }
}

}  // namespace

int64_t padded_k_avx2(const Problem& p) {
  const int epw = 32 / p.bits, E = 8 * epw;
  const int Kw = p.K / epw;
  return int64_t((Kw + 7) / 8) * E;
}

void pack_avx2(const XView& x, const Problem& p, float* xp, float* xsum, int m0, int m1) {
  const int epw = 32 / p.bits, E = 8 * epw;
  const int64_t isz = dt_size(x.dt);
  float fac[32];
  for (int j = 0; j < epw; ++j) fac[j] = act_factor(p.bits, j);
  // One plain row at a time, then permuted into blocks.
  float* plain = new float[p.Kp];
  for (int m = m0; m < m1; ++m) {
    const char* src = x.base + x.row_off[m] * isz;
    int k = 0;
    if (x.stride_k == 1) {
      for (; k + 8 <= p.K; k += 8) {
        __m256 v = x.dt == DT::f32 ? load8<DT::f32>(src + k * 4)
            : x.dt == DT::bf16     ? load8<DT::bf16>(src + k * 2)
                                   : load8<DT::f16>(src + k * 2);
        _mm256_storeu_ps(plain + k, v);
      }
    }
    for (; k < p.K; ++k) plain[k] = load1(src + k * x.stride_k * isz, x.dt);
    for (; k < p.Kp; ++k) plain[k] = 0.f;
    float* dst = xp + int64_t(m) * p.Kp;
    for (int64_t b = 0; b < p.Kp / E; ++b) {
      const float* s = plain + b * E;
      float* d = dst + b * E;
      for (int j = 0; j < epw; ++j)
        for (int w = 0; w < 8; ++w) d[8 * j + w] = s[w * epw + j] * fac[j];
    }
    for (int g = 0; g < p.G; ++g) {
      float acc = 0.f;
      for (int kk = g * p.group_size; kk < (g + 1) * p.group_size; ++kk) acc += plain[kk];
      xsum[int64_t(m) * p.G + g] = acc;
    }
  }
  delete[] plain;
}

void rows_avx2(const Problem& p, int n0, int n1, int m0, int m1) {
  switch (p.bits) {
    case 2:
      return rows_bits<2>(p, n0, n1, m0, m1);
    case 4:
      return rows_bits<4>(p, n0, n1, m0, m1);
    default:
      return rows_bits<8>(p, n0, n1, m0, m1);
  }
}

}  // namespace mlx_ray::qmm
