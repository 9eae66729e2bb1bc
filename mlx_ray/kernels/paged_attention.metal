// paged_attention: decode-oriented attention of queries against K/V read in place from a block pool
// through a block table (the contract is mlx_ray/kernels/paged_attention.py's docstring; the launch is
// mlx_ray/kernels/paged_attention_metal.py).
//
// One threadgroup per (row b, KV head, query pass, context partition); NSG SIMD groups of 32 lanes.
// A query pass is up to QMAX query vectors of that KV head's GQA group, flattened as i = l * G + g
// (position l, head kvh * G + g): each K and V vector is read from memory once per pass and used for
// all of the pass's queries (for decode, L = 1, one pass holds the whole group: K/V read once).
//
// Inside a SIMD group, TPK = D / 8 lanes own one key (8 consecutive elements a lane: 16 bytes of
// half, one 4-bit word, two 8-bit words), so a SIMD group scores KPS = 32 / TPK keys at once; the
// score of a key is the lanes' partial dots reduced with simd_shuffle_xor over its TPK lanes. SIMD
// group w walks the partition's blocks w, w + NSG, ...: one block-table read per block, then the
// block's tokens KPS at a time. Every key slot keeps its own online softmax (running max and sum in
// float32, in log2 units: the queries arrive scaled by scale * log2(e)) and float32 output
// accumulators; at the end the KPS slots merge through shuffles (lanes l and l ^ TPK hold the same
// elements), then the NSG SIMD groups through threadgroup memory.
//
// Causal limits: query i sees positions 0 ..= ctx - L + l (lim[i] = ctx - L + l + 1 keys); the pass
// walks keys below its largest limit and masks each query's own.
//
// Bounds, as the CPU primitive's: a row whose context length is out of range (ctx < L or ctx > MB * BS) or
// one of whose used block-table entries (the first ceil(ctx / BS)) names no block of the pool (< 0 or
// >= S / BS, S = k_data's first dimension) reads nothing and its output is NaN. On the GPU an unchecked
// entry is a fault that aborts the process; here it is a NaN row that the caller can see.
//
// PARTS = false: out[B, Hq, L, D] (type T) directly. PARTS = true: every partition writes its
// unnormalized float32 output and (max, sum) per query vector, merged by paged_attention_metal.py.
//
// Template: T (queries' dtype), D (64 or 128), BS (block size), BITS (0: float cache; 4, 8: affine),
// GS (group size; GS >= 8 so a lane's 8 elements share one group), QMAX (query vectors a pass),
// NSG (SIMD groups a threadgroup), PARTS. Inputs: params = [Hkv, G, L, MB, passes, parts,
// blocks a partition], qscale = scale * log2(e). For BITS = 0 the *_scales / *_biases inputs are
// unused one-element arrays.
//
// Plain SIMD arithmetic (no simdgroup_matrix), so that mlx_ray/kernels/metal_emu can run it.

// 8 consecutive elements e0 .. e0 + 7 of K or V vector `vec` (= slot * Hkv + kv head), as float.
template <int BITS, int GS, int D, typename DT, typename ST>
inline void pa_load8(const device DT* data, const device ST* scales, const device ST* biases, size_t vec, int e0,
                     thread float* out) {
  if constexpr (BITS == 0) {
    const device DT* p = data + vec * D + e0;
    for (int i = 0; i < 8; i++) {
      out[i] = float(p[i]);
    }
  } else {
    constexpr int PACK = 32 / BITS;
    constexpr uint MASK = (1u << BITS) - 1u;
    const device DT* w = data + vec * (D / PACK) + e0 / PACK;
    const size_t g = vec * (D / GS) + e0 / GS;
    const float s = float(scales[g]);
    const float b = float(biases[g]);
    for (int j = 0; j < 8 / PACK; j++) {
      const uint word = uint(w[j]);
      for (int p = 0; p < PACK; p++) {
        out[j * PACK + p] = s * float((word >> (p * BITS)) & MASK) + b;
      }
    }
  }
}

