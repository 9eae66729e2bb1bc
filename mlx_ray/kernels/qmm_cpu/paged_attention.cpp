// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The CPU paged-attention primitive (see paged_attention.h): validation, the
// task schedule, the merge of segment partials and the scalar build of the
// segment kernel (paged_attention_simd.h). This file is compiled without FMA
// so that the merge is the same arithmetic whichever schedule ran.
//
// Schedule: tiles (row b, kv head, query range) are the tasks when there are
// enough of them; otherwise (decode of a few rows against long contexts) every
// (tile, segment) is a task writing its partial, and a second pass merges each
// tile's partials. Both schedules merge the same partials in segment order with
// the same code, so the output is bit-identical whichever ran (and therefore
// independent of B, of the other rows and of the thread count).
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "paged_attention_kernel.h"
#include "qmm_cpu.h"
#include "thread_pool.h"

namespace mlx_ray::pa {
namespace {

struct Scalar {
  using F = float;
  static constexpr int W = 1;
  static F set1(float v) { return v; }
  static F loadu(const float* p) { return *p; }
  static void storeu(float* p, F v) { *p = v; }
  static F mul(F a, F b) { return a * b; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static float hsum(F v) { return v; }
  static F exp(F x) { return std::exp(x); }
  template <DT T>
  static F load_dt(const char* p) { return qmm::load_f(p, T); }
  static F load_u8(const uint8_t* p) { return float(*p); }
  static F load_u4(const uint8_t* row, int e) { return float((row[e / 2] >> (4 * (e & 1))) & 0xf); }
};

}  // namespace
}  // namespace mlx_ray::pa

#include "paged_attention_simd.h"

MLX_RAY_PA_ENTRY_POINT(scalar, Scalar)

namespace mlx_ray {

using namespace mlx_ray::pa;
using qmm::ThreadPool;

namespace {

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("[mlx_ray.paged_attention_cpu] " + msg);
}

std::string shape_str(const mx::Shape& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

DT to_dt(mx::Dtype t) {
  return t == mx::float32 ? DT::f32 : t == mx::float16 ? DT::f16 : DT::bf16;
}

SegmentFn segment_fn() {
#if defined(MLX_RAY_HAVE_AVX2_TU)
  const std::string isa = isa_name();
  if (isa == "avx512") return segment_avx512;
  if (isa == "avx2") return segment_avx2;
#endif
  return segment_scalar;
}

// state <- merge(state, part) for R rows; an empty part (l == 0) changes nothing.
void merge(int R, int D, float* m, float* l, float* acc, const float* m2, const float* l2, const float* acc2) {
  for (int r = 0; r < R; ++r) {
    if (l2[r] == 0.f) continue;
    float* a = acc + int64_t(r) * D;
    const float* b = acc2 + int64_t(r) * D;
    if (l[r] == 0.f) {
      m[r] = m2[r];
      l[r] = l2[r];
      std::copy(b, b + D, a);
      continue;
    }
    const float mn = std::max(m[r], m2[r]);
    const float a1 = std::exp(m[r] - mn), a2 = std::exp(m2[r] - mn);
    l[r] = l[r] * a1 + l2[r] * a2;
    m[r] = mn;
    for (int d = 0; d < D; ++d) a[d] = a[d] * a1 + b[d] * a2;
  }
}

void finalize(const Problem& p, const Tile& t, const float* l, const float* acc) {
  const int G = p.G, D = p.D;
  for (int li = 0; li < t.l1 - t.l0; ++li) {
    for (int g = 0; g < G; ++g) {
      const int r = li * G + g;
      const int64_t off = ((int64_t(t.b) * p.Hq + t.kvh * G + g) * p.L + t.l0 + li) * D;
      const float inv = l[r] > 0.f ? 1.f / l[r] : std::numeric_limits<float>::quiet_NaN();
      const float* a = acc + int64_t(r) * D;
      if (p.out_dt == DT::f32) {
        float* o = static_cast<float*>(p.out) + off;
        for (int d = 0; d < D; ++d) o[d] = a[d] * inv;
      } else {
        for (int d = 0; d < D; ++d) qmm::store_f(p.out, off + d, p.out_dt, a[d] * inv);
      }
    }
  }
}

void fill_nan_row(const Problem& p, int b) {
  const int64_t n = int64_t(p.Hq) * p.L * p.D, off = int64_t(b) * n;
  for (int64_t i = 0; i < n; ++i) qmm::store_f(p.out, off + i, p.out_dt, std::numeric_limits<float>::quiet_NaN());
}

struct ThreadBufs {
  std::vector<float> q, k, v, s, state, part;
  Scratch scratch(int R, int D) {
    q.resize(size_t(R) * D);
    k.resize(size_t(kChunk) * D);
    v.resize(size_t(kChunk) * D);
    s.resize(kChunk);
    return Scratch{q.data(), k.data(), v.data(), s.data()};
  }
};

ThreadBufs& bufs() {
  thread_local ThreadBufs b;
  return b;
}

void run(const std::vector<mx::array>& in, mx::array& out, float scale, int block_size, int bits, int group_size) {
  const mx::array& q = in[0];
  Problem p{};
  p.B = q.shape(0);
  p.Hq = q.shape(1);
  p.L = q.shape(2);
  p.D = q.shape(3);
  p.Hkv = in[1].shape(1);
  p.G = p.Hq / p.Hkv;
  p.block_size = block_size;
  p.MB = in[3].shape(1);
  p.num_blocks = in[1].shape(0) / block_size;
  p.bits = bits;
  p.group_size = group_size;
  p.scale = scale;
  p.q = q.data<char>();
  p.q_dt = to_dt(q.dtype());
  if (bits == 0) {
    p.k = in[1].data<char>();
    p.v = in[2].data<char>();
    p.kv_dt = to_dt(in[1].dtype());
  } else {
    p.kq = in[1].data<uint32_t>();
    p.vq = in[2].data<uint32_t>();
    p.ks = in[5].data<char>();
    p.kb = in[6].data<char>();
    p.vs = in[7].data<char>();
    p.vb = in[8].data<char>();
    p.sb_dt = to_dt(in[5].dtype());
    p.kv_dt = p.sb_dt;
  }
  p.block_tables = in[3].data<int32_t>();
  p.context_lens = in[4].data<int32_t>();
  p.out = out.data<void>();
  p.out_dt = to_dt(out.dtype());
  if (p.B == 0 || p.Hq == 0 || p.L == 0) return;

  // Rows whose lengths or used table entries are out of range: NaN, never read.
  std::vector<Tile> tiles;
  const int Lt = p.L == 1 ? 1 : std::max(1, kTileRows / p.G);
  for (int b = 0; b < p.B; ++b) {
    const int ctx = p.context_lens[b];
    bool ok = ctx >= p.L && int64_t(ctx) <= int64_t(p.MB) * block_size;
    for (int i = 0; ok && i < (ctx + block_size - 1) / block_size; ++i) {
      const int32_t blk = p.block_tables[int64_t(b) * p.MB + i];
      ok = blk >= 0 && blk < p.num_blocks;
    }
    if (!ok) {
      fill_nan_row(p, b);
      continue;
    }
    // Heaviest tiles (last queries) first: the pool hands tasks out in order.
    for (int l1 = p.L; l1 > 0; l1 -= Lt)
      for (int h = 0; h < p.Hkv; ++h) tiles.push_back(Tile{b, h, std::max(0, l1 - Lt), l1});
  }
  const int nt = int(tiles.size());
  if (nt == 0) return;
  auto nseg = [&](const Tile& t) { return (p.context_lens[t.b] - p.L + t.l1 - 1) / kSeg + 1; };
  auto rows = [&](const Tile& t) { return (t.l1 - t.l0) * p.G; };
  const SegmentFn seg_fn = segment_fn();
  const int D = p.D;
  auto& pool = ThreadPool::instance();
  std::vector<int64_t> first(nt + 1, 0);  // first segment task of each tile
  for (int i = 0; i < nt; ++i) first[i + 1] = first[i] + nseg(tiles[i]);
  const bool split = nt < 2 * pool.num_threads() && first[nt] > nt;

  if (!split) {
    pool.parallel_for(nt, [&](int i) {
      const Tile& t = tiles[i];
      const int R = rows(t);
      ThreadBufs& tb = bufs();
      const Scratch sc = tb.scratch(R, D);
      const size_t stride = size_t(R) * (D + 2);
      tb.state.assign(stride, 0.f);
      tb.part.resize(stride);
      float *m = tb.state.data(), *l = m + R, *acc = l + R;
      float *pm = tb.part.data(), *pl = pm + R, *pacc = pl + R;
      for (int sgi = 0; sgi < nseg(t); ++sgi) {
        seg_fn(p, t, sgi, pm, pl, pacc, sc);
        merge(R, D, m, l, acc, pm, pl, pacc);
      }
      finalize(p, t, l, acc);
    });
    return;
  }
  // Split: one task per (tile, segment), then one merge per tile.
  std::vector<int64_t> base(nt + 1, 0);  // float offset of each tile's partials
  for (int i = 0; i < nt; ++i) base[i + 1] = base[i] + (first[i + 1] - first[i]) * int64_t(rows(tiles[i])) * (D + 2);
  std::vector<float> parts(static_cast<size_t>(base[nt]));
  pool.parallel_for(int(first[nt]), [&](int u) {
    const int i = int(std::upper_bound(first.begin(), first.end(), int64_t(u)) - first.begin()) - 1;
    const Tile& t = tiles[i];
    const int R = rows(t), sgi = int(u - first[i]);
    const Scratch sc = bufs().scratch(R, D);
    float* pm = parts.data() + base[i] + int64_t(sgi) * R * (D + 2);
    seg_fn(p, t, sgi, pm, pm + R, pm + 2 * R, sc);
  });
  pool.parallel_for(nt, [&](int i) {
    const Tile& t = tiles[i];
    const int R = rows(t);
    ThreadBufs& tb = bufs();
    tb.state.assign(size_t(R) * (D + 2), 0.f);
    float *m = tb.state.data(), *l = m + R, *acc = l + R;
    for (int sgi = 0; sgi < nseg(t); ++sgi) {
      const float* pm = parts.data() + base[i] + int64_t(sgi) * R * (D + 2);
      merge(R, D, m, l, acc, pm, pm + R, pm + 2 * R);
    }
    finalize(p, t, l, acc);
  });
}

}  // namespace

std::string paged_attention_isa() {
#if defined(MLX_RAY_HAVE_AVX2_TU)
  return isa_name();
#else
  return "scalar";
#endif
}

mx::array paged_attention(
    const mx::array& queries,
    const mx::array& k_cache,
    const mx::array& v_cache,
    const mx::array& block_tables,
    const mx::array& context_lens,
    const std::optional<mx::array>& k_scales,
    const std::optional<mx::array>& k_biases,
    const std::optional<mx::array>& v_scales,
    const std::optional<mx::array>& v_biases,
    float scale,
    int block_size,
    std::optional<int> bits_opt,
    int group_size,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  check(stream.device.type == mx::Device::DeviceType::cpu, "runs on CPU streams only.");
  check(queries.ndim() == 4, "queries must be 4-D [B, Hq, L, D], got " + shape_str(queries.shape()) + ".");
  const auto qt = queries.dtype();
  check(qt == mx::float32 || qt == mx::float16 || qt == mx::bfloat16, "queries must be float32, float16 or bfloat16.");
  const int B = queries.shape(0), Hq = queries.shape(1), D = queries.shape(3);
  check(D == 64 || D == 128, "head dim D must be 64 or 128, got " + std::to_string(D) + ".");
  check(block_size > 0, "block_size must be positive.");
  const int bits = bits_opt.value_or(0);
  check(bits == 0 || bits == 4 || bits == 8, "bits must be None, 4 or 8, got " + std::to_string(bits) + ".");
  const bool quant = bits != 0;
  check(quant == (k_scales && k_biases && v_scales && v_biases) && (quant || !(k_scales || k_biases || v_scales || v_biases)),
        quant ? "bits 4/8 need k_scales, k_biases, v_scales and v_biases." : "a float cache takes no scales/biases.");
  check(k_cache.ndim() == 3, "k_cache must be 3-D [S, Hkv, *], got " + shape_str(k_cache.shape()) + ".");
  check(v_cache.shape() == k_cache.shape(), "v_cache " + shape_str(v_cache.shape()) + " must match k_cache " +
                                                shape_str(k_cache.shape()) + ".");
  const int S = k_cache.shape(0), Hkv = k_cache.shape(1);
  check(Hkv > 0 && Hq % Hkv == 0, "Hq (" + std::to_string(Hq) + ") must be a multiple of Hkv (" + std::to_string(Hkv) + ").");
  check(S % block_size == 0, "the pool's slot count (" + std::to_string(S) + ") must be a multiple of block_size (" +
                                 std::to_string(block_size) + ").");
  if (!quant) {
    check(k_cache.shape(2) == D, "k_cache/v_cache must be [S, Hkv, D] with D = " + std::to_string(D) + ", got " +
                                     shape_str(k_cache.shape()) + ".");
    check(k_cache.dtype() == qt && v_cache.dtype() == qt, "a float cache must have the queries' dtype.");
  } else {
    check(group_size == 32 || group_size == 64 || group_size == 128, "group_size must be 32, 64 or 128.");
    check(D % group_size == 0, "group_size must divide D.");
    check(k_cache.dtype() == mx::uint32 && v_cache.dtype() == mx::uint32, "quantized caches must be packed uint32.");
    check(k_cache.shape(2) == D * bits / 32, "packed caches must be [S, Hkv, D * bits / 32] = [S, Hkv, " +
                                                 std::to_string(D * bits / 32) + "], got " + shape_str(k_cache.shape()) + ".");
    const mx::Shape sb{S, Hkv, D / group_size};
    for (const auto* a : {&*k_scales, &*k_biases, &*v_scales, &*v_biases}) {
      check(a->shape() == sb, "scales/biases must be [S, Hkv, D / group_size] = " + shape_str(sb) + ", got " +
                                  shape_str(a->shape()) + ".");
      check(a->dtype() == qt, "scales/biases must have the queries' dtype.");
    }
  }
  check(block_tables.ndim() == 2 && block_tables.shape(0) == B,
        "block_tables must be [B, MB] with B = " + std::to_string(B) + ", got " + shape_str(block_tables.shape()) + ".");
  check(block_tables.dtype() == mx::int32, "block_tables must be int32.");
  check(context_lens.ndim() == 1 && context_lens.shape(0) == B,
        "context_lens must be [B] with B = " + std::to_string(B) + ", got " + shape_str(context_lens.shape()) + ".");
  check(context_lens.dtype() == mx::int32, "context_lens must be int32.");

  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, stream); };
  std::vector<mx::array> inputs{c(queries), c(k_cache), c(v_cache), c(block_tables), c(context_lens)};
  if (quant) {
    inputs.push_back(c(*k_scales));  // inputs 5..8
    inputs.push_back(c(*k_biases));
    inputs.push_back(c(*v_scales));
    inputs.push_back(c(*v_biases));
  }
  return mx::array(queries.shape(), qt, std::make_shared<PagedAttentionCpu>(stream, scale, block_size, bits, group_size),
                   std::move(inputs));
}

void PagedAttentionCpu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  std::vector<mx::array> ins;
  for (auto& in : inputs) {
    enc.set_input_array(in);
    ins.push_back(mx::array::unsafe_weak_copy(in));
  }
  enc.set_output_array(out);
  enc.dispatch([ins = std::move(ins), out = mx::array::unsafe_weak_copy(out), scale = scale_, bs = block_size_,
                bits = bits_, gs = group_size_]() mutable { run(ins, out, scale, bs, bits, gs); });
}

void PagedAttentionCpu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mlx_ray.paged_attention_cpu] this primitive runs on CPU streams only.");
}

bool PagedAttentionCpu::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const PagedAttentionCpu&>(other);
  return scale_ == o.scale_ && block_size_ == o.block_size_ && bits_ == o.bits_ && group_size_ == o.group_size_;
}

std::vector<mx::Shape> PagedAttentionCpu::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

}  // namespace mlx_ray
