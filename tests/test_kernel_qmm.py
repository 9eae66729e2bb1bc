"""The CPU quantized-matmul kernel (mlx_ray/kernels/qmm_cpu) against MLX's own op.

Reference: ``mx.quantized_matmul`` on float32 copies of the inputs (the same
op, evaluated exactly), rounded by the comparison only. MLX's own CPU op at
float16/bfloat16 accumulates in that precision (see
``test_half_precision_more_accurate_than_mlx_native``), so it is the reference
only at float32. For the largest shapes the float32
reference is ``x @ dequantize(w).T`` (mathematically the same product, checked
against ``mx.quantized_matmul`` in ``test_dequantize_reference_agrees``) because
MLX's own op takes minutes there.

Tolerances, as max |ours - ref| / max |ref| over the output: float32 2e-5,
float16 1e-3, bfloat16 8e-3 (a few output ulps of the dtype).
"""

from __future__ import annotations

import platform
import shutil
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_ray.kernels import qmm

TOL = {mx.float32: 2e-5, mx.float16: 1e-3, mx.bfloat16: 8e-3}
DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}

active = qmm.status()["active"]
needs_kernel = pytest.mark.skipif(not active, reason=f"qmm_cpu inactive: {qmm.status()['reason']}")


def _ext():
    return qmm._get_state().ext


def make(n, k, *, bits=4, gs=64, dtype=mx.bfloat16, seed=0):
    """Quantized weights (scales/biases in `dtype`) from a random float32 matrix."""
    mx.random.seed(seed)
    w = mx.random.normal((n, k)) * 0.02
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
    s, b = s.astype(dtype), b.astype(dtype)
    mx.eval(wq, s, b)
    return wq, s, b


def reference(x, wq, s, b, *, bits=4, gs=64, big=False):
    x32, s32, b32 = x.astype(mx.float32), s.astype(mx.float32), b.astype(mx.float32)
    if big:
        return x32 @ mx.dequantize(wq, s32, b32, group_size=gs, bits=bits).T
    return mx.quantized_matmul(x32, wq, s32, b32, transpose=True, group_size=gs, bits=bits)


def rel_err(out, ref) -> float:
    out, ref = out.astype(mx.float32), ref.astype(mx.float32)
    return (mx.abs(out - ref).max() / mx.maximum(mx.abs(ref).max(), 1e-30)).item()


def kernel(x, wq, s, b, *, bits=4, gs=64):
    with qmm.force("kernel"):
        return qmm.quantized_matmul(x, wq, s, b, group_size=gs, bits=bits)


def isas() -> list[str]:
    """The SIMD paths this CPU can run (the default one first)."""
    ext = _ext()
    found = [ext.isa()]
    try:
        for name in ("avx512", "avx2", "scalar"):
            if name not in found and ext.force_isa(name):
                found.append(name)
    finally:
        ext.force_isa("auto")
    return found


def each_isa(fn):
    """fn() under every SIMD path; returns {isa: result}."""
    ext, out = _ext(), {}
    try:
        for name in isas():
            assert ext.force_isa(name)
            out[name] = mx.eval(r := fn()) or r
    finally:
        ext.force_isa("auto")
    return out


def test_kernel_is_built_where_it_can_be():
    """On Linux x86-64 with a compiler, the install must have built the extension."""
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64" and shutil.which("c++")):
        pytest.skip("kernel build only expected on Linux x86-64 with a C++ compiler")
    if qmm._env_disabled():
        pytest.skip("kernels disabled by environment")
    st = qmm.status()
    assert st["active"], st["reason"]
    assert st["isa"] in ("avx512", "avx2", "scalar")


# ----------------------------------------------------------- correctness

FIXTURE_SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]


