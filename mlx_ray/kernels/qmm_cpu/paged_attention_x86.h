// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The float32 exp the paged-attention kernels use (Cephes' expf polynomial,
// |rel err| < 2e-7 on [-87.3, 88.4]), written once over the ISA's ops so that
// the AVX2 and AVX-512 builds share it. Included only by translation units
// compiled with -mavx2 -mfma (or more).
#pragma once

#include <immintrin.h>

#include "paged_attention_kernel.h"

namespace mlx_ray::pa {
namespace {

template <class S>
typename S::F exp_poly(typename S::F x) {
  using F = typename S::F;
  x = S::min(S::max(x, S::set1(-87.3365478515625f)), S::set1(88.3762626647949f));
  const F fx = S::round(S::mul(x, S::set1(1.44269504088896341f)));
  F r = S::fnmadd(fx, S::set1(0.693359375f), x);
  r = S::fnmadd(fx, S::set1(-2.12194440e-4f), r);
  F y = S::set1(1.9875691500e-4f);
  y = S::fmadd(y, r, S::set1(1.3981999507e-3f));
  y = S::fmadd(y, r, S::set1(8.3334519073e-3f));
  y = S::fmadd(y, r, S::set1(4.1665795894e-2f));
  y = S::fmadd(y, r, S::set1(1.6666665459e-1f));
  y = S::fmadd(y, r, S::set1(5.0000001201e-1f));
  y = S::fmadd(y, S::mul(r, r), S::add(r, S::set1(1.0f)));
  return S::mul(y, S::pow2i(fx));
}

}  // namespace
}  // namespace mlx_ray::pa
