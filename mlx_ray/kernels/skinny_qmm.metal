// skinny_qmm: y[M, N] = x[M, K] @ dequantize(w, scales, biases)[N, K].T for a few rows (M <= MB <= 32),
// MLX's affine layout: w[N, K * BITS / 32] uint32, value j of a word at bits [j * BITS, (j + 1) * BITS),
// scales / biases[N, K / GS], weight = scale * q + bias.
//
// One SIMD group owns NC output columns (weight rows) and walks all of K: each lane takes VPL = 8
// consecutive values at a time (one 4-bit word or two 8-bit words; consecutive lanes read consecutive
// words), decodes them once, and applies them to every row of x, so each weight word is read from memory
// once per call and dequantized once for all M rows. Per group slice: scale * dot(q, x) + bias * sum(x).
// Each thread keeps NC * MB float accumulators; simd_sum reduces each over the 32 lanes at the end.
//
// Template: OT (output type), BITS (4 or 8), GS (group size 32, 64 or 128), MB (row capacity), NC.
// Inputs m_rows, n_cols, k_dim are 0-d int32 (constant); K is a multiple of GS (MLX requires it).
// Dispatch: threadgroup (32 * simdgroups, 1, 1); grid x = threadgroup x * ceil(N / (simdgroups * NC)).

constexpr int PACK = 32 / BITS;  // values per word
constexpr int VPL = 8;           // values per lane per step; GS >= 32, so they share one group
constexpr int WPL = VPL / PACK;  // words per lane per step
constexpr uint MASK = (1u << BITS) - 1u;

const int M = m_rows;
const int N = n_cols;
const int K = k_dim;
const int lane = int(thread_index_in_simdgroup);
const int n0 = (int(threadgroup_position_in_grid.x) * int(simdgroups_per_threadgroup)
                + int(simdgroup_index_in_threadgroup)) * NC;
if (n0 >= N) {
  return;  // a whole SIMD group past the last column (uniform within the group)
}
const int words = K / PACK;
const int groups = K / GS;

float acc[NC][MB];
for (int c = 0; c < NC; c++) {
  for (int m = 0; m < MB; m++) {
    acc[c][m] = 0.0f;
  }
}

for (int k = lane * VPL; k < K; k += 32 * VPL) {
  float q[NC][VPL];
  float s[NC];
  float b[NC];
  for (int c = 0; c < NC; c++) {
    // Columns past N (the last group's tail) recompute column N - 1 and are never written.
    const size_t n = size_t(metal::min(n0 + c, N - 1));
    for (int j = 0; j < WPL; j++) {
      const uint word = w[n * words + k / PACK + j];
      for (int p = 0; p < PACK; p++) {
        q[c][j * PACK + p] = float((word >> (p * BITS)) & MASK);
      }
    }
    const size_t g = n * groups + k / GS;
    s[c] = static_cast<float>(scales[g]);
    b[c] = static_cast<float>(biases[g]);
  }
  for (int m = 0; m < MB; m++) {
    if (m < M) {
      float xv[VPL];
      float xsum = 0.0f;
      for (int i = 0; i < VPL; i++) {
        xv[i] = static_cast<float>(x[size_t(m) * K + k + i]);
        xsum += xv[i];
      }
      for (int c = 0; c < NC; c++) {
        float d = 0.0f;
        for (int i = 0; i < VPL; i++) {
          d += q[c][i] * xv[i];
        }
        acc[c][m] += s[c] * d + b[c] * xsum;
      }
    }
  }
}

for (int c = 0; c < NC; c++) {
  const int n = n0 + c;
  for (int m = 0; m < MB; m++) {
    if (m < M) {
      const float v = simd_sum(acc[c][m]);
      if (lane == (m & 31) && n < N) {
        y[size_t(m) * N + n] = static_cast<OT>(v);
      }
    }
  }
}
