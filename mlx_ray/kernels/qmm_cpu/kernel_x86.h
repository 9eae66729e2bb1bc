// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// Scalar helpers shared by the x86 SIMD traits (F16C conversions); included
// only by translation units compiled with -mf16c.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "kernel.h"

namespace mlx_ray::qmm {
namespace {

struct X86Scalar {
  template <DT T>
  static float load_scalar(const char* p) {
    uint16_t h;
    if constexpr (T == DT::f32) {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    } else if constexpr (T == DT::bf16) {
      std::memcpy(&h, p, 2);
      return bf16_to_f32(h);
    } else {
      std::memcpy(&h, p, 2);
      return _cvtsh_ss(h);
    }
  }
  static float load_any(const char* p, DT t) {
    return t == DT::f16 ? load_scalar<DT::f16>(p) : load_f(p, t);
  }
  static void store_out(void* out, int64_t i, DT t, float v) {
    if (t == DT::f16) {
      static_cast<uint16_t*>(out)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    } else {
      store_f(out, i, t, v);
    }
  }
};

}  // namespace
}  // namespace mlx_ray::qmm
