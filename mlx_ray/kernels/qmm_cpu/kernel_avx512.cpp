// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// AVX-512 (F/BW/DQ/VL) instance of kernel_simd.h: 16 lanes and 32 zmm
// registers, so twice the work per instruction of the AVX2 path and room for
// larger tiles. Selected at run time when the CPU has it.
#include "kernel_x86.h"

namespace mlx_ray::qmm {
namespace {

struct Avx512 : X86Scalar {
  using F = __m512;
  using I = __m512i;
  static constexpr int L = 16;
  static constexpr int NR1 = 4;  // rows of W per tile when M == 1
  static constexpr int NR = 4;   // rows of W per tile when M > 1
  static constexpr int MR = 4;   // rows of x per tile
  static constexpr int DNR1 = 8;  // dense kernel: rows of W per tile when M == 1
  static constexpr int DNR = 6;   // dense kernel: rows of W per tile when M > 1
  static constexpr int DMR = 4;   // dense kernel: rows of x per tile

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_load_ps(p); }
  static F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F permute(F v, I idx) { return _mm512_permutexvar_ps(idx, v); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static I srl(I v, int n) { return _mm512_srli_epi32(v, unsigned(n)); }
  static I and_mask(I v, uint32_t m) { return _mm512_and_si512(v, _mm512_set1_epi32(int(m))); }
  static I load_words(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static I load_words_partial(const uint32_t* p, int n) {
    return _mm512_maskz_loadu_epi32(__mmask16((1u << n) - 1u), p);
  }
  static F loadu_n(const float* p, int n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), p); }
  static F add_first(F v, float x) { return _mm512_add_ps(v, _mm512_maskz_mov_ps(__mmask16(1), _mm512_set1_ps(x))); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  template <DT T>
  static F load_dt(const char* p) {
    if constexpr (T == DT::f32) {
      return _mm512_loadu_ps(p);
    } else if constexpr (T == DT::bf16) {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  }
  // n (<= L) consecutive values into the low lanes, without touching memory past them.
  template <DT T>
  static F load_n(const char* p, int n) {
    const __mmask16 k = __mmask16((1u << n) - 1u);
    if constexpr (T == DT::f32) {
      return _mm512_maskz_loadu_ps(k, p);
    } else if constexpr (T == DT::bf16) {
      __m256i h = _mm256_maskz_loadu_epi16(k, p);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
    }
  }
};

}  // namespace
}  // namespace mlx_ray::qmm

#include "dense_simd.h"
#include "kernel_simd.h"

MLX_RAY_KERNEL_ENTRY_POINTS(avx512, Avx512)
MLX_RAY_DENSE_ENTRY_POINTS(avx512, Avx512)
