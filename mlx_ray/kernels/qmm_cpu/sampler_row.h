// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The sampler's per-row algorithm (semantics: sampler.cpp). Included once per
// ISA build with MLX_RAY_SAMPLER_SUFFIX set (base, avx2); the loops are written
// branch-free where they are long so that the compiler vectorizes them, and
// every floating-point step is the IEEE operation the twin performs (the TUs
// are compiled with -ffp-contract=off; the only fused multiply-adds are MLX's
// own, in its exp polynomial).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "sampler_core.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MLX_RAY_SAMPLER_VEC 1
#endif

#ifndef MLX_RAY_SAMPLER_SUFFIX
#error "define MLX_RAY_SAMPLER_SUFFIX (base or avx2) before including sampler_row.h"
#endif
#define MLX_RAY_SAMPLER_CAT2(a, b) a##_##b
#define MLX_RAY_SAMPLER_CAT(a, b) MLX_RAY_SAMPLER_CAT2(a, b)
#define MLX_RAY_SAMPLER_FN(name) MLX_RAY_SAMPLER_CAT(name, MLX_RAY_SAMPLER_SUFFIX)

namespace mlx_ray::sampler {
namespace {

constexpr float kTwo40 = 1099511627776.0f;  // 2^40
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kB1 = 2048;      // radix level 1: key bits 31..21
constexpr int kB2 = 2048;      // level 2: bits 20..10
constexpr int kB3 = 1024;      // level 3: bits 9..0
constexpr int kSmallK = 1024;  // top_k up to this: a candidate buffer instead of the radix select

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Order-preserving key of a float (-0 counts as +0, as float comparison has it).
inline uint32_t key_of(float f) {
  f = f == 0.0f ? 0.0f : f;
  const uint32_t u = f2u(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float value_of(uint32_t k) {
  return u2f((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// mlx/backend/cpu/simd/math.h's exp, branch-free. MLX rounds x + 0.5 in double;
// for |x| < 128 (every input it does not overwrite with 0 or inf) that sum is
// exact in float too. ipart is clamped before the int conversion only where
// the result is overwritten anyway.
inline float exp1(float x_init) {
  const float x = x_init * 1.442695f;
  float ipart = std::floor(x + 0.5f);
  const float fpart = x - ipart;
  float y = 1.535336188319500e-4f;
  y = std::fma(y, fpart, 1.339887440266574e-3f);
  y = std::fma(y, fpart, 9.618437357674640e-3f);
  y = std::fma(y, fpart, 5.550332471162809e-2f);
  y = std::fma(y, fpart, 2.402264791363012e-1f);
  y = std::fma(y, fpart, 6.931472028550421e-1f);
  y = std::fma(y, fpart, 1.000000000000000f);
  ipart = ipart < -127.0f ? -127.0f : ipart;
  ipart = ipart > 127.0f ? 127.0f : ipart;
  ipart = ipart == ipart ? ipart : 0.0f;
  const uint32_t e = uint32_t(int32_t(ipart) + 127) << 23;
  float r = u2f(e) * y;
  r = x_init < -88.0f ? 0.0f : r;
  r = x_init > 88.0f ? kInf : r;
  return r;
}

#if defined(MLX_RAY_SAMPLER_VEC)
// exp1 on 8 lanes, the same IEEE operations in the same order.
inline __m256 exp8(__m256 x_init) {
  const __m256 x = _mm256_mul_ps(x_init, _mm256_set1_ps(1.442695f));
  __m256 ipart = _mm256_floor_ps(_mm256_add_ps(x, _mm256_set1_ps(0.5f)));
  const __m256 fpart = _mm256_sub_ps(x, ipart);
  __m256 y = _mm256_set1_ps(1.535336188319500e-4f);
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(1.339887440266574e-3f));
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(9.618437357674640e-3f));
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(5.550332471162809e-2f));
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(2.402264791363012e-1f));
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(6.931472028550421e-1f));
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(1.000000000000000f));
  // min/max return the second operand on NaN: ipart is then in range too (the lane is NaN anyway).
  ipart = _mm256_min_ps(_mm256_max_ps(ipart, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(ipart), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(_mm256_castsi256_ps(e), y);
  r = _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(x_init, _mm256_set1_ps(-88.0f), _CMP_LT_OQ));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(kInf), _mm256_cmp_ps(x_init, _mm256_set1_ps(88.0f), _CMP_GT_OQ));
  return r;
}
#endif

// out[i] = exp((l[i] - m) * mul); mul = 1 gives exp(l[i] - m) exactly.
void exp_shift(const float* __restrict l, float m, float mul, float* __restrict out, int n) {
  int i = 0;
#if defined(MLX_RAY_SAMPLER_VEC)
  const __m256 vm = _mm256_set1_ps(m), vmul = _mm256_set1_ps(mul);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(l + i), vm), vmul)));