@needs_kernel
@pytest.mark.parametrize("n,k", FIXTURE_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16, 64, 512])
def test_fixture_shapes(n, k, m):
    wq, s, b = make(n, k)
    x = mx.random.normal((m, k)).astype(mx.bfloat16)
    big = n * k * m > 50_000_000
    ref = reference(x, wq, s, b, big=big)
    if m in (1, 16):
        outs = each_isa(lambda: kernel(x, wq, s, b))
        outs.pop("scalar", None)  # the portable path is covered on small shapes
    else:
        outs = {"default": kernel(x, wq, s, b)}
    for isa, out in outs.items():
        assert rel_err(out, ref) < TOL[mx.bfloat16], isa


@needs_kernel
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 512])
def test_large_shapes(n, k, m):
    wq, s, b = make(n, k, dtype=mx.float16)
    x = mx.random.normal((m, k)).astype(mx.float16)
    assert rel_err(kernel(x, wq, s, b), reference(x, wq, s, b, big=True)) < TOL[mx.float16]


@needs_kernel
def test_dequantize_reference_agrees():
    wq, s, b = make(1536, 576, dtype=mx.float32)
    x = mx.random.normal((16, 576))
    assert rel_err(reference(x, wq, s, b, big=True), reference(x, wq, s, b)) < 1e-5


PROBLEMS = {"decode": (192, 768, 1), "tails": (100, 352, 5), "m33": (64, 1536, 33)}  # n, k, m
COMBOS = [pytest.param(bits, gs, dt, *nkm, id=f"{name}-{bits}b-g{gs}-{dn}")
          for name, nkm in PROBLEMS.items() for bits in (2, 4, 8) for gs in (32, 64, 128)
          for dn, dt in DTYPES.items() if nkm[1] % gs == 0]


@needs_kernel
@pytest.mark.parametrize("bits,gs,dtype,n,k,m", COMBOS)
def test_bits_groups_dtypes(bits, gs, dtype, n, k, m):
    wq, s, b = make(n, k, bits=bits, gs=gs, dtype=dtype)
    x = mx.random.normal((m, k)).astype(dtype)
    ref = reference(x, wq, s, b, bits=bits, gs=gs)
    for isa, out in each_isa(lambda: kernel(x, wq, s, b, bits=bits, gs=gs)).items():
        assert out.dtype == dtype and out.shape == (m, n), isa
        assert rel_err(out, ref) < TOL[dtype], isa


@needs_kernel
@pytest.mark.parametrize("xt,st", [(mx.bfloat16, mx.float32), (mx.float16, mx.bfloat16), (mx.float32, mx.float16)])
def test_mixed_dtypes_promote_like_mlx(xt, st):
    wq, s, b = make(256, 512, dtype=st)
    x = mx.random.normal((3, 512)).astype(xt)
    out = kernel(x, wq, s, b)
    native = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    assert out.dtype == native.dtype
    assert rel_err(out, reference(x, wq, s, b)) < TOL[out.dtype]


@needs_kernel
def test_f32_matches_mlx_native_op():
    wq, s, b = make(576, 1536, dtype=mx.float32)
    x = mx.random.normal((4, 1536))
    native = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    assert rel_err(kernel(x, wq, s, b), native) < TOL[mx.float32]


@needs_kernel
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_half_precision_more_accurate_than_mlx_native(dtype):
    """MLX's CPU op accumulates half-precision products in that precision; the kernel uses float32."""
    wq, s, b = make(576, 1536, dtype=dtype)
    x = mx.random.normal((4, 1536)).astype(dtype)
    native = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    ref = reference(x, wq, s, b)
    ours = rel_err(kernel(x, wq, s, b), ref)
    assert ours < TOL[dtype]
    assert ours <= rel_err(native, ref)


@needs_kernel
def test_batched_and_non_contiguous_x():
    wq, s, b = make(320, 512)
    base = mx.random.normal((2, 3, 1024)).astype(mx.bfloat16)
    cases = {
        "batched": base[..., :512],
        "strided_k": base[..., ::2],
        "transposed_batch": mx.swapaxes(base[..., 512:], 0, 1),
        "broadcast": mx.broadcast_to(base[0, 0, :512], (4, 2, 512)),
        "vector": base[1, 2, :512],
    }
    for name, x in cases.items():
        out = kernel(x, wq, s, b)
        assert out.shape == (*x.shape[:-1], 320), name
        assert rel_err(out, reference(x, wq, s, b)) < TOL[mx.bfloat16], name


