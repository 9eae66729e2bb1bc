"""The CPU dense small-M matmul (``dense_matmul`` in mlx_ray/kernels/qmm_cpu, dispatch in mlx_ray/kernels/dense.py).

Reference: MLX's own ``x.astype(f32) @ w.astype(f32).T`` (the same product on
the same float32 values), rounded by the comparison only. The kernel sums in a
different order than OpenBLAS, so results agree to float32 rounding, not bits.

Tolerances, as max |ours - ref| / max |ref| over the output: float32 2e-5,
float16 1e-3, bfloat16 8e-3 (a few output ulps of the dtype), as for the
quantized kernel (tests/test_kernel_qmm.py).

Bit-exact properties (batch invariance, thread count, layout) compare the
kernel with itself: each output is one float32 accumulator walking K in a fixed
order, whatever the batch, the tile, the thread or the input layout.
"""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_ray.kernels import dense, qmm

TOL = {mx.float32: 2e-5, mx.float16: 1e-3, mx.bfloat16: 8e-3}
DTYPES = {"f32": mx.float32, "bf16": mx.bfloat16, "f16": mx.float16}

pytestmark = pytest.mark.skipif(not dense.status()["active"], reason=f"dense_cpu inactive: {dense.status()['reason']}")

EXT = dense._get_state().ext  # the compiled module; stays importable while a test switches the kernel off


def promote(a, b):
    """MLX's result dtype for a binary op on dtypes a and b."""
    return (mx.zeros((1,), a) + mx.zeros((1,), b)).dtype


def make(shape, dtype=mx.float32, *, seed=0):
    mx.random.seed(seed)
    a = mx.random.normal(shape).astype(dtype)
    mx.eval(a)
    return a


def reference(x, w):
    return x.astype(mx.float32) @ w.astype(mx.float32).T


def rel_err(out, ref) -> float:
    out, ref = out.astype(mx.float32), ref.astype(mx.float32)
    return (mx.abs(out - ref).max() / mx.maximum(mx.abs(ref).max(), 1e-30)).item()


def kernel(x, w):
    out = EXT.dense_matmul(x, w)
    mx.eval(out)
    return out


def equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a, b).item()


def supported_isas() -> list[str]:
    """The SIMD paths this CPU can run, the automatic choice first (force_isa says False for the others)."""
    if EXT is None:
        return []
    default = EXT.isa()
    try:
        return [default] + [n for n in ("avx512", "avx2", "scalar") if n != default and EXT.force_isa(n)]
    finally:
        EXT.force_isa("auto")


ISAS = supported_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test under one SIMD path; restores the automatic choice afterwards."""
    try:
        assert EXT.force_isa(request.param)
        assert EXT.isa() == request.param
        yield request.param
    finally:
        EXT.force_isa("auto")


@pytest.fixture
def threads():
    """Lets a test change the kernel's thread count; restores it afterwards."""
    old = EXT.num_threads()
    try:
        yield EXT
    finally:
        EXT.set_num_threads(old)


def test_isa_list_and_restore():
    assert "scalar" in ISAS and ISAS[0] == EXT.isa()
    assert not EXT.force_isa("sse9")
    assert EXT.isa() == ISAS[0]


# ----------------------------------------------------------- correctness

MS = [1, 2, 3, 5, 16, 17, 33]
AWKWARD = [(1, 7), (5, 100), (25, 577), (49, 7), (577, 100), (49, 577)]  # (n, k): tails of every tile size