#endif
  for (; i < n; ++i) out[i] = exp1((l[i] - m) * mul);
}

inline uint64_t fixed40(float p) {
  return uint64_t(int64_t(std::floor(p * kTwo40)));  // p * 2^40 is exact, and < 2^63 for p <= inf-free rows
}

float row_max(const float* __restrict l, int n) {
#if defined(MLX_RAY_SAMPLER_VEC)
  __m256 a = _mm256_set1_ps(kNegInf), b = a;
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    a = _mm256_max_ps(_mm256_loadu_ps(l + i), a);
    b = _mm256_max_ps(_mm256_loadu_ps(l + i + 8), b);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_max_ps(a, b));
  float m = kNegInf;
  for (int j = 0; j < 8; ++j) m = t[j] > m ? t[j] : m;
  for (; i < n; ++i) m = l[i] > m ? l[i] : m;
  return m;
#else
  constexpr int W = 16;
  float acc[W];
  for (int j = 0; j < W; ++j) acc[j] = kNegInf;
  int i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) acc[j] = l[i + j] > acc[j] ? l[i + j] : acc[j];
  float m = kNegInf;
  for (int j = 0; j < W; ++j) m = acc[j] > m ? acc[j] : m;
  for (; i < n; ++i) m = l[i] > m ? l[i] : m;
  return m;
#endif
}

// The highest bucket whose inclusive cumulative weight from the top reaches C;
// C becomes the weight still needed inside it.
int pick_bucket(const uint64_t* hist, int nb, uint64_t& C) {
  uint64_t acc = 0;
  for (int b = nb - 1; b >= 0; --b) {
    if (acc + hist[b] >= C) {
      C -= acc;
      return b;
    }
    acc += hist[b];
  }
  return 0;  // unreachable: C <= the total weight
}

constexpr int kMaxCuts = 8;
constexpr int kNCuts = 5;  // the first pass's cut-offs in d = l - m
constexpr float kCuts[kNCuts] = {-1.0f, -2.0f, -4.0f, -8.0f, -16.0f};

// mass[j] = sum of floor(p[i] * 2^40) over d = l[i] - m >= cuts[j] (j < ncuts <= kMaxCuts). With Exp,
// p[i] = exp(l[i] - m) is computed and stored first, and total = that sum over every token.
template <bool Exp>
void masses(const float* __restrict l, float m, float* __restrict p, int n, const float* cuts, int ncuts,
            uint64_t* mass, uint64_t* total) {
  uint64_t tot = 0;
  for (int j = 0; j < ncuts; ++j) mass[j] = 0;
  int i = 0;
#if defined(MLX_RAY_SAMPLER_VEC)
  const __m256 vm = _mm256_set1_ps(m), v40 = _mm256_set1_ps(kTwo40);
  const __m256d magic = _mm256_set1_pd(4503599627370496.0);  // 2^52: integral doubles below it, as int64 bits
  const __m256i magic_bits = _mm256_castpd_si256(magic);
  __m256i vt = _mm256_setzero_si256(), vmass[kMaxCuts];
  __m256 vcut[kMaxCuts];
  for (int j = 0; j < ncuts; ++j) {
    vmass[j] = _mm256_setzero_si256();
    vcut[j] = _mm256_set1_ps(cuts[j]);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(l + i), vm);
    __m256 e;
    if constexpr (Exp) {
      e = exp8(d);
      _mm256_storeu_ps(p + i, e);
    } else {
      e = _mm256_loadu_ps(p + i);
    }
    const __m256 f = _mm256_floor_ps(_mm256_mul_ps(e, v40));
    const __m256i qlo = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(f)), magic)), magic_bits);
    const __m256i qhi = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)), magic)), magic_bits);
    if constexpr (Exp) vt = _mm256_add_epi64(vt, _mm256_add_epi64(qlo, qhi));
    for (int j = 0; j < ncuts; ++j) {
      const __m256i c = _mm256_castps_si256(_mm256_cmp_ps(d, vcut[j], _CMP_GE_OQ));
      const __m256i clo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(c));
      const __m256i chi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(c, 1));
      vmass[j] = _mm256_add_epi64(vmass[j], _mm256_add_epi64(_mm256_and_si256(qlo, clo), _mm256_and_si256(qhi, chi)));
    }
  }
  alignas(32) uint64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), vt);
  tot = t[0] + t[1] + t[2] + t[3];
  for (int j = 0; j < ncuts; ++j) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), vmass[j]);
    mass[j] = t[0] + t[1] + t[2] + t[3];
  }