@needs_kernel
def test_non_contiguous_weights():
    wq, s, b = make(256, 512, dtype=mx.float32)
    wq2, s2, b2 = wq[::2], s[::2], b[::2]  # row-strided views
    x = mx.random.normal((2, 512))
    assert rel_err(kernel(x, wq2, s2, b2), reference(x, wq2, s2, b2)) < TOL[mx.float32]


@needs_kernel
def test_thread_count_does_not_change_results():
    ext = _ext()
    wq, s, b = make(1000, 768, dtype=mx.float32)
    x = mx.random.normal((7, 768))
    threads = ext.num_threads()
    try:
        ext.set_num_threads(1)
        one = kernel(x, wq, s, b)
        ext.set_num_threads(3)
        three = kernel(x, wq, s, b)
    finally:
        ext.set_num_threads(threads)
    assert mx.array_equal(one, three).item()  # each output is computed by one thread


@needs_kernel
def test_isa_selection():
    ext = _ext()
    assert "scalar" in isas() and ext.isa() == isas()[0]
    assert not ext.force_isa("sse9")
    assert ext.isa() == isas()[0]


@needs_kernel
def test_prefill_blas_path_matches_kernel_path():
    ext = _ext()
    if ext.blas() != "openblas":
        pytest.skip("OpenBLAS not preloaded (LD_PRELOAD); the kernel serves all M")
    wq, s, b = make(576, 1536, dtype=mx.bfloat16)
    x = mx.random.normal((40, 1536)).astype(mx.bfloat16)
    old = ext.blas_min_m()
    try:
        ext.set_blas_min_m(1)
        via_blas = kernel(x, wq, s, b)
        ext.set_blas_min_m(0)
        via_kernel = kernel(x, wq, s, b)
    finally:
        ext.set_blas_min_m(old)
    ref = reference(x, wq, s, b)
    assert rel_err(via_blas, ref) < TOL[mx.bfloat16] and rel_err(via_kernel, ref) < TOL[mx.bfloat16]


@needs_kernel
def test_bad_shapes_raise():
    wq, s, b = make(64, 256)
    with pytest.raises(ValueError, match="features"):
        _ext().quantized_matmul(mx.zeros((1, 128)), wq, s, b, group_size=64, bits=4)
    with pytest.raises(ValueError, match="scales"):
        _ext().quantized_matmul(mx.zeros((1, 256)), wq, s[:, :2], b, group_size=64, bits=4)


# ----------------------------------------------------------- composition

@needs_kernel
def test_under_compile_and_in_a_larger_graph():
    w1, s1, b1 = make(512, 256, dtype=mx.float32, seed=1)
    w2, s2, b2 = make(256, 512, dtype=mx.float32, seed=2)

    def mlp(x):
        h = nn.silu(qmm.quantized_matmul(mx.tanh(x), w1, s1, b1))
        return qmm.quantized_matmul(h * 2.0, w2, s2, b2) + x

    x = mx.random.normal((5, 256))
    with qmm.force("reference"):
        want = mlp(x)
    with qmm.force("kernel"):
        eager = mlp(x)
        compiled = mx.compile(mlp)
        got1, got2 = compiled(x), compiled(x + 1.0)
        mx.async_eval(got1, got2)
        mx.eval(got1, got2)
    with qmm.force("reference"):
        want2 = mlp(x + 1.0)
    for out, ref in ((eager, want), (got1, want), (got2, want2)):
        assert rel_err(out, ref) < 1e-4