@pytest.mark.parametrize("xt", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("wt", DTYPES.values(), ids=DTYPES.keys())
def test_awkward_shapes_all_dtypes(isa, wt, xt):
    out_dt = promote(xt, wt)
    for n, k in AWKWARD:
        w = make((n, k), wt, seed=n + k)
        xs = make((max(MS), k), xt, seed=k)
        for m in MS:
            x = xs[:m]
            out = kernel(x, w)
            assert out.dtype == out_dt == (x @ w.T).dtype and out.shape == (m, n), (n, k, m)
            assert rel_err(out, reference(x, w)) < TOL[out_dt], (isa, n, k, m)


@pytest.mark.parametrize("wt", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n,k", [(576, 576), (1536, 576)])
def test_realistic_shapes(isa, n, k, wt):
    w = make((n, k), wt, seed=1)
    x = make((33, k), mx.float32, seed=2)
    for m in (1, 5, 16, 33):
        assert rel_err(kernel(x[:m], w), reference(x[:m], w)) < TOL[mx.float32], (isa, m)
    xb = x.astype(mx.bfloat16)
    assert rel_err(kernel(xb[:4], w), reference(xb[:4], w)) < TOL[promote(mx.bfloat16, wt)]


def test_matches_mlx_matmul_but_not_bitwise():
    """Same product as MLX's matmul to float32 rounding, yet a different sum order (dispatch tests rely on it)."""
    w, x = make((577, 577), seed=4), make((5, 577), seed=5)
    ours, mlx = kernel(x, w), x @ w.T
    assert rel_err(ours, mlx) < TOL[mx.float32]
    assert not mx.array_equal(ours, mlx).item()


def test_zero_rows_and_columns():
    w, x = make((3, 8)), make((2, 8))
    assert kernel(x[:0], w).shape == (0, 3)
    assert kernel(x, w[:0]).shape == (2, 0)


def test_zero_features_does_not_crash():
    """x (2, 0) @ w (3, 0).T is a (2, 3) array of zeros; run in a child so a crash cannot take pytest down."""
    code = ("import mlx.core as mx; from mlx_ray.kernels import dense; "
            "out = dense._get_state().ext.dense_matmul(mx.zeros((2, 0)), mx.zeros((3, 0))); "
            "assert mx.array_equal(out, mx.zeros((2, 3))).item(), out")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode} {proc.stderr[-300:]}"


# ------------------------------------------------- bit-exact invariances

# (n, k, ms): the last case has K = 4100, so activation rows come in chunks of 28
# and M = 29 leaves a one-row chunk (the M == 1 tiles) at the end.
INVARIANCE = [(49, 100, (2, 3, 5, 17)), (577, 577, (16, 33)), (37, 4100, (29,))]


@pytest.mark.parametrize("wt", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
def test_batch_invariance_bit_exact(isa, wt):
    for n, k, ms in INVARIANCE:
        w = make((n, k), wt, seed=n)
        for m in ms:
            x = make((m, k), mx.float32, seed=m)
            batch = kernel(x, w)
            for i in range(m):
                assert equal(batch[i:i + 1], kernel(x[i:i + 1], w)), (isa, n, k, m, i)
            # and inside a larger batch of other rows
            assert equal(kernel(mx.concatenate([make((3, k), seed=99), x]), w)[3:], batch), (isa, n, k, m)


def test_thread_count_bit_exact(isa, threads):
    w, x = make((577, 577), mx.bfloat16, seed=6), make((17, 577), seed=7)
    threads.set_num_threads(1)
    one = kernel(x, w)
    threads.set_num_threads(2)
    two = kernel(x, w)
    threads.set_num_threads(3)
    three = kernel(x, w)
    assert equal(one, two) and equal(one, three), isa
    assert rel_err(one, reference(x, w)) < TOL[mx.float32]


# ----------------------------------------------------------- layouts

def test_x_layouts_match_contiguous_bit_exact():
    w = make((49, 100), mx.bfloat16, seed=8)
    base = make((2, 3, 200), mx.float32, seed=9)
    cases = {
        "batched_3d": base[..., :100],
        "row_offset": base.reshape(6, 200)[2:5, 100:],
        "strided_k": base[..., ::2],
        "transposed_batch": mx.swapaxes(base[..., 100:], 0, 1),
        "transposed_2d": make((100, 5), seed=10).T,
        "broadcast": mx.broadcast_to(base[0, 0, :100], (4, 2, 100)),
        "vector": base[1, 2, :100],
        "bf16_view": base.astype(mx.bfloat16)[..., 1::2],
    }
    for name, x in cases.items():
        out = kernel(x, w)
        assert out.shape == (*x.shape[:-1], 49), name
        assert rel_err(out, reference(x, w)) < TOL[out.dtype], name
        assert equal(out, kernel(mx.contiguous(x), w)), name  # the packing does not change the sums


def test_x_3d_realistic():
    w = make((576, 576), seed=11)
    x = make((2, 7, 576), seed=12)
    out = kernel(x, w)
    assert out.shape == (2, 7, 576)
    assert rel_err(out, reference(x, w)) < TOL[mx.float32]


@pytest.mark.parametrize("wt", DTYPES.values(), ids=DTYPES.keys())
def test_w_layouts_match_contiguous_bit_exact(wt):
    big = make((300, 200), wt, seed=13)
    x = make((5, 100), mx.float32, seed=14)
    cases = {
        "transposed": big.T[:49, :100],  # strides(1) != 1: gathered
        "row_strided": big[::3, :100],  # rows contiguous, leading dimension 3 * 200
        "column_slice": big[10:59, 50:150],
        "reversed_columns": big[:49, 99::-1],
    }
    for name, w in cases.items():
        out = kernel(x, w)
        assert out.shape == (5, w.shape[0]), name
        assert rel_err(out, reference(x, w)) < TOL[mx.float32], name
        assert equal(out, kernel(x, mx.contiguous(w))), name


# ----------------------------------------------------------- errors

def test_bad_inputs_raise_value_error():
    w, x = make((8, 16)), make((2, 16))
    cases = [
        (make((2, 12)), w, "features"),
        (x, make((16,)), "2-D"),
        (x, make((2, 8, 16)), "2-D"),
        (x.astype(mx.int32), w, "float32, float16 or bfloat16"),
        (x, w.astype(mx.int8), "float32, float16 or bfloat16"),
        (mx.array(1.0), w, "at least one dimension"),
    ]
    for xi, wi, fragment in cases:
        with pytest.raises(ValueError, match=fragment):
            EXT.dense_matmul(xi, wi)


# ----------------------------------------------------------- composition

def test_under_compile_and_on_a_second_stream():
    w1, w2 = make((96, 40), seed=15), make((40, 96), mx.bfloat16, seed=16)

    def mlp(x):
        return EXT.dense_matmul(nn.silu(EXT.dense_matmul(mx.tanh(x), w1)) * 2.0, w2) + x

    def twin(x):
        return (nn.silu(mx.tanh(x) @ w1.T) * 2.0) @ w2.astype(mx.float32).T + x

    x = make((3, 40), seed=17)
    compiled = mx.compile(mlp)
    got1, got2 = compiled(x), compiled(x + 1.0)
    mx.eval(got1, got2)
    assert rel_err(got1, twin(x)) < 1e-4 and rel_err(got2, twin(x + 1.0)) < 1e-4
    assert equal(got1, mlp(x))
    s2 = mx.new_stream(mx.cpu)
    a = EXT.dense_matmul(x, w1, stream=s2)
    b = EXT.dense_matmul(x * 2, w1)
    mx.eval(a, b)  # both streams in flight through one pool
    assert equal(a, kernel(x, w1)) and rel_err(b, reference(x * 2, w1)) < TOL[mx.float32]


# ------------------------------------------------- dispatch and switches

@pytest.fixture
def fresh_state(monkeypatch):
    """Re-read the switches for one test; restore the environment and the state afterwards."""
    dense.reset()
    try:
        yield monkeypatch
    finally:
        monkeypatch.undo()
        dense.reset()
        dense.status()  # re-applies MLX_RAY_DENSE_MAX_M or the default to the extension


def _which(x, w) -> str:
    """Which implementation dense.matmul_t used, told apart by the last bits of the result."""
    out, mlx, ours = dense.matmul_t(x, w), x @ w.T, EXT.dense_matmul(x, w)
    assert not mx.array_equal(mlx, ours).item(), "shape does not separate the two implementations"
    if equal(out, ours):
        return "kernel"
    assert equal(out, mlx)
    return "mlx"


W = make((577, 577), seed=18) if dense.status()["active"] else None


def test_dispatch_by_rows():
    max_m = EXT.dense_max_m()
    assert dense.status()["max_m"] == max_m >= 2
    for m in (1, max_m):
        assert _which(make((m, 577), seed=m), W) == "kernel", m
    assert _which(make((max_m + 1, 577), seed=19), W) == "mlx"
    half = max_m // 2
    assert _which(make((2, half, 577), seed=20), W) == "kernel"  # rows = B * L
    assert _which(make((2, half + 1, 577), seed=21), W) == "mlx"
    assert _which(make((3, 577), seed=22), W.astype(mx.bfloat16)) == "kernel"


def test_force_reference_and_kernel():
    x_small, x_big = make((3, 577), seed=23), make((EXT.dense_max_m() + 8, 577), seed=24)
    with dense.force("reference"):
        assert dense.status()["forced"] == "reference"
        assert _which(x_small, W) == "mlx"
    with dense.force("kernel"):
        assert _which(x_big, W) == "kernel"
    assert "forced" not in dense.status()


def test_non_float_weights_use_mlx():
    w = mx.arange(12, dtype=mx.int32).reshape(3, 4)
    x = make((2, 4))
    assert equal(dense.matmul_t(x, w), x @ w.T)


def test_bad_max_m_is_a_clear_inactive_state(fresh_state):
    fresh_state.setenv("MLX_RAY_DENSE_MAX_M", "lots")
    st = dense.status()
    assert not st["active"] and "MLX_RAY_DENSE_MAX_M must be an integer" in st["reason"] and "'lots'" in st["reason"]


def test_max_m_from_environment(fresh_state):
    fresh_state.setenv("MLX_RAY_DENSE_MAX_M", "4")
    st = dense.status()
    assert st["active"] and st["max_m"] == 4 and "M <= 4" in st["reason"]
    assert _which(make((4, 577), seed=25), W) == "kernel"
    assert _which(make((5, 577), seed=26), W) == "mlx"
    fresh_state.delenv("MLX_RAY_DENSE_MAX_M")
    dense.reset()
    assert dense.status()["max_m"] == EXT.dense_max_m() == dense.DEFAULT_MAX_M


def test_max_m_zero_means_never(fresh_state):
    fresh_state.setenv("MLX_RAY_DENSE_MAX_M", "0")
    assert dense.status()["active"] and dense.status()["max_m"] == 0
    assert _which(make((1, 577), seed=29), W) == "mlx"
    with dense.force("kernel"):  # the test hook still reaches the kernel
        assert _which(make((1, 577), seed=29), W) == "kernel"


@pytest.mark.parametrize("key,value", [("MLX_RAY_KERNELS", "0"), ("MLX_RAY_KERNELS_DISABLE", "dense_cpu"),
                                       ("MLX_RAY_KERNELS_DISABLE", "qmm_cpu, dense_cpu")])
def test_off_switches(fresh_state, key, value):
    fresh_state.setenv(key, value)
    st = dense.status()
    assert not st["active"] and key in st["reason"], st
    assert _which(make((3, 577), seed=27), W) == "mlx"
    with pytest.raises(RuntimeError, match="unavailable"):
        with dense.force("kernel"):
            pass
    assert dense.patch_model(_tiny_model()) == 0


def test_disabling_another_kernel_keeps_this_one(fresh_state):
    fresh_state.setenv("MLX_RAY_KERNELS_DISABLE", "qmm_cpu")
    assert dense.status()["active"] and not qmm.status()["active"]
    assert _which(make((3, 577), seed=28), W) == "kernel"


# ------------------------------------------------------------ model patching

def _tiny_model(dtype=mx.float32):
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512,
                           tie_word_embeddings=True, rope_theta=10000.0)
    mx.random.seed(3)
    model = llama.Model(args)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


TOKENS = mx.array([[1, 5, 9, 42, 7]])


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-4), (mx.bfloat16, 3e-2)], ids=["f32", "bf16"])
def test_patch_model_routes_layers_and_matches(dtype, tol):
    model = _tiny_model(dtype)
    n_linear = sum(type(m) is nn.Linear for _, m in model.named_modules())
    want = model(TOKENS)
    assert dense.patch_model(model) == n_linear + 1 == 2 * 7 + 1  # + the tied head
    assert type(model.model.layers[0].mlp.up_proj) is dense.KernelLinear
    assert type(model.model.embed_tokens) is dense.KernelEmbedding
    got = model(TOKENS)
    assert got.dtype == want.dtype and rel_err(got, want) < tol
    if dtype == mx.float32:  # the kernel really ran (its sum order differs; bf16 rounding hides it)
        assert not mx.array_equal(got, want).item()
    with dense.force("reference"):
        assert equal(model(TOKENS), want)
    assert dense.unpatch_model(model) == n_linear + 1
    assert type(model.model.embed_tokens) is nn.Embedding
    assert all(type(m) is not dense.KernelLinear for _, m in model.named_modules())
    assert equal(model(TOKENS), want)


def test_patch_model_leaves_quantized_layers_alone():
    model = _tiny_model()
    nn.quantize(model, group_size=64, bits=4, class_predicate=lambda path, m: ".mlp." in path)
    mx.eval(model.parameters())
    n_quantized = sum(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert n_quantized == 2 * 3
    assert dense.patch_model(model) == 2 * 4 + 1  # attention projections and the tied head
    assert type(model.model.layers[0].mlp.up_proj) is nn.QuantizedLinear
    assert type(model.model.layers[0].self_attn.q_proj) is dense.KernelLinear
    fully = _tiny_model()
    nn.quantize(fully, group_size=64, bits=4)
    assert dense.patch_model(fully) == 0


def test_loader_patches_float_model(mlx_f32):
    from mlx_ray.engine.loader import load

    model, _, info = load(mlx_f32)
    assert info.cpu_kernel
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "KernelLinear"
    assert type(model.model.embed_tokens) is dense.KernelEmbedding
    tokens = mx.array([[1, 2, 3, 4]])
    got = model(tokens)
    with dense.force("reference"):
        want = model(tokens)
    assert rel_err(got, want) < 1e-4
