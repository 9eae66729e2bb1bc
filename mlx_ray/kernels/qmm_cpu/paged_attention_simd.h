// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The paged-attention segment kernel, generic over a SIMD traits struct S
// (W float lanes): included by the scalar, AVX2 and AVX-512 translation units,
// each with its own traits and compile flags. See paged_attention_kernel.h.
//
// Per chunk of kChunk key positions of the segment (only those some row of the
// tile sees): each key / value row is located through the block table and read
// in place (float32 caches) or converted / dequantized into a kChunk x D scratch
// (f16, bf16, 4/8-bit), then for every row r of the tile with nv > 0 visible keys
// in the chunk: s_j = (scale * q_r) . k_j (one FMA chain per key, fixed order),
// m' = max(m, max_j s_j), alpha = exp(m - m'), p_j = exp(s_j - m'),
// l = l * alpha + sum_j p_j (in j order), acc = acc * alpha + sum_j p_j v_j (in j order).
// Keys a row does not see are never read into its sums (their slots may hold
// anything, NaN included). Every step depends only on the row's own query, its
// position and the keys: the result is the same whatever shares the call.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "paged_attention_kernel.h"

namespace mlx_ray::pa {
namespace {

enum class Src { f32, f16, bf16, q8, q4 };

template <class S, int D, Src SRC>
struct SegmentKernel {
  using F = typename S::F;
  static constexpr int W = S::W;
  static constexpr int NV = D / W;  // vectors per row
  static constexpr int SL = NV < 8 ? NV : 8;  // vectors per register slice of an accumulator row

  static float dot(const float* q, const float* k) {
    F a = S::mul(S::loadu(q), S::loadu(k));
    for (int i = 1; i < NV; ++i) a = S::fmadd(S::loadu(q + i * W), S::loadu(k + i * W), a);
    return S::hsum(a);
  }

  // Four keys at once: the same chain per key as dot(), interleaved.
  static void dot4(const float* q, const float* const* k, float* out) {
    F qv = S::loadu(q);
    F a0 = S::mul(qv, S::loadu(k[0])), a1 = S::mul(qv, S::loadu(k[1]));
    F a2 = S::mul(qv, S::loadu(k[2])), a3 = S::mul(qv, S::loadu(k[3]));
    for (int i = 1; i < NV; ++i) {
      qv = S::loadu(q + i * W);
      a0 = S::fmadd(qv, S::loadu(k[0] + i * W), a0);
      a1 = S::fmadd(qv, S::loadu(k[1] + i * W), a1);
      a2 = S::fmadd(qv, S::loadu(k[2] + i * W), a2);
      a3 = S::fmadd(qv, S::loadu(k[3] + i * W), a3);
    }
    out[0] = S::hsum(a0);
    out[1] = S::hsum(a1);
    out[2] = S::hsum(a2);
    out[3] = S::hsum(a3);
  }

  // acc = acc * alpha + sum_{j < nv} p_j v_j, in j order per element.
  static void pv(float* acc, float alpha, const float* p, const float* const* v, int nv) {
    const F al = S::set1(alpha);
    for (int d0 = 0; d0 < NV; d0 += SL) {
      F a[SL];
      for (int i = 0; i < SL; ++i) a[i] = S::mul(S::loadu(acc + (d0 + i) * W), al);
      for (int j = 0; j < nv; ++j) {
        const F pj = S::set1(p[j]);
        const float* vj = v[j] + d0 * W;
        for (int i = 0; i < SL; ++i) a[i] = S::fmadd(pj, S::loadu(vj + i * W), a[i]);
      }
      for (int i = 0; i < SL; ++i) S::storeu(acc + (d0 + i) * W, a[i]);
    }
  }

  // Row `idx` (= slot * Hkv + kv head) of a cache as float32: in place, or converted into dst.
  static const float* row(const Problem& p, bool is_k, int64_t idx, float* dst) {
    if constexpr (SRC == Src::f32) {
      return reinterpret_cast<const float*>(is_k ? p.k : p.v) + idx * D;
    } else if constexpr (SRC == Src::f16 || SRC == Src::bf16) {
      const char* src = (is_k ? p.k : p.v) + idx * D * 2;
      for (int i = 0; i < NV; ++i) S::storeu(dst + i * W, S::template load_dt<SRC == Src::f16 ? DT::f16 : DT::bf16>(src + i * W * 2));
      return dst;
    } else {
      constexpr int bits = SRC == Src::q8 ? 8 : 4;
      const int gs = p.group_size, ng = D / gs;
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>((is_k ? p.kq : p.vq) + idx * (D * bits / 32));
      const int sbsz = qmm::dt_size(p.sb_dt);
      const char* sc = (is_k ? p.ks : p.vs) + idx * ng * sbsz;
      const char* bi = (is_k ? p.kb : p.vb) + idx * ng * sbsz;
      for (int g = 0; g < ng; ++g) {
        const F sv = S::set1(qmm::load_f(sc + g * sbsz, p.sb_dt));
        const F bv = S::set1(qmm::load_f(bi + g * sbsz, p.sb_dt));
        for (int e = g * gs; e < (g + 1) * gs; e += W) {
          const F x = bits == 8 ? S::load_u8(bytes + e) : S::load_u4(bytes, e);
          S::storeu(dst + e, S::fmadd(x, sv, bv));
        }
      }
      return dst;
    }
  }