@needs_kernel
def test_on_a_second_stream():
    wq, s, b = make(576, 576, dtype=mx.float32)
    x = mx.random.normal((3, 576))
    s2 = mx.new_stream(mx.cpu)
    with mx.stream(s2):
        a = kernel(x, wq, s, b)
    b_default = kernel(x * 2, wq, s, b)
    mx.eval(a, b_default)  # both streams in flight through one pool
    assert rel_err(a, reference(x, wq, s, b)) < TOL[mx.float32]
    assert rel_err(b_default, reference(x * 2, wq, s, b)) < TOL[mx.float32]
    assert rel_err(_ext().quantized_matmul(x, wq, s, b, group_size=64, bits=4, stream=s2),
                   reference(x, wq, s, b)) < TOL[mx.float32]


# ------------------------------------------------- dispatch and fallbacks

@pytest.fixture
def fresh_state(monkeypatch):
    """Re-read the switches for one test, and restore the real state afterwards."""
    qmm.reset()
    yield monkeypatch
    monkeypatch.undo()
    qmm.reset()


def _assert_reference_path():
    wq, s, b = make(64, 256)
    x = mx.random.normal((2, 256)).astype(mx.bfloat16)
    out = qmm.quantized_matmul(x, wq, s, b)
    assert mx.array_equal(out, mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)).item()


def test_fallback_when_extension_is_absent(fresh_state):
    def missing():
        raise ImportError("simulated: no compiled extension")

    fresh_state.setattr(qmm, "_import_extension", missing)
    st = qmm.status()
    assert not st["active"] and "not importable" in st["reason"] and "simulated" in st["reason"]
    _assert_reference_path()
    with pytest.raises(RuntimeError, match="unavailable"):
        with qmm.force("kernel"):
            pass


@pytest.mark.parametrize("env", [{"MLX_RAY_KERNELS": "0"}, {"MLX_RAY_KERNELS_DISABLE": "other,qmm_cpu"}])
def test_off_switches(fresh_state, env):
    for key, value in env.items():
        fresh_state.setenv(key, value)
    st = qmm.status()
    assert not st["active"] and "disabled by" in st["reason"]
    _assert_reference_path()
    assert qmm.patch_model(_tiny_quantized_model()) == 0


@needs_kernel
def test_disabling_another_kernel_keeps_this_one(fresh_state):
    fresh_state.setenv("MLX_RAY_KERNELS_DISABLE", "some_metal_kernel")
    assert qmm.status()["active"]


def test_unsupported_cases_use_mlx_op():
    wq, s, b = make(64, 256)
    assert qmm._kernel_for(wq, s, b, 64, 4, transpose=False) is None
    assert qmm._kernel_for(wq, s, None, 64, 4, transpose=True) is None
    assert qmm._kernel_for(wq, s, b, 64, 3, transpose=True) is None
    with qmm.force("reference"):
        assert qmm._kernel_for(wq, s, b, 64, 4, transpose=True) is None


@needs_kernel
def test_not_used_off_cpu(monkeypatch):
    """No GPU here: simulate a non-CPU default device (the kernel must step aside)."""
    wq, s, b = make(64, 256)
    monkeypatch.setattr(qmm, "_on_cpu", lambda: False)
    assert qmm._kernel_for(wq, s, b, 64, 4, transpose=True) is None
    assert not qmm.status()["active"]


# ------------------------------------------------------------ model patching

def _tiny_quantized_model():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512,
                           tie_word_embeddings=True, rope_theta=10000.0)
    mx.random.seed(3)
    model = llama.Model(args)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


@needs_kernel
def test_patch_model_routes_layers_and_matches():
    model = _tiny_quantized_model()
    n_quantized = sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    tokens = mx.array([[1, 5, 9, 42, 7]])
    want = model(tokens)
    assert qmm.patch_model(model) == n_quantized == 2 * 7 + 1
    assert isinstance(model.model.embed_tokens, qmm.KernelQuantizedEmbedding)
    got = model(tokens)
    assert rel_err(got, want) < 1e-4
    with qmm.force("reference"):
        assert mx.array_equal(model(tokens), want).item()
    assert qmm.unpatch_model(model) == n_quantized
    assert type(model.model.embed_tokens) is nn.QuantizedEmbedding