#endif
  for (; i < n; ++i) {
    const float d = l[i] - m;
    float e;
    if constexpr (Exp) {
      e = exp1(d);
      p[i] = e;
    } else {
      e = p[i];
    }
    const uint64_t q = fixed40(e);
    tot += q;
    for (int j = 0; j < ncuts; ++j) mass[j] += d >= cuts[j] ? q : 0;
  }
  if (total) *total = tot;
}

// fn(i) for every i with lo <= l[i] - m < hi, in increasing i.
template <class F>
void collect_bracket(const float* __restrict l, float m, float lo, float hi, int n, F fn) {
  int i = 0;
#if defined(MLX_RAY_SAMPLER_VEC)
  const __m256 vm = _mm256_set1_ps(m), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(l + i), vm);
    const __m256 hit = _mm256_and_ps(_mm256_cmp_ps(d, vlo, _CMP_GE_OQ), _mm256_cmp_ps(d, vhi, _CMP_LT_OQ));
    int bits = _mm256_movemask_ps(hit);
    while (bits) {
      fn(i + __builtin_ctz(unsigned(bits)));
      bits &= bits - 1;
    }
  }
#endif
  for (; i < n; ++i) {
    const float d = l[i] - m;
    if (d >= lo && d < hi) fn(i);
  }
}

// The radix select: the smallest key v over the items with weight(items with key > v) < C,
// 11 + 11 + 10 bits; each level keeps only the items of the bucket chosen above.
template <class Items, class Key, class Weight>
uint32_t select3(const Items& items, uint64_t C, std::vector<uint64_t>& hist, Key key, Weight weight) {
  hist.assign(kB1, 0);
  for (const auto& it : items) hist[key(it) >> 21] += weight(it);
  const uint32_t b1 = uint32_t(pick_bucket(hist.data(), kB1, C));
  hist.assign(kB2, 0);
  for (const auto& it : items) {
    const uint32_t k = key(it);
    if ((k >> 21) == b1) hist[(k >> 10) & (kB2 - 1)] += weight(it);
  }
  const uint32_t b2 = uint32_t(pick_bucket(hist.data(), kB2, C));
  const uint32_t pre = (b1 << 11) | b2;  // key bits 31..10
  hist.assign(kB3, 0);
  for (const auto& it : items) {
    const uint32_t k = key(it);
    if ((k >> 10) == pre) hist[k & (kB3 - 1)] += weight(it);
  }
  const uint32_t b3 = uint32_t(pick_bucket(hist.data(), kB3, C));
  return (pre << 10) | b3;
}

// The k-th largest value (counting ties), for small k: a buffer of the values
// above a running threshold (the k-th largest of what was seen, after each
// compaction). A value equal to the threshold cannot change the k-th largest,
// so only larger ones are kept. -inf when fewer than k values are finite.
float kth_largest_small(const float* __restrict l, int V, int k, std::vector<float>& buf) {
  size_t cap = size_t(std::max(4 * k, 1024));
  buf.clear();
  buf.reserve(cap + 64);
  float thr = kNegInf;
  constexpr int W = 64;
  auto compact = [&] {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<float>());
    thr = buf[k - 1];
    buf.erase(std::remove_if(buf.begin(), buf.end(), [&](float v) { return v < thr; }), buf.end());
    if (buf.size() > cap / 2) cap *= 2;  // many ties at the threshold
  };
  int i = 0;
  for (; i + W <= V; i += W) {
#if defined(MLX_RAY_SAMPLER_VEC)
    const __m256 vt = _mm256_set1_ps(thr);
    __m256 hit = _mm256_setzero_ps();
    for (int j = 0; j < W; j += 8) hit = _mm256_or_ps(hit, _mm256_cmp_ps(_mm256_loadu_ps(l + i + j), vt, _CMP_GT_OQ));
    if (_mm256_testz_ps(hit, hit)) continue;
#else
    bool any = false;
    for (int j = 0; j < W; ++j) any |= l[i + j] > thr;
    if (!any) continue;
#endif
    for (int j = 0; j < W; ++j)
      if (l[i + j] > thr) buf.push_back(l[i + j]);
    if (buf.size() > cap) compact();
  }
  for (; i < V; ++i)
    if (l[i] > thr) buf.push_back(l[i]);
  if (buf.size() < size_t(k)) return thr;  // thr is -inf here: fewer than k finite values
  std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<float>());
  return buf[k - 1];
}


