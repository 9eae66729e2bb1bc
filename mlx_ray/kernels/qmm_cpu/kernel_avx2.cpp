// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// AVX2 + FMA + F16C instance of kernel_simd.h (8 lanes, 16 ymm registers).
#include "kernel_x86.h"

namespace mlx_ray::qmm {
namespace {

struct Avx2 : X86Scalar {
  using F = __m256;
  using I = __m256i;
  static constexpr int L = 8;
  static constexpr int NR1 = 4;  // rows of W per tile when M == 1
  static constexpr int NR = 2;   // rows of W per tile when M > 1
  static constexpr int MR = 4;   // rows of x per tile
  static constexpr int DNR1 = 4;  // dense kernel: rows of W per tile when M == 1
  static constexpr int DNR = 2;   // dense kernel: rows of W per tile when M > 1
  static constexpr int DMR = 4;   // dense kernel: rows of x per tile

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_load_ps(p); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F permute(F v, I idx) { return _mm256_permutevar8x32_ps(v, idx); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static I srl(I v, int n) { return _mm256_srli_epi32(v, n); }
  static I and_mask(I v, uint32_t m) { return _mm256_and_si256(v, _mm256_set1_epi32(int(m))); }
  static I load_words(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I load_words_partial(const uint32_t* p, int n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
    return _mm256_maskload_epi32(reinterpret_cast<const int*>(p), mask);
  }
  static __m256i first_n(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static F loadu_n(const float* p, int n) { return _mm256_maskload_ps(p, first_n(n)); }
  static F add_first(F v, float x) { return _mm256_add_ps(v, _mm256_setr_ps(x, 0, 0, 0, 0, 0, 0, 0)); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  template <DT T>
  static F load_dt(const char* p) {
    if constexpr (T == DT::f32) {
      return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    } else if constexpr (T == DT::bf16) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
  }
  // n (<= L) consecutive values into the low lanes, without touching memory past them.
  template <DT T>
  static F load_n(const char* p, int n) {
    if constexpr (T == DT::f32) {
      return _mm256_maskload_ps(reinterpret_cast<const float*>(p), first_n(n));
    } else {
      __m128i h;
      if (n == 2) {  // the common case inside a block (4-bit, group 32): one 4-byte load
        uint32_t two;
        std::memcpy(&two, p, 4);
        h = _mm_cvtsi32_si128(int(two));
      } else if (n == 4) {
        uint64_t four;
        std::memcpy(&four, p, 8);
        h = _mm_cvtsi64_si128(int64_t(four));
      } else {
        alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(tmp, p, size_t(n) * 2);
        h = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
      }
      if constexpr (T == DT::bf16) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      } else {
        return _mm256_cvtph_ps(h);
      }
    }
  }
};

}  // namespace
}  // namespace mlx_ray::qmm

#include "dense_simd.h"
#include "kernel_simd.h"

MLX_RAY_KERNEL_ENTRY_POINTS(avx2, Avx2)
MLX_RAY_DENSE_ENTRY_POINTS(avx2, Avx2)