  static void run(const Problem& p, const Tile& t, int seg, float* m, float* l, float* acc, const Scratch& sc) {
    const int G = p.G, L = p.L;
    const int R = (t.l1 - t.l0) * G;
    const int ctx = p.context_lens[t.b];
    const int qpos0 = ctx - L + t.l0;  // position of the tile's first query
    const int qpos_max = ctx - L + t.l1 - 1;
    const int k0 = seg * kSeg, k1 = std::min(k0 + kSeg, qpos_max + 1);
    for (int r = 0; r < R; ++r) {
      m[r] = -std::numeric_limits<float>::infinity();
      l[r] = 0.f;
    }
    std::fill(acc, acc + int64_t(R) * D, 0.f);
    if (k0 >= k1) return;

    // Scaled queries, rows (l, g).
    for (int li = 0; li < t.l1 - t.l0; ++li) {
      for (int g = 0; g < G; ++g) {
        const int h = t.kvh * G + g;
        const int64_t off = ((int64_t(t.b) * p.Hq + h) * L + t.l0 + li) * D;
        const char* src = p.q + off * qmm::dt_size(p.q_dt);
        float* dst = sc.q + int64_t(li * G + g) * D;
        if (p.q_dt == DT::f32) {
          const float* f = reinterpret_cast<const float*>(src);
          for (int d = 0; d < D; ++d) dst[d] = f[d] * p.scale;
        } else {
          for (int d = 0; d < D; ++d) dst[d] = qmm::load_f(src + d * 2, p.q_dt) * p.scale;
        }
      }
    }

    const int32_t* bt = p.block_tables + int64_t(t.b) * p.MB;
    const int bs = p.block_size;
    const float* kr[kChunk];
    const float* vr[kChunk];
    float* s = sc.s;
    for (int c0 = k0; c0 < k1; c0 += kChunk) {
      const int n = std::min(kChunk, k1 - c0);
      for (int j = 0; j < n; ++j) {
        const int pos = c0 + j;
        const int64_t slot = int64_t(bt[pos / bs]) * bs + pos % bs;
        const int64_t idx = slot * p.Hkv + t.kvh;
        kr[j] = row(p, true, idx, sc.k + j * D);
        vr[j] = row(p, false, idx, sc.v + j * D);
      }
      for (int r = 0; r < R; ++r) {
        const int qpos = qpos0 + r / G;
        const int nv = std::min(n, qpos + 1 - c0);
        if (nv <= 0) continue;
        const float* q = sc.q + int64_t(r) * D;
        int j = 0;
        for (; j + 4 <= nv; j += 4) dot4(q, kr + j, s + j);
        for (; j < nv; ++j) s[j] = dot(q, kr[j]);
        float mc = s[0];
        for (j = 1; j < nv; ++j) mc = std::max(mc, s[j]);
        const float m_old = m[r];
        const float m_new = std::max(m_old, mc);
        const float alpha = l[r] == 0.f && m_old == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(m_old - m_new);
        const F mv = S::set1(m_new);
        for (j = 0; j < nv; j += W) S::storeu(s + j, S::exp(S::sub(S::loadu(s + j), mv)));
        float sum = 0.f;
        for (j = 0; j < nv; ++j) sum += s[j];
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
        pv(acc + int64_t(r) * D, alpha, s, vr, nv);
      }
    }
  }
};

template <class S, int D>
void run_d(const Problem& p, const Tile& t, int seg, float* m, float* l, float* acc, const Scratch& sc) {
  if (p.bits == 8) return SegmentKernel<S, D, Src::q8>::run(p, t, seg, m, l, acc, sc);
  if (p.bits == 4) return SegmentKernel<S, D, Src::q4>::run(p, t, seg, m, l, acc, sc);
  if (p.kv_dt == DT::f16) return SegmentKernel<S, D, Src::f16>::run(p, t, seg, m, l, acc, sc);
  if (p.kv_dt == DT::bf16) return SegmentKernel<S, D, Src::bf16>::run(p, t, seg, m, l, acc, sc);
  return SegmentKernel<S, D, Src::f32>::run(p, t, seg, m, l, acc, sc);
}

template <class S>
void run_segment(const Problem& p, const Tile& t, int seg, float* m, float* l, float* acc, const Scratch& sc) {
  if (p.D == 64) return run_d<S, 64>(p, t, seg, m, l, acc, sc);
  return run_d<S, 128>(p, t, seg, m, l, acc, sc);
}

}  // namespace
}  // namespace mlx_ray::pa

#define MLX_RAY_PA_ENTRY_POINT(isa, Traits)                                                               \
  namespace mlx_ray::pa {                                                                                 \
  void segment_##isa(const Problem& p, const Tile& t, int seg, float* m, float* l, float* acc,           \
                     const Scratch& sc) {                                                                 \
    run_segment<Traits>(p, t, seg, m, l, acc, sc);                                                        \
  }                                                                                                       \
  }