constexpr int kBlock = 64;  // token ids per block of the inverse-CDF scan

struct WeightCtx {
  float m, thr, inv_t, min_p;
  bool min_p_on, have_p;
  const float* p;  // exp(l - m) per token when have_p (top_p on)
};

// One token's weight: 0 unless l >= thr and (min_p off or p >= min_p); else
// floor(exp((l - m) / T) * 2^40). Exactly the lanes of block_weight.
inline uint64_t weight1(float li, int i, const WeightCtx& c) {
  if (!(li >= c.thr)) return 0;
  const float d = li - c.m;
  if (c.min_p_on && !((c.have_p ? c.p[i] : exp1(d)) >= c.min_p)) return 0;
  return fixed40(exp1(d * c.inv_t));
}

// The sum of the weights of tokens [i0, i0 + n).
inline uint64_t block_weight(const float* __restrict l, int i0, int n, const WeightCtx& c) {
  int i = i0;
  const int end = i0 + n;
  uint64_t sum = 0;
#if defined(MLX_RAY_SAMPLER_VEC)
  const __m256 vthr = _mm256_set1_ps(c.thr), vm = _mm256_set1_ps(c.m), vt = _mm256_set1_ps(c.inv_t);
  const __m256 vmin = _mm256_set1_ps(c.min_p), v40 = _mm256_set1_ps(kTwo40);
  const __m256d magic = _mm256_set1_pd(4503599627370496.0);  // 2^52: integral doubles below it, as int64 bits
  const __m256i magic_bits = _mm256_castpd_si256(magic);
  __m256i vs = _mm256_setzero_si256();
  for (; i + 8 <= end; i += 8) {
    const __m256 x = _mm256_loadu_ps(l + i);
    __m256 keep = _mm256_cmp_ps(x, vthr, _CMP_GE_OQ);
    if (_mm256_testz_ps(keep, keep)) continue;
    const __m256 d = _mm256_sub_ps(x, vm);
    if (c.min_p_on) {
      const __m256 p = c.have_p ? _mm256_loadu_ps(c.p + i) : exp8(d);
      keep = _mm256_and_ps(keep, _mm256_cmp_ps(p, vmin, _CMP_GE_OQ));
    }
    const __m256 f = _mm256_and_ps(keep, _mm256_floor_ps(_mm256_mul_ps(exp8(_mm256_mul_ps(d, vt)), v40)));
    const __m256d lo = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(f)), magic);
    const __m256d hi = _mm256_add_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)), magic);
    vs = _mm256_add_epi64(vs, _mm256_sub_epi64(_mm256_castpd_si256(lo), magic_bits));
    vs = _mm256_add_epi64(vs, _mm256_sub_epi64(_mm256_castpd_si256(hi), magic_bits));
  }
  alignas(32) uint64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), vs);
  sum = t[0] + t[1] + t[2] + t[3];
#endif
  for (; i < end; ++i) sum += weight1(l[i], i, c);
  return sum;
}
}  // namespace

void MLX_RAY_SAMPLER_FN(exp)(const float* x, float* y, int n) {
  exp_shift(x, 0.0f, 1.0f, y, n);
}

