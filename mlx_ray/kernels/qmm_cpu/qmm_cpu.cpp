// Copyright 2026 mlx-ray authors. Apache-2.0.
#include "qmm_cpu.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <stdexcept>

#include "kernel.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "thread_pool.h"

namespace mlx_ray {

using namespace mlx_ray::qmm;

namespace {

// ---------------------------------------------------------------- ISA / BLAS

enum class Isa { scalar, avx2, avx512 };

bool cpu_has(Isa isa) {
#if defined(MLX_RAY_HAVE_AVX2_TU)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == Isa::avx2) return avx2;
  if (isa == Isa::avx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
  return isa == Isa::scalar;
}

Isa best_isa() {
  return cpu_has(Isa::avx512) ? Isa::avx512 : cpu_has(Isa::avx2) ? Isa::avx2 : Isa::scalar;
}

std::atomic<int> g_isa{int(best_isa())};

// Only a fast BLAS is worth the dequantize+sgemm detour: the mlx-cpu wheel's
// bundled netlib BLAS is ~30x slower, so we look for OpenBLAS in the global
// namespace (it is there when preloaded, see mlx_ray/blas.py).
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);

SgemmFn find_sgemm() {
  if (!dlsym(RTLD_DEFAULT, "openblas_get_config")) return nullptr;
  return reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "cblas_sgemm"));
}

SgemmFn sgemm() {
  static SgemmFn fn = find_sgemm();
  return fn;
}

// Measured by bench/kernel_micro.py: below this M the kernel beats
// dequantize + OpenBLAS sgemm on the shapes here.
std::atomic<int> g_blas_min_m{[] {
  const char* env = std::getenv("MLX_RAY_QMM_BLAS_MIN_M");
  return env ? std::atoi(env) : 128;
}()};

DT to_dt(mx::Dtype t) {
  if (t == mx::float32) return DT::f32;
  if (t == mx::float16) return DT::f16;
  if (t == mx::bfloat16) return DT::bf16;
  throw std::invalid_argument("[mlx_ray.qmm_cpu] dtype must be float32, float16 or bfloat16.");
}

struct AlignedFree {
  void operator()(float* p) const {
    std::free(p);
  }
};
using Buf = std::unique_ptr<float, AlignedFree>;
Buf alloc_f(int64_t n) {
  size_t bytes = size_t(std::max<int64_t>(n, 16)) * sizeof(float);
  bytes = (bytes + 63) / 64 * 64;
  return Buf(static_cast<float*>(std::aligned_alloc(64, bytes)));
}

// Contiguous copy of a 2-D array of 2- or 4-byte elements (rare layouts only).
std::vector<char> gather_2d(const mx::array& a) {
  const int64_t R = a.shape(0), C = a.shape(1), isz = a.itemsize();
  std::vector<char> dst(size_t(R * C * isz));
  const char* src = a.data<char>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c)
      std::memcpy(dst.data() + (r * C + c) * isz, src + (r * a.strides(0) + c * a.strides(1)) * isz, isz);
  return dst;
}

// Splits [0, n) into about `parts` ranges aligned to `align` and runs them on the pool.
template <class F>
void parallel_ranges(int n, int align, F&& body) {
  auto& pool = ThreadPool::instance();
  const int T = pool.num_threads();
  const int units = (n + align - 1) / align;
  // Fine-grained tasks, claimed dynamically: a worker that gets descheduled on a
  // busy machine holds back only a small piece of the product.
  const int ntasks = std::max(1, std::min(units, T == 1 ? 1 : 16 * T));
  const int per = (units + ntasks - 1) / ntasks;
  const int real = (units + per - 1) / per;
  pool.parallel_for(real, [&](int t) {
    const int a = t * per * align;
    const int b = std::min(n, (t + 1) * per * align);
    if (a < b) body(a, b);
  });
}

