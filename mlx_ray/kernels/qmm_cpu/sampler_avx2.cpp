// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The sampler's row algorithm built for AVX2 + FMA (compiled with -mavx2 -mfma
// -ffp-contract=off; called only after a run-time CPUID check, see sampler.cpp).
#define MLX_RAY_SAMPLER_SUFFIX avx2
#include "sampler_row.h"
