// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The compute core of the CPU paged attention (see paged_attention.h for the
// contract). Split from the primitive like kernel.h: the per-ISA translation
// units (paged_attention_avx2.cpp, paged_attention_avx512.cpp) each instantiate
// paged_attention_simd.h with their own traits and flags; the scalar build lives
// in paged_attention.cpp. Each is only called after a run-time CPUID check.
//
// Work unit: a *tile* = one row b, one KV head, a range of query positions
// [l0, l1) and the G = Hq / Hkv query heads that read that KV head; its R =
// (l1 - l0) * G query rows are ordered (l, g). Keys are walked in *segments* of
// kSeg absolute positions, each in *chunks* of kChunk positions (both aligned to
// position 0, so they never depend on the batch, the tile or the block size):
// per chunk an online-softmax step (float32 scores, running max, exp, PV), per
// segment a partial (m, l, acc) that the primitive merges in segment order.
#pragma once

#include <cstdint>

#include "kernel.h"

namespace mlx_ray::pa {

using qmm::DT;

constexpr int kChunk = 32;   // keys per online-softmax step
constexpr int kSeg = 256;    // keys per segment (the unit split across threads), a multiple of kChunk
constexpr int kTileRows = 24;  // about this many query rows per tile (prefill)

struct Problem {
  int B, Hq, Hkv, G, L, D, block_size, MB, num_blocks;
  int bits;        // 0: float cache; 4 or 8: affine-quantized
  int group_size;  // quantized only
  float scale;
  const char* q;   // [B, Hq, L, D] row-contiguous, q_dt
  DT q_dt;
  // float caches: [S, Hkv, D] in kv_dt
  const char* k;
  const char* v;
  DT kv_dt;
  // quantized caches: packed [S, Hkv, D * bits / 32] uint32, scales/biases [S, Hkv, D / group_size] in sb_dt
  const uint32_t* kq;
  const uint32_t* vq;
  const char* ks;
  const char* kb;
  const char* vs;
  const char* vb;
  DT sb_dt;
  const int32_t* block_tables;  // [B, MB]
  const int32_t* context_lens;  // [B]
  void* out;                    // [B, Hq, L, D] in out_dt
  DT out_dt;
};

struct Tile {
  int b, kvh, l0, l1;
};

// Per-thread scratch the segment kernel may use (grown by the caller's helper).
struct Scratch {
  float* q;  // [R][D] scaled queries
  float* k;  // [kChunk][D] converted keys
  float* v;  // [kChunk][D] converted values
  float* s;  // [kChunk] scores of one row
};

// The partial over segment `seg` of tile `t`: for every row r < R, m[r] (running
// max, -inf if the row sees no key of the segment), l[r] (sum of exp), acc[r*D ..]
// (sum of exp * v, not normalized).
using SegmentFn = void (*)(const Problem&, const Tile&, int seg, float* m, float* l, float* acc, const Scratch&);

void segment_scalar(const Problem&, const Tile&, int, float*, float*, float*, const Scratch&);
#if defined(MLX_RAY_HAVE_AVX2_TU)
void segment_avx2(const Problem&, const Tile&, int, float*, float*, float*, const Scratch&);
void segment_avx512(const Problem&, const Tile&, int, float*, float*, float*, const Scratch&);
#endif

}  // namespace mlx_ray::pa
