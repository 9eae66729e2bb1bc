// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// The batched sampler on Metal: one threadgroup per row (see mlx_ray/kernels/sampler.py
// for the contract and the exact semantics, which the twin defines).
//
// Inputs: logits [B, V] (float, half or bfloat), inv_t [B] float (1 / temperature),
// top_k [B] int (0: off), tp24 [B] uint (ceil(top_p * 2^24); 0: off), min_p [B]
// float (0: off), u32 [B] uint (floor(u * 2^32)), n_vocab (V). Output: tokens [B] int.
//
// Per row: the max; the total mass (top_p); then a radix select over the
// order-preserving 32-bit keys of the logits, 4 bits a level (8 levels, the
// top-k count and the top-p mass side by side); then the kept weights and the
// inverse CDF in token-id order. Masses are exact 64-bit integers (probabilities
// in units of 2^-40), reduced over SIMD groups as two 32-bit halves and then
// over threadgroup memory, so the result does not depend on the order of the
// sums. exp is metal::precise::exp, MLX's own Metal exp, so the kernel and the
// twin run on the GPU see the same probabilities bit for bit.
//
// Plain C-like Metal (no simdgroup_matrix), so that mlx_ray/kernels/metal_emu can run it.

inline uint smp_key(float f) {
  if (f == 0.0f) {
    f = 0.0f;  // -0 counts as +0, as float comparison has it
  }
  const uint u = as_type<uint>(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float smp_value(uint k) {
  return as_type<float>((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

inline ulong smp_fixed40(float p) {
  return ulong(metal::floor(p * 1099511627776.0f));  // p * 2^40, exact
}

// A 64-bit sum over the 32 lanes of a SIMD group (every lane gets it).
inline ulong smp_simd_sum64(ulong x) {
  for (ushort off = 16; off > 0; off >>= 1) {
    const uint2 v = as_type<uint2>(x);
    uint2 o;
    o.x = simd_shuffle_xor(v.x, off);
    o.y = simd_shuffle_xor(v.y, off);
    x += as_type<ulong>(o);
  }
  return x;
}

// The weight of one token at the temperature, 0 when a filter drops it.
inline ulong smp_weight(float x, float m, float thr, float mp, bool mp_on, float invt) {
  if (!(x >= thr)) {
    return 0;
  }
  const float d = x - m;
  if (mp_on && !(metal::precise::exp(d) >= mp)) {
    return 0;
  }
  return smp_fixed40(metal::precise::exp(d * invt));
}

// --- body ---
  const uint row = threadgroup_position_in_grid.x;
  const uint tid = thread_position_in_threadgroup.x;
  const uint ntg = threads_per_threadgroup.x;
  const uint lane = tid % 32u;
  const uint sg = tid / 32u;
  const uint nsg = (ntg + 31u) / 32u;
  const uint V = n_vocab;
  const ulong base = ulong(row) * ulong(V);

  threadgroup float red_f[32];
  threadgroup uint red_c[32 * 16];
  threadgroup ulong red_u[32 * 16];
  threadgroup uint tot_c[16];
  threadgroup ulong tot_u[16];
  threadgroup ulong part[1024];
  threadgroup ulong pick[2];

  // 1. The max.
  float m = -INFINITY;
  for (uint i = tid; i < V; i += ntg) {
    m = metal::max(m, float(logits[base + i]));
  }
  m = simd_max(m);
  if (lane == 0) {
    red_f[sg] = m;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  m = red_f[0];
  for (uint s = 1; s < nsg; ++s) {
    m = metal::max(m, red_f[s]);
  }
  if (m == -INFINITY) {  // no finite logit (the same for every thread of the row)
    if (tid == 0) {
      tokens[row] = 0;
    }
    return;
  }

  const float invt = inv_t[row];
  const int k = top_k[row];
  const ulong tp = ulong(tp24[row]);
  const float mp = min_p[row];
  const ulong u = ulong(u32[row]);
  const bool k_on = k > 0 && uint(k) < V;
  const bool p_on = tp > 0;
  const bool mp_on = mp > 0.0f;

  // 2. The total mass and top_p's integer bound C = ceil(tp24 * total / 2^24).
  ulong cp = 0;
  if (p_on) {
    ulong t = 0;
    for (uint i = tid; i < V; i += ntg) {
      t += smp_fixed40(metal::precise::exp(float(logits[base + i]) - m));
    }
    t = smp_simd_sum64(t);
    if (lane == 0) {
      red_u[sg] = t;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    t = 0;
    for (uint s = 0; s < nsg; ++s) {
      t += red_u[s];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    cp = tp * (t >> 24) + ((tp * (t & 0xFFFFFFul) + 0xFFFFFFul) >> 24);
  }

  // 3. The thresholds: the smallest key v with weight(keys > v) < C, 4 bits a level.
  //    top_k: weight 1 and C = k (the k-th largest); top_p: the mass and C = cp.
  uint pre_k = 0;
  uint pre_p = 0;
  ulong ck = ulong(k > 0 ? k : 0);
  if (k_on || p_on) {
    for (int s = 28; s >= 0; s -= 4) {
      const uint hi = (s == 28) ? 0u : (0xFFFFFFFFu << uint(s + 4));
      uint ak[16];
      ulong ap[16];
      for (uint j = 0; j < 16; ++j) {
        ak[j] = 0;
        ap[j] = 0;
      }
      for (uint i = tid; i < V; i += ntg) {
        const float x = float(logits[base + i]);
        const uint key = smp_key(x);
        const uint dig = (key >> uint(s)) & 15u;
        if (k_on && ((key ^ pre_k) & hi) == 0u) {
          for (uint j = 0; j < 16; ++j) {
            ak[j] += (j == dig) ? 1u : 0u;
          }
        }
        if (p_on && ((key ^ pre_p) & hi) == 0u) {
          const ulong q = smp_fixed40(metal::precise::exp(x - m));
          for (uint j = 0; j < 16; ++j) {
            ap[j] += (j == dig) ? q : 0ul;
          }
        }
      }
      for (uint j = 0; j < 16; ++j) {
        if (k_on) {
          const uint c = simd_sum(ak[j]);
          if (lane == 0) {
            red_c[sg * 16 + j] = c;
          }
        }
        if (p_on) {
          const ulong w = smp_simd_sum64(ap[j]);
          if (lane == 0) {
            red_u[sg * 16 + j] = w;
          }
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (tid < 16) {
        uint c = 0;
        ulong w = 0;
        for (uint g = 0; g < nsg; ++g) {
          if (k_on) {
            c += red_c[g * 16 + tid];
          }
          if (p_on) {
            w += red_u[g * 16 + tid];
          }
        }
        tot_c[tid] = c;
        tot_u[tid] = w;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (k_on) {
        ulong acc = 0;
        for (int j = 15; j >= 0; --j) {
          const ulong h = ulong(tot_c[j]);
          if (acc + h >= ck) {
            ck -= acc;
            pre_k |= uint(j) << uint(s);
            break;
          }
          acc += h;
        }
      }
      if (p_on) {
        ulong acc = 0;
        for (int j = 15; j >= 0; --j) {
          const ulong h = tot_u[j];
          if (acc + h >= cp) {
            cp -= acc;
            pre_p |= uint(j) << uint(s);
            break;
          }
          acc += h;
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
  float thr = -INFINITY;
  if (k_on && p_on) {
    thr = smp_value(metal::max(pre_k, pre_p));
  } else if (k_on) {
    thr = smp_value(pre_k);
  } else if (p_on) {
    thr = smp_value(pre_p);
  }

  // 4. The kept weights per contiguous chunk of token ids, then the inverse CDF.
  const uint chunk = (V + ntg - 1) / ntg;
  const uint lo = metal::min(V, tid * chunk);
  const uint hi_end = metal::min(V, lo + chunk);
  ulong mine = 0;
  for (uint i = lo; i < hi_end; ++i) {
    mine += smp_weight(float(logits[base + i]), m, thr, mp, mp_on, invt);
  }
  part[tid] = mine;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    ulong S = 0;
    for (uint t = 0; t < ntg; ++t) {
      S += part[t];
    }
    const ulong target = (S >> 32) * u + (((S & 0xFFFFFFFFul) * u) >> 32);
    ulong acc = 0;
    uint owner = ntg - 1;
    for (uint t = 0; t < ntg; ++t) {
      if (acc + part[t] > target) {
        owner = t;
        break;
      }
      acc += part[t];
    }
    pick[0] = ulong(owner);
    pick[1] = target - acc;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (ulong(tid) == pick[0]) {
    const ulong r = pick[1];
    ulong acc = 0;
    int tok = int(lo);
    for (uint i = lo; i < hi_end; ++i) {
      acc += smp_weight(float(logits[base + i]), m, thr, mp, mp_on, invt);
      if (acc > r) {
        tok = int(i);
        break;
      }
    }
    tokens[row] = tok;
  }
