// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The compute core of the CPU quantized matmul: out = x @ dequantize(w).T for
// MLX's affine layout (packed uint32 words, element k of a row in word
// k / (32/bits) at bit bits*(k % (32/bits)); value = q * scale + bias, one
// scale/bias per group of `group_size` elements along K).
//
// It is split from the MLX primitive so that each ISA lives in its own
// translation unit compiled with its own flags (kernel_avx2.cpp with
// -mavx2 -mfma -mf16c, kernel_avx512.cpp with -mavx512f/bw/dq/vl), and each is
// only called after a run-time CPUID check.
#pragma once

#include <cstdint>
#include <cstring>

namespace mlx_ray::qmm {

enum class DT : int { f32 = 0, f16 = 1, bf16 = 2 };

inline int dt_size(DT t) {
  return t == DT::f32 ? 4 : 2;
}

// Portable bf16 <-> f32 (round to nearest even, NaN kept quiet).
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return uint16_t((u >> 16) | 0x40u);
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Portable IEEE half <-> f32 for the scalar path (the AVX2 path uses F16C).
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: renormalize
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while (!(man & 0x400u));
    u = sign | (uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow to inf
  if (a < 0x38800000u) {  // half subnormal or zero: units of 2^-24, round to even
    float af;
    std::memcpy(&af, &a, 4);
    float scaled = af * 16777216.0f;
    uint32_t q = uint32_t(scaled);
    float frac = scaled - float(q);
    if (frac > 0.5f || (frac == 0.5f && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;
  return uint16_t(sign | (r >> 13));
}

inline float load_f(const char* p, DT t) {
  uint16_t h;
  switch (t) {
    case DT::f32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case DT::bf16:
      std::memcpy(&h, p, 2);
      return bf16_to_f32(h);
    default:
      std::memcpy(&h, p, 2);
      return f16_to_f32(h);
  }
}

inline void store_f(void* out, int64_t i, DT t, float v) {
  switch (t) {
    case DT::f32:
      static_cast<float*>(out)[i] = v;
      break;
    case DT::bf16:
      static_cast<uint16_t*>(out)[i] = f32_to_bf16(v);
      break;
    default:
      static_cast<uint16_t*>(out)[i] = f32_to_f16(v);
  }
}

// Activations, already gathered from their (possibly strided) source.
struct XView {
  const char* base;       // start of the array's data
  DT dt;
  int64_t stride_k;        // elements between neighbours along K
  const int64_t* row_off;  // element offset of each of the M rows
};

// One problem, as seen by the kernels. Every pointer is read-only except out.
struct Problem {
  int M, N, K, bits, group_size, G;  // G = K / group_size
  const uint32_t* w;
  int64_t w_ld;  // words between rows of w
  const char* scales;
  const char* biases;
  DT sb_dt;
  int64_t sb_ld0, sb_ld1;  // element strides of scales/biases (same layout)
  void* out;               // [M][N] row-major
  DT out_dt;
  // Filled by the pack step:
  const float* xp;  // [M][Kp]
  int64_t Kp;
  const float* xsum;  // [M][G]
};

// Packs x rows [m0, m1) into xp/xsum (layout private to each ISA).
using PackFn = void (*)(const XView&, const Problem&, float* xp, float* xsum, int m0, int m1);
// Computes out rows [m0, m1) x columns [n0, n1).
using RowsFn = void (*)(const Problem&, int n0, int n1, int m0, int m1);

// Kp for an ISA's layout (padding of K).
int64_t padded_k_scalar(const Problem& p);
void pack_scalar(const XView&, const Problem&, float*, float*, int, int);
void rows_scalar(const Problem&, int, int, int, int);

#if defined(__x86_64__) || defined(_M_X64)
#define MLX_RAY_HAVE_AVX2_TU 1
int64_t padded_k_avx2(const Problem& p);
void pack_avx2(const XView&, const Problem&, float*, float*, int, int);
void rows_avx2(const Problem&, int, int, int, int);
int64_t padded_k_avx512(const Problem& p);
void pack_avx512(const XView&, const Problem&, float*, float*, int, int);
void rows_avx512(const Problem&, int, int, int, int);
#endif

// Dense small-M matmul (dense_simd.h): out[M][N] = x[M][K] @ w[N][K].T.
struct DenseProblem {
  int M, N, K;
  const float* x;  // packed float32 rows
  int64_t x_ld;    // floats between rows of x
  const char* w;   // rows contiguous along K
  DT w_dt;
  int64_t w_ld;    // elements between rows of w
  void* out;       // [M][N] row-major
  DT out_dt;
};
// Computes all M rows of out for columns [n0, n1).
using DenseRowsFn = void (*)(const DenseProblem&, int n0, int n1);
void dense_rows_scalar(const DenseProblem&, int, int);
#if defined(MLX_RAY_HAVE_AVX2_TU)
void dense_rows_avx2(const DenseProblem&, int, int);
void dense_rows_avx512(const DenseProblem&, int, int);
#endif

// Dequantizes rows [n0, n1) of w to float, row-major with leading dim K.
void dequantize_rows(const Problem& p, float* dst, int n0, int n1);

}  // namespace mlx_ray::qmm