// --- body ---
  constexpr int EPL = 8;          // elements a lane
  constexpr int TPK = D / EPL;    // lanes a key
  constexpr int KPS = 32 / TPK;   // keys a SIMD group scores at once
  constexpr int NT = NSG * 32;    // threads a threadgroup
  const float NEG_INF = -metal::numeric_limits<float>::infinity();
  const float NAN_F = metal::numeric_limits<float>::quiet_NaN();
  threadgroup float tg_m[NSG * QMAX];  // each SIMD group's running max and sum per query vector
  threadgroup float tg_s[NSG * QMAX];
  threadgroup float tg_o[NSG * D];     // each SIMD group's output accumulators, one query vector at a time

  const int n_kv = params[0];
  const int G = params[1];
  const int L = params[2];
  const int MB = params[3];
  const int n_pass = params[4];
  const int n_part = params[5];
  const int part_blocks = params[6];

  const int kvh = int(threadgroup_position_in_grid.y);
  const int z = int(threadgroup_position_in_grid.z);
  const int part = z % n_part;
  const int pass = (z / n_part) % n_pass;
  const int b = z / (n_part * n_pass);

  const int sg = int(simdgroup_index_in_threadgroup);
  const int lane = int(thread_index_in_simdgroup);
  const int tid = sg * 32 + lane;
  const int slot = lane / TPK;
  const int e0 = (lane % TPK) * EPL;

  const int Hq = n_kv * G;
  const int i0 = pass * QMAX;
  const int nq = metal::min(QMAX, G * L - i0);
  const int ctx = context_lens[b];
  const float qs = qscale;

  // The row's bounds (uniform over the threadgroup): lengths first, then every used table entry, the
  // threadgroup's threads sharing the entries and OR-ing their findings through shuffles and tg_bad.
  threadgroup int tg_bad[NSG];
  const int pool_blocks = int(k_data_shape[0]) / BS;
  const bool len_ok = ctx >= L && ctx <= MB * BS;
  int bad_here = 0;
  if (len_ok) {
    const int used = (ctx + BS - 1) / BS;
    for (int i = tid; i < used; i += NT) {
      const int e = block_tables[size_t(b) * MB + i];
      bad_here |= (e < 0 || e >= pool_blocks) ? 1 : 0;
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    bad_here |= simd_shuffle_xor(bad_here, ushort(off));
  }
  if (lane == 0) {
    tg_bad[sg] = bad_here;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  bool bad = !len_ok;
  for (int w = 0; w < NSG; w++) {
    bad = bad || tg_bad[w] != 0;
  }

  // The pass's queries: this lane's 8 elements of each, pre-scaled; their key limits.
  float q[QMAX][EPL];
  int lim[QMAX];
  uint qrow[QMAX];  // (b * Hq + h) * L + l: the query vector's index in [B, Hq, L]
  int kmax = 0;
  for (int qi = 0; qi < QMAX; qi++) {
    lim[qi] = 0;
    qrow[qi] = 0;
    if (qi < nq) {
      const int i = i0 + qi;
      const int l = i / G;
      const int h = kvh * G + i % G;
      qrow[qi] = uint((b * Hq + h) * L + l);
      lim[qi] = bad ? 0 : ctx - L + l + 1;
      kmax = metal::max(kmax, lim[qi]);
      for (int e = 0; e < EPL; e++) {
        q[qi][e] = float(queries[size_t(qrow[qi]) * D + e0 + e]) * qs;
      }
    }
  }

  const int n_blocks = (kmax + BS - 1) / BS;
  const int blk_lo = part * part_blocks;
  const int blk_hi = metal::min(n_blocks, blk_lo + part_blocks);

  float m[QMAX];
  float s[QMAX];
  float o[QMAX][EPL];
  for (int qi = 0; qi < QMAX; qi++) {
    m[qi] = NEG_INF;
    s[qi] = 0.0f;
    for (int e = 0; e < EPL; e++) {
      o[qi][e] = 0.0f;
    }
  }

  for (int blk = blk_lo + sg; blk < blk_hi; blk += NSG) {
    const size_t phys = size_t(block_tables[size_t(b) * MB + blk]);
    for (int t0 = 0; t0 < BS; t0 += KPS) {
      const int t = t0 + slot;
      const int pos = blk * BS + t;
      const bool live = t < BS && pos < kmax;
      const size_t vec = (phys * BS + t) * n_kv + kvh;
      float kv[EPL];
      if (live) {
        pa_load8<BITS, GS, D>(k_data, k_scales, k_biases, vec, e0, kv);
      } else {
        for (int e = 0; e < EPL; e++) {
          kv[e] = 0.0f;
        }
      }
      float x[QMAX];
      for (int qi = 0; qi < QMAX; qi++) {
        x[qi] = 0.0f;
        if (qi < nq) {  // nq is uniform: every lane shuffles
          float d = 0.0f;
          for (int e = 0; e < EPL; e++) {
            d += q[qi][e] * kv[e];
          }
          for (int off = TPK / 2; off > 0; off >>= 1) {
            d += simd_shuffle_xor(d, ushort(off));
          }
          x[qi] = d;
        }
      }
      if (live) {
        pa_load8<BITS, GS, D>(v_data, v_scales, v_biases, vec, e0, kv);
        for (int qi = 0; qi < QMAX; qi++) {
          if (qi < nq && pos < lim[qi]) {
            const float mn = metal::max(m[qi], x[qi]);
            const float f = metal::exp2(m[qi] - mn);
            const float p = metal::exp2(x[qi] - mn);
            s[qi] = s[qi] * f + p;
            for (int e = 0; e < EPL; e++) {
              o[qi][e] = o[qi][e] * f + p * kv[e];
            }
            m[qi] = mn;
          }
        }
      }
    }
  }

  // Merge the KPS key slots of this SIMD group: lanes l and l ^ (TPK * 2^k) hold the same elements.
  for (int off = TPK; off < 32; off <<= 1) {
    for (int qi = 0; qi < QMAX; qi++) {
      if (qi < nq) {
        const float mo = simd_shuffle_xor(m[qi], ushort(off));
        const float so = simd_shuffle_xor(s[qi], ushort(off));
        float oo[EPL];
        for (int e = 0; e < EPL; e++) {
          oo[e] = simd_shuffle_xor(o[qi][e], ushort(off));
        }
        const float mn = metal::max(m[qi], mo);
        if (mn != NEG_INF) {
          const float fa = metal::exp2(m[qi] - mn);
          const float fb = metal::exp2(mo - mn);
          s[qi] = s[qi] * fa + so * fb;
          for (int e = 0; e < EPL; e++) {
            o[qi][e] = o[qi][e] * fa + oo[e] * fb;
          }
          m[qi] = mn;
        }
      }
    }
  }

  // Merge the NSG SIMD groups through threadgroup memory, one query vector at a time.
  if (lane == 0) {
    for (int qi = 0; qi < QMAX; qi++) {
      tg_m[sg * QMAX + qi] = m[qi];
      tg_s[sg * QMAX + qi] = s[qi];
    }
  }
  for (int qi = 0; qi < QMAX; qi++) {  // constant bounds: q, o stay in registers
    if (qi < nq) {  // uniform over the threadgroup, so are the barriers
      if (lane < TPK) {
        for (int e = 0; e < EPL; e++) {
          tg_o[sg * D + e0 + e] = o[qi][e];
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      float mx_all = NEG_INF;
      for (int w = 0; w < NSG; w++) {
        mx_all = metal::max(mx_all, tg_m[w * QMAX + qi]);
      }
      float f[NSG];
      float total = 0.0f;
      for (int w = 0; w < NSG; w++) {
        f[w] = mx_all == NEG_INF ? 0.0f : metal::exp2(tg_m[w * QMAX + qi] - mx_all);
        total += tg_s[w * QMAX + qi] * f[w];
      }
      const size_t row = size_t(qrow[qi]);
      for (int d = tid; d < D; d += NT) {
        float acc = 0.0f;
        for (int w = 0; w < NSG; w++) {
          acc += tg_o[w * D + d] * f[w];
        }
        if (PARTS) {
          part_o[(row * n_part + part) * D + d] = bad ? NAN_F : acc;
        } else {
          out[row * D + d] = bad ? static_cast<T>(NAN_F) : static_cast<T>(total > 0.0f ? acc / total : 0.0f);
        }
      }
      if (PARTS && tid == 0) {
        part_ms[(row * n_part + part) * 2] = bad ? NAN_F : mx_all;
        part_ms[(row * n_part + part) * 2 + 1] = bad ? NAN_F : total;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