void run(const mx::array& x, const mx::array& w_in, const mx::array& s_in, const mx::array& b_in, mx::array& out,
         int group_size, int bits) {
  Problem p{};
  p.N = int(w_in.shape(0));
  p.K = int(x.shape(-1));
  p.M = p.N ? int(out.size() / p.N) : 0;
  p.bits = bits;
  p.group_size = group_size;
  p.G = p.K / group_size;
  if (p.M == 0 || p.N == 0) return;

  // Weights: rows must be contiguous along K.
  std::vector<char> w_copy;
  if (w_in.strides(1) == 1) {
    p.w = w_in.data<uint32_t>();
    p.w_ld = w_in.strides(0);
  } else {
    w_copy = gather_2d(w_in);
    p.w = reinterpret_cast<const uint32_t*>(w_copy.data());
    p.w_ld = w_in.shape(1);
  }
  // Scales and biases must share one layout.
  std::vector<char> s_copy, b_copy;
  p.sb_dt = to_dt(s_in.dtype());
  if (s_in.strides() == b_in.strides()) {
    p.scales = s_in.data<char>();
    p.biases = b_in.data<char>();
    p.sb_ld0 = s_in.strides(0);
    p.sb_ld1 = s_in.strides(1);
  } else {
    s_copy = gather_2d(s_in);
    b_copy = gather_2d(b_in);
    p.scales = s_copy.data();
    p.biases = b_copy.data();
    p.sb_ld0 = p.G;
    p.sb_ld1 = 1;
  }
  p.out = out.data<void>();
  p.out_dt = to_dt(out.dtype());

  // Row offsets of x (any leading shape and strides).
  std::vector<int64_t> row_off(p.M);
  {
    const int nd = int(x.ndim()) - 1;
    std::vector<int64_t> idx(std::max(nd, 0), 0);
    for (int m = 0; m < p.M; ++m) {
      int64_t off = 0;
      for (int d = 0; d < nd; ++d) off += idx[d] * x.strides(d);
      row_off[m] = off;
      for (int d = nd - 1; d >= 0; --d) {
        if (++idx[d] < x.shape(d)) break;
        idx[d] = 0;
      }
    }
  }
  XView xv{x.data<char>(), to_dt(x.dtype()), int64_t(x.strides(-1)), row_off.data()};

  auto& pool = ThreadPool::instance();
  const int min_m = g_blas_min_m.load();
  SgemmFn gemm = (min_m > 0 && p.M >= min_m) ? sgemm() : nullptr;

  if (gemm) {
    // Prefill: dequantize slabs of W to float and let OpenBLAS multiply.
    p.Kp = p.K;
    Buf xf = alloc_f(int64_t(p.M) * p.K), xs = alloc_f(int64_t(p.M) * p.G);
    parallel_ranges(p.M, 1, [&](int a, int b) { pack_scalar(xv, p, xf.get(), xs.get(), a, b); });
    Buf of;
    float* outf = static_cast<float*>(p.out);
    if (p.out_dt != DT::f32) {
      of = alloc_f(int64_t(p.M) * p.N);
      outf = of.get();
    }
    const int nc = std::max(64, std::min(p.N, int((8 << 20) / (int64_t(p.K) * 4))));
    Buf wf = alloc_f(int64_t(nc) * p.K);
    for (int n0 = 0; n0 < p.N; n0 += nc) {
      const int n1 = std::min(p.N, n0 + nc);
      parallel_ranges(n1 - n0, 8, [&](int a, int b) {
        dequantize_rows(p, wf.get() + int64_t(a) * p.K, n0 + a, n0 + b);
      });
      // RowMajor=101, NoTrans=111, Trans=112
      gemm(101, 111, 112, p.M, n1 - n0, p.K, 1.f, xf.get(), p.K, wf.get(), p.K, 0.f, outf + n0, p.N);
    }
    if (of) {
      const int64_t total = int64_t(p.M) * p.N;
      parallel_ranges(int(std::min<int64_t>(total, INT32_MAX)), 1024, [&](int a, int b) {
        for (int64_t i = a; i < b; ++i) store_f(p.out, i, p.out_dt, outf[i]);
      });
    }
    return;
  }

  PackFn pack = pack_scalar;
  RowsFn rows = rows_scalar;
  p.Kp = padded_k_scalar(p);
#if defined(MLX_RAY_HAVE_AVX2_TU)
  if (g_isa.load() == int(Isa::avx512)) {
    pack = pack_avx512;
    rows = rows_avx512;
    p.Kp = padded_k_avx512(p);
  } else if (g_isa.load() == int(Isa::avx2)) {
    pack = pack_avx2;
    rows = rows_avx2;
    p.Kp = padded_k_avx2(p);
  }
#endif
  Buf xp = alloc_f(int64_t(p.M) * p.Kp), xs = alloc_f(int64_t(p.M) * p.G);
  p.xp = xp.get();
  p.xsum = xs.get();
  if (p.M >= 8) {
    parallel_ranges(p.M, 1, [&](int a, int b) { pack(xv, p, xp.get(), xs.get(), a, b); });
  } else {
    pack(xv, p, xp.get(), xs.get(), 0, p.M);
  }
  (void)pool;
  parallel_ranges(p.N, 4, [&](int a, int b) { rows(p, a, b, 0, p.M); });
}