int32_t MLX_RAY_SAMPLER_FN(sample_row)(const float* l, int V, const RowParams& rp, Scratch& s) {
  const bool top_k_on = rp.k > 0 && rp.k < V;
  const bool top_p_on = rp.tp24 > 0;
  const bool min_p_on = rp.min_p > 0.0f;

  const float m = row_max(l, V);
  if (!(m > kNegInf)) return 0;  // no finite logit: token 0, as the twin

  // top_p: the probabilities (kept in s.p), the total mass and the masses above a
  // few cut-offs of d = l - m. If the tokens with d >= hi hold less than C and those
  // with d >= lo at least C, the threshold t_p is a logit with lo <= d < hi: every
  // token above is kept (the mass above it is < C), none below is (the mass above
  // it is >= C). So a second pass narrows the bracket with finer cut-offs, and only
  // the bracket's tokens enter the radix select, with C less the mass above it.
  float thr = kNegInf;
  if (top_p_on) {
    s.p.resize(V);
    uint64_t total = 0, mass[kMaxCuts];
    masses<true>(l, m, s.p.data(), V, kCuts, kNCuts, mass, &total);
    uint64_t Cp = rp.tp24 * (total >> 24) + ((rp.tp24 * (total & 0xFFFFFFu) + 0xFFFFFFu) >> 24);
    float lo = kNegInf, hi = kInf;
    uint64_t above = 0;  // the mass of d >= hi
    for (int j = 0; j < kNCuts; ++j) {
      if (mass[j] >= Cp) {
        lo = kCuts[j];
        break;
      }
      hi = kCuts[j];
      above = mass[j];
    }
    // Finer cut-offs inside the bracket (d <= 0, and below -88 every p is 0).
    const float flo = lo == kNegInf ? std::min(-88.0f, hi) : lo, fhi = hi == kInf ? 0.0f : hi;
    if (fhi > flo) {
      float sub[kMaxCuts - 1];
      const int nsub = kMaxCuts - 1;
      for (int j = 0; j < nsub; ++j) sub[j] = fhi - (fhi - flo) * float(j + 1) / float(nsub + 1);
      uint64_t sm[kMaxCuts];
      masses<false>(l, m, s.p.data(), V, sub, nsub, sm, nullptr);
      for (int j = 0; j < nsub; ++j) {  // sub is decreasing, sm increasing
        if (sm[j] >= Cp) {
          lo = sub[j];
          break;
        }
        hi = sub[j];
        above = sm[j];
      }
    }
    s.cand_p.clear();
    collect_bracket(l, m, lo, hi, V, [&](int i) { s.cand_p.emplace_back(key_of(l[i]), fixed40(s.p[i])); });
    thr = value_of(select3(
        s.cand_p, Cp - above, s.hist, [](const std::pair<uint32_t, uint64_t>& it) { return it.first; },
        [](const std::pair<uint32_t, uint64_t>& it) { return it.second; }));
  }
  if (top_k_on) {
    float tk;
    if (rp.k <= kSmallK) {
      tk = kth_largest_small(l, V, rp.k, s.topk);
    } else {
      s.cand_k.resize(V);
      for (int i = 0; i < V; ++i) s.cand_k[i] = key_of(l[i]);
      tk = value_of(select3(s.cand_k, uint64_t(rp.k), s.hist, [](uint32_t k) { return k; },
                            [](uint32_t) { return uint64_t(1); }));
    }
    thr = tk > thr ? tk : thr;
  }

  // The weights at the temperature, summed per block of kBlock ids; then the
  // inverse CDF in token-id order: the block, then the token inside it.
  const WeightCtx wc{m, thr, rp.inv_t, rp.min_p, min_p_on, top_p_on, top_p_on ? s.p.data() : nullptr};
  const int nblk = (V + kBlock - 1) / kBlock;
  s.kept_w.resize(nblk);
  uint64_t S = 0;
  for (int b = 0; b < nblk; ++b) {
    const int i0 = b * kBlock, n = std::min(kBlock, V - i0);
    const uint64_t bs = block_weight(l, i0, n, wc);
    s.kept_w[b] = bs;
    S += bs;
  }
  if (S == 0) return 0;  // unreachable: the max token keeps weight 2^40
  const uint64_t target = (S >> 32) * rp.u32 + (((S & 0xFFFFFFFFu) * rp.u32) >> 32);
  uint64_t acc = 0;
  for (int b = 0; b < nblk; ++b) {
    if (acc + s.kept_w[b] <= target) {
      acc += s.kept_w[b];
      continue;
    }
    const int i0 = b * kBlock, n = std::min(kBlock, V - i0);
    for (int i = i0; i < i0 + n; ++i) {
      acc += weight1(l[i], i, wc);
      if (acc > target) return i;
    }
    return i0 + n - 1;  // unreachable: the block's weights sum past the target
  }
  return V - 1;  // unreachable: target < S
}

}  // namespace mlx_ray::sampler

#undef MLX_RAY_SAMPLER_FN
#undef MLX_RAY_SAMPLER_CAT
#undef MLX_RAY_SAMPLER_CAT2
