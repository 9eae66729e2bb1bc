// Copyright 2026 mlx-ray authors. Apache-2.0.
//
// Python bindings. Built with NB_DOMAIN mlx and the nanobind ABI of mlx.core,
// so mx.array / mx.Stream cross the boundary as MLX's own objects.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "mlx/version.h"
#include "paged_attention.h"
#include "qmm_cpu.h"
#include "sampler.h"
#include "thread_pool.h"

namespace nb = nanobind;
using namespace nb::literals;

#define MLX_RAY_STR2(x) #x
#define MLX_RAY_STR(x) MLX_RAY_STR2(x)

NB_MODULE(_qmm_cpu, m) {
  m.doc() = "mlx-ray: multithreaded SIMD affine-quantized matmul for MLX CPU streams";
  m.attr("mlx_version") =
      MLX_RAY_STR(MLX_VERSION_MAJOR) "." MLX_RAY_STR(MLX_VERSION_MINOR) "." MLX_RAY_STR(MLX_VERSION_PATCH);

  m.def("quantized_matmul", &mlx_ray::quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, nb::kw_only(),
        "group_size"_a = 64, "bits"_a = 4, "stream"_a = nb::none(),
        "x @ dequantize(w).T for MLX's affine layout (transpose=True), on CPU streams.");
  m.def("dense_matmul", &mlx_ray::dense_matmul, "x"_a, "w"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x @ w.T for float weights on CPU streams (decode-sized M; batch-invariant rows).");
  m.def("set_dense_max_m", &mlx_ray::set_dense_max_m, "m"_a, "Rows up to which dense_matmul is used; <= 0: never.");
  m.def("dense_max_m", &mlx_ray::dense_max_m);
  m.def("sample", &mlx_ray::sample, "logits"_a, "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a, "uniforms"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "Batched sampling over (B, V) logits with per-row temperature/top_k/top_p/min_p and given uniforms "
        "(see mlx_ray/kernels/sampler.py); CPU streams only.");
  m.def("mlx_exp", &mlx_ray::mlx_exp_array, "x"_a, "MLX's CPU float32 exp as the sampler computes it (tests).");
  m.def("sampler_isa", &mlx_ray::sampler_isa, "The sampler's build in use: 'avx2' or 'base'.");
  m.def("sampler_force_isa", &mlx_ray::sampler_force_isa, "isa"_a,
        "Select the sampler's build: 'auto', 'avx2' or 'base'; False if unsupported.");
  m.def("paged_attention", &mlx_ray::paged_attention, "queries"_a, "k_cache"_a, "v_cache"_a, "block_tables"_a,
        "context_lens"_a, "k_scales"_a = nb::none(), "k_biases"_a = nb::none(), "v_scales"_a = nb::none(),
        "v_biases"_a = nb::none(), nb::kw_only(), "scale"_a, "block_size"_a, "bits"_a = nb::none(),
        "group_size"_a = 64, "stream"_a = nb::none(),
        "Paged attention on CPU streams: queries [B, Hq, L, D] against K/V read in place from a block pool "
        "(see mlx_ray/kernels/paged_attention.py for the contract).");
  m.def("paged_attention_isa", &mlx_ray::paged_attention_isa, "The paged-attention build in use (follows force_isa).");
  m.def("isa", &mlx_ray::isa_name, "The SIMD path in use: 'avx512', 'avx2' or 'scalar'.");
  m.def("force_isa", &mlx_ray::force_isa, "isa"_a, "Select 'auto', 'avx512', 'avx2' or 'scalar'; False if unsupported.");
  m.def("blas", &mlx_ray::blas_name, "'openblas' when a fast sgemm is loaded (prefill path), else 'none'.");
  m.def("set_blas_min_m", &mlx_ray::set_blas_min_m, "m"_a, "Rows from which dequantize+sgemm is used; <= 0: never.");
  m.def("blas_min_m", &mlx_ray::blas_min_m);
  m.def(
      "set_num_threads", [](int n) { mlx_ray::qmm::ThreadPool::instance().set_num_threads(n); }, "n"_a,
      "Threads used by the kernel (<= 0: all CPUs available to this process).");
  m.def("num_threads", [] { return mlx_ray::qmm::ThreadPool::instance().num_threads(); });
  m.def(
      "set_spin_us", [](int us) { mlx_ray::qmm::ThreadPool::instance().set_spin_us(us); }, "us"_a,
      "How long idle kernel threads spin before sleeping.");
}