// Rows up to which the Python dispatch (mlx_ray/kernels/dense.py, which sets it from
// MLX_RAY_DENSE_MAX_M) uses the dense kernel rather than MLX's matmul.
std::atomic<int> g_dense_max_m{32};

void run_dense(const mx::array& x, const mx::array& w, mx::array& out) {
  DenseProblem p{};
  p.N = int(w.shape(0));
  p.K = int(w.shape(1));
  p.M = p.N ? int(out.size() / p.N) : 0;
  if (p.M == 0 || p.N == 0) return;
  if (p.K == 0) {  // an empty sum
    std::memset(out.data<char>(), 0, out.nbytes());
    return;
  }
  std::vector<char> w_copy;
  if (w.strides(1) == 1) {
    p.w = w.data<char>();
    p.w_ld = w.strides(0);
  } else {
    w_copy = gather_2d(w);
    p.w = w_copy.data();
    p.w_ld = p.K;
  }
  p.w_dt = to_dt(w.dtype());
  p.out = out.data<void>();
  p.out_dt = to_dt(out.dtype());
  // Activations as contiguous float32 rows: used in place when they already are.
  Buf xf;
  const bool direct = x.dtype() == mx::float32 && x.flags().row_contiguous;
  if (direct) {
    p.x = x.data<float>();
  } else {
    xf = alloc_f(int64_t(p.M) * p.K);
    const DT xdt = to_dt(x.dtype());
    const int64_t isz = x.itemsize();
    const int nd = int(x.ndim()) - 1;
    std::vector<int64_t> idx(std::max(nd, 0), 0);
    for (int m = 0; m < p.M; ++m) {
      int64_t off = 0;
      for (int d = 0; d < nd; ++d) off += idx[d] * x.strides(d);
      const char* src = x.data<char>() + off * isz;
      for (int k = 0; k < p.K; ++k) xf.get()[int64_t(m) * p.K + k] = load_f(src + k * x.strides(nd) * isz, xdt);
      for (int d = nd - 1; d >= 0; --d) {
        if (++idx[d] < x.shape(d)) break;
        idx[d] = 0;
      }
    }
    p.x = xf.get();
  }
  p.x_ld = p.K;
  DenseRowsFn rows = dense_rows_scalar;
  int align = 1;
#if defined(MLX_RAY_HAVE_AVX2_TU)
  if (g_isa.load() == int(Isa::avx512)) {
    rows = dense_rows_avx512;
    align = 24;  // whole tiles of both the M == 1 (8 rows) and M > 1 (6 rows) paths
  } else if (g_isa.load() == int(Isa::avx2)) {
    rows = dense_rows_avx2;
    align = 4;
  }
#endif
  parallel_ranges(p.N, align, [&](int a, int b) { rows(p, a, b); });
}

// Allocates `out` and queues `body(inputs, out)` on the stream's CPU command
// encoder, as MLX's own CPU ops do (the encoder keeps the buffers alive).
template <class Body>
void enqueue(const mx::Stream& stream, const std::vector<mx::array>& inputs, mx::array& out, Body body) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream);
  std::vector<mx::array> ins;
  for (auto& in : inputs) {
    enc.set_input_array(in);
    ins.push_back(mx::array::unsafe_weak_copy(in));
  }
  enc.set_output_array(out);
  enc.dispatch([ins = std::move(ins), out = mx::array::unsafe_weak_copy(out), body]() mutable { body(ins, out); });
}

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("[mlx_ray.qmm_cpu] " + msg);
}

}  // namespace

// ------------------------------------------------------------------- the op

mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device.type != mx::Device::DeviceType::cpu) {
    // Never run on GPU devices: MLX's own Metal/CUDA kernels serve there.
    return mx::quantized_matmul(x, w, scales, biases, true, group_size, bits, "affine", stream);
  }
  check(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8.");
  check(group_size == 32 || group_size == 64 || group_size == 128, "group_size must be 32, 64 or 128.");
  check(w.dtype() == mx::uint32 && w.ndim() == 2, "w must be a 2-D uint32 array of packed weights.");
  check(x.ndim() >= 1, "x must have at least one dimension.");
  const int N = w.shape(0);
  const int K = w.shape(1) * (32 / bits);
  std::ostringstream msg;
  msg << "x has " << x.shape(-1) << " features but w holds " << K << ".";
  check(x.shape(-1) == K, msg.str());
  check(K % group_size == 0, "K must be a multiple of group_size.");
  const mx::Shape sb_shape{N, K / group_size};
  check(scales.shape() == sb_shape && biases.shape() == sb_shape, "scales and biases must have shape (N, K / group_size).");
  for (auto t : {x.dtype(), scales.dtype(), biases.dtype()}) {
    check(t == mx::float32 || t == mx::float16 || t == mx::bfloat16, "x, scales and biases must be float32, float16 or bfloat16.");
  }
  // Output dtype as in MLX: promote(x, scales); all arithmetic is float32.
  const auto out_dtype = mx::promote_types(x.dtype(), scales.dtype());
  auto b = biases.dtype() == scales.dtype() ? biases : mx::astype(biases, scales.dtype(), stream);
  auto out_shape = x.shape();
  out_shape.back() = N;
  return mx::array(
      std::move(out_shape),
      out_dtype,
      std::make_shared<QuantizedMatmulCpu>(stream, group_size, bits),
      {x, w, scales, b});
}

void QuantizedMatmulCpu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const int gs = group_size_, bits = bits_;
  enqueue(stream(), inputs, out, [gs, bits](std::vector<mx::array>& in, mx::array& o) {
    run(in[0], in[1], in[2], in[3], o, gs, bits);
  });
}

void QuantizedMatmulCpu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mlx_ray.qmm_cpu] this primitive runs on CPU streams only.");
}

bool QuantizedMatmulCpu::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const QuantizedMatmulCpu&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

std::vector<mx::Shape> QuantizedMatmulCpu::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0);
  return {shape};
}

// ------------------------------------------------------------- dense op

mx::array dense_matmul(const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device.type != mx::Device::DeviceType::cpu) {
    return mx::matmul(x, mx::transpose(w, stream), stream);
  }
  check(w.ndim() == 2, "w must be a 2-D array (out_features, in_features).");
  check(x.ndim() >= 1, "x must have at least one dimension.");
  std::ostringstream msg;
  msg << "x has " << x.shape(-1) << " features but w has " << w.shape(1) << ".";
  check(x.shape(-1) == w.shape(1), msg.str());
  for (auto t : {x.dtype(), w.dtype()}) {
    check(t == mx::float32 || t == mx::float16 || t == mx::bfloat16, "x and w must be float32, float16 or bfloat16.");
  }
  auto out_shape = x.shape();
  out_shape.back() = w.shape(0);
  return mx::array(std::move(out_shape), mx::promote_types(x.dtype(), w.dtype()),
                   std::make_shared<DenseMatmulCpu>(stream), {x, w});
}

void DenseMatmulCpu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  enqueue(stream(), inputs, out, [](std::vector<mx::array>& in, mx::array& o) { run_dense(in[0], in[1], o); });
}

void DenseMatmulCpu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mlx_ray.dense_cpu] this primitive runs on CPU streams only.");
}

std::vector<mx::Shape> DenseMatmulCpu::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0);
  return {shape};
}

void set_dense_max_m(int m) {
  g_dense_max_m = m;
}

int dense_max_m() {
  return g_dense_max_m.load();
}

// ------------------------------------------------------------ configuration

std::string isa_name() {
  const int isa = g_isa.load();
  return isa == int(Isa::avx512) ? "avx512" : isa == int(Isa::avx2) ? "avx2" : "scalar";
}

bool force_isa(const std::string& name) {
  if (name == "auto") {
    g_isa = int(best_isa());
    return true;
  }
  const Isa isa = name == "avx512" ? Isa::avx512 : name == "avx2" ? Isa::avx2 : Isa::scalar;
  if ((name != "scalar" && isa == Isa::scalar) || !cpu_has(isa)) return false;
  g_isa = int(isa);
  return true;
}

std::string blas_name() {
  return sgemm() ? "openblas" : "none";
}

void set_blas_min_m(int m) {
  g_blas_min_m = m;
}

int blas_min_m() {
  return g_blas_min_m.load();
}

}  // namespace mlx_ray
