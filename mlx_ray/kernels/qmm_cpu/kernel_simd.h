// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The SIMD kernel, written once over a vector-traits type `V` and included by
// one translation unit per ISA (kernel_avx2.cpp, kernel_avx512.cpp), each
// compiled with its own -m flags and only called after a run-time CPUID check.
//
// Idea: V::L packed words of one weight row form a "block" (L * 32/bits
// elements). One vector load holds the block; element j of every word is
// extracted into the L lanes at once with a shift and a mask at a byte
// boundary, converted to float and multiplied with activations that were
// permuted to match (lane w, element j  <->  x[w * 32/bits + j]). Masking at
// bit 8*i instead of shifting down multiplies q by 2^(8*i); the packed
// activations carry the inverse power of two, which is exact. Per group:
//   out += scale * sum(q * x) + bias * sum(x)
// so the bias costs one dot product with the per-group sums of x.
//
// Include only after defining the traits struct; everything here is in an
// anonymous namespace of the including TU.
#pragma once

#include <algorithm>

#include "kernel.h"

namespace mlx_ray::qmm {
namespace {

// Power-of-two factor carried by packed activation j (see file comment).
inline float act_factor(int bits, int j) {
  const int per = 8 / bits;  // elements per byte
  const int i = j / per;
  if (bits == 8 && i == 3) return 1.f;  // the top byte is shifted down instead
  return 1.f / float(1u << (8 * i));
}

template <class V>
struct Geometry {
  int E, nfull, tail, nblk, gw;
  typename V::I lane_group;  // lane -> group offset inside a block (when gw < L)
  explicit Geometry(const Problem& p) {
    const int epw = 32 / p.bits;
    E = V::L * epw;
    const int Kw = p.K / epw;
    nfull = Kw / V::L;
    tail = Kw % V::L;
    nblk = nfull + (tail ? 1 : 0);
    gw = p.group_size / epw;  // words per group
    alignas(64) int32_t idx[V::L];
    for (int w = 0; w < V::L; ++w) idx[w] = gw < V::L ? w / gw : 0;
    lane_group = V::load_words(reinterpret_cast<const uint32_t*>(idx));
  }
};

template <class V>
int64_t padded_k(const Problem& p) {
  const int epw = 32 / p.bits;
  const int Kw = p.K / epw;
  return int64_t((Kw + V::L - 1) / V::L) * V::L * epw;
}

// out[m : m+MR, n : n+NR]
template <class V, int B, DT SB, int NR, int MR>
inline void tile(const Problem& p, const Geometry<V>& geo, int n, int m) {
  using F = typename V::F;
  using I = typename V::I;
  constexpr int L = V::L;
  constexpr int per = 8 / B;
  constexpr int EPW = 32 / B;
  constexpr int E = L * EPW;
  constexpr int SBS = SB == DT::f32 ? 4 : 2;
  F acc[MR][NR], tot[MR][NR];
  for (int a = 0; a < MR; ++a)
    for (int r = 0; r < NR; ++r) acc[a][r] = tot[a][r] = V::zero();
  const uint32_t* wr[NR];
  for (int r = 0; r < NR; ++r) wr[r] = p.w + int64_t(n + r) * p.w_ld;
  const float* xr[MR];
  for (int a = 0; a < MR; ++a) xr[a] = p.xp + int64_t(m + a) * p.Kp;
  auto scale_at = [&](int r, int g) {
    return V::template load_scalar<SB>(p.scales + (int64_t(n + r) * p.sb_ld0 + int64_t(g) * p.sb_ld1) * SBS);
  };

  for (int b = 0; b < geo.nblk; ++b) {
    I v[NR];
    if (b < geo.nfull) {
      for (int r = 0; r < NR; ++r) v[r] = V::load_words(wr[r] + L * b);
    } else {
      for (int r = 0; r < NR; ++r) v[r] = V::load_words_partial(wr[r] + L * b, geo.tail);
    }
#pragma GCC unroll 16
    for (int j = 0; j < EPW; ++j) {
      const int i = j / per, t = j % per;
      F q[NR];
      for (int r = 0; r < NR; ++r) {
        I e;
        if (B == 8 && i == 3) {
          e = V::srl(v[r], 24);
        } else {
          e = V::and_mask(t ? V::srl(v[r], B * t) : v[r], ((1u << B) - 1u) << (8 * i));
        }
        q[r] = V::cvt(e);
      }
      for (int a = 0; a < MR; ++a) {
        const F xv = V::load(xr[a] + int64_t(b) * E + L * j);
        for (int r = 0; r < NR; ++r) acc[a][r] = V::fmadd(q[r], xv, acc[a][r]);
      }
    }
    if (geo.gw >= L) {  // whole blocks per group: scale once per group
      if ((L * (b + 1)) % geo.gw == 0 || b == geo.nblk - 1) {
        const int g = (L * b) / geo.gw;
        for (int r = 0; r < NR; ++r) {
          const F s = V::set1(scale_at(r, g));
          for (int a = 0; a < MR; ++a) {
            tot[a][r] = V::fmadd(acc[a][r], s, tot[a][r]);
            acc[a][r] = V::zero();
          }
        }
      }
    } else {  // several groups inside a block: per-lane scales
      const int g0 = (L * b) / geo.gw, ng = L / geo.gw;
      const bool direct = p.sb_ld1 == 1 && g0 + ng <= p.G;
      for (int r = 0; r < NR; ++r) {
        F s;
        if (direct) {  // register-only: a small store then a wide load would stall
          s = V::permute(V::template load_n<SB>(p.scales + (int64_t(n + r) * p.sb_ld0 + g0) * SBS, ng),
                         geo.lane_group);
        } else {
          alignas(64) float sv[L];
          for (int g = 0; g < ng; ++g) sv[g] = scale_at(r, std::min(g0 + g, p.G - 1));
          s = V::permute(V::load(sv), geo.lane_group);
        }
        for (int a = 0; a < MR; ++a) {
          tot[a][r] = V::fmadd(acc[a][r], s, tot[a][r]);
          acc[a][r] = V::zero();
        }
      }
    }
  }
  // Epilogue: horizontal sums plus the bias term sum_g bias[g] * xsum[g].
  for (int r = 0; r < NR; ++r) {
    const char* brow = p.biases + int64_t(n + r) * p.sb_ld0 * SBS;
    for (int a = 0; a < MR; ++a) {
      const float* xs = p.xsum + int64_t(m + a) * p.G;
      // Vector bias dot over the groups (masked tail), then one horizontal sum.
      F sum = tot[a][r];
      if (p.sb_ld1 == 1) {
        int g = 0;
        for (; g + L <= p.G; g += L) sum = V::fmadd(V::template load_dt<SB>(brow + int64_t(g) * SBS), V::loadu(xs + g), sum);
        if (g < p.G) sum = V::fmadd(V::template load_n<SB>(brow + int64_t(g) * SBS, p.G - g), V::loadu_n(xs + g, p.G - g), sum);
      } else {
        float bias_dot = 0.f;
        for (int g = 0; g < p.G; ++g) bias_dot += V::template load_scalar<SB>(brow + int64_t(g) * p.sb_ld1 * SBS) * xs[g];
        sum = V::add_first(sum, bias_dot);
      }
      V::store_out(p.out, int64_t(m + a) * p.N + n + r, p.out_dt, V::hsum(sum));
    }
  }
}

template <class V, int B, DT SB, int NR>
inline void column(const Problem& p, const Geometry<V>& geo, int n, int m0, int m1) {
  constexpr int MR = V::MR;
  int m = m0;
  for (; m + MR <= m1; m += MR) tile<V, B, SB, NR, MR>(p, geo, n, m);
  const int rest = m1 - m;
  if (rest >= 3 && MR > 3) {
    tile<V, B, SB, NR, (MR > 3 ? 3 : 1)>(p, geo, n, m);
    m += 3;
  } else if (rest == 2 && MR > 2) {
    tile<V, B, SB, NR, (MR > 2 ? 2 : 1)>(p, geo, n, m);
    m += 2;
  }
  for (; m < m1; ++m) tile<V, B, SB, NR, 1>(p, geo, n, m);
}

template <class V, int B, DT SB>
void rows_impl(const Problem& p, int n0, int n1, int m0, int m1) {
  const Geometry<V> geo(p);
  // Keep a chunk of packed activations (~1 MiB) hot in L2 while sweeping N.
  const int mc = std::max<int>(V::MR, int((1 << 20) / (p.Kp * 4)) / V::MR * V::MR);
  for (int c0 = m0; c0 < m1; c0 += mc) {
    const int c1 = std::min(m1, c0 + mc);
    int n = n0;
    if (c1 - c0 == 1) {
      for (; n + V::NR1 <= n1; n += V::NR1) tile<V, B, SB, V::NR1, 1>(p, geo, n, c0);
    }
    for (; n + V::NR <= n1; n += V::NR) column<V, B, SB, V::NR>(p, geo, n, c0, c1);
    for (; n < n1; ++n) column<V, B, SB, 1>(p, geo, n, c0, c1);
  }
}

template <class V, int B>
void rows_bits(const Problem& p, int n0, int n1, int m0, int m1) {
  switch (p.sb_dt) {
    case DT::f32:
      return rows_impl<V, B, DT::f32>(p, n0, n1, m0, m1);
    case DT::bf16:
      return rows_impl<V, B, DT::bf16>(p, n0, n1, m0, m1);
    default:
      return rows_impl<V, B, DT::f16>(p, n0, n1, m0, m1);
  }
}

template <class V>
void rows(const Problem& p, int n0, int n1, int m0, int m1) {
  switch (p.bits) {
    case 2:
      return rows_bits<V, 2>(p, n0, n1, m0, m1);
    case 4:
      return rows_bits<V, 4>(p, n0, n1, m0, m1);
    default:
      return rows_bits<V, 8>(p, n0, n1, m0, m1);
  }
}

template <class V>
void pack(const XView& x, const Problem& p, float* xp, float* xsum, int m0, int m1) {
  const int epw = 32 / p.bits, E = V::L * epw;
  const int64_t isz = dt_size(x.dt);
  float fac[32];
  for (int j = 0; j < epw; ++j) fac[j] = act_factor(p.bits, j);
  // One plain row at a time, then permuted into blocks.
  float* plain = new float[p.Kp];
  for (int m = m0; m < m1; ++m) {
    const char* src = x.base + x.row_off[m] * isz;
    int k = 0;
    if (x.stride_k == 1) {
      for (; k + V::L <= p.K; k += V::L) {
        typename V::F v = x.dt == DT::f32 ? V::template load_dt<DT::f32>(src + k * 4)
            : x.dt == DT::bf16            ? V::template load_dt<DT::bf16>(src + k * 2)
                                          : V::template load_dt<DT::f16>(src + k * 2);
        V::storeu(plain + k, v);
      }
    }
    for (; k < p.K; ++k) plain[k] = V::load_any(src + k * x.stride_k * isz, x.dt);
    for (; k < p.Kp; ++k) plain[k] = 0.f;
    float* dst = xp + int64_t(m) * p.Kp;
    for (int64_t b = 0; b < p.Kp / E; ++b) {
      const float* s = plain + b * E;
      float* d = dst + b * E;
      for (int j = 0; j < epw; ++j)
        for (int w = 0; w < V::L; ++w) d[V::L * j + w] = s[w * epw + j] * fac[j];
    }
    for (int g = 0; g < p.G; ++g) {
      float acc = 0.f;
      for (int kk = g * p.group_size; kk < (g + 1) * p.group_size; ++kk) acc += plain[kk];
      xsum[int64_t(m) * p.G + g] = acc;
    }
  }
  delete[] plain;
}

}  // namespace
}  // namespace mlx_ray::qmm

// The exported entry points of one ISA's translation unit (declared in kernel.h).
#define MLX_RAY_KERNEL_ENTRY_POINTS(suffix, Traits)                                              \
  namespace mlx_ray::qmm {                                                                       \
  int64_t padded_k_##suffix(const Problem& p) {                                                  \
    return padded_k<Traits>(p);                                                                  \
  }                                                                                              \
  void pack_##suffix(const XView& x, const Problem& p, float* xp, float* xsum, int m0, int m1) { \
    pack<Traits>(x, p, xp, xsum, m0, m1);                                                        \
  }                                                                                              \
  void rows_##suffix(const Problem& p, int n0, int n1, int m0, int m1) {                         \
    rows<Traits>(p, n0, n1, m0, m1);                                                             \
  }                                                                                              \
  }
