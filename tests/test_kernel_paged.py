"""The CPU paged-attention primitive (mlx_ray/kernels/qmm_cpu/paged_attention.cpp) against its twin (mlx_ray/kernels/paged_attention.py).

Tolerances: float32 within 1e-5 of the twin (relative to the output's magnitude); float16 / bfloat16
within 4 units of the dtype's rounding (eps = 2^-10 / 2^-7) of the twin, which itself rounds K/V and
its softmax to the dtype, and within 1 eps (relative, + 1e-5) of the float32 twin on the same inputs
(the kernel computes in float32 and rounds once). Batch invariance is bit for bit.
"""

from __future__ import annotations

import itertools
import platform
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_ray.kernels import paged_attention as pa

EPS = {mx.float32: 0.0, mx.float16: 2.0 ** -10, mx.bfloat16: 2.0 ** -7}


@pytest.fixture(autouse=True)
def _cpu_default():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


EXPECTED_HERE = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


@pytest.fixture
def ext(monkeypatch):
    monkeypatch.delenv("MLX_RAY_KERNELS", raising=False)
    monkeypatch.delenv("MLX_RAY_KERNELS_DISABLE", raising=False)
    monkeypatch.delenv("MLX_RAY_PAGED_MAX_L", raising=False)
    active, reason, e = pa.cpu_state()
    if not active:
        if EXPECTED_HERE:  # built and verified on every Linux x86-64 machine: not having it is a failure
            pytest.fail(f"the C++ paged attention is not active here: {reason}")
        pytest.skip(f"the C++ paged attention is not built here: {reason}")
    return e


# ------------------------------------------------------------------ problems

def make(B, Hq, Hkv, L, D, bs, ctx, *, dtype=mx.float32, bits=None, gs=64, seed=0, garbage=1e3, spare=3):
    """A pool with shuffled, non-contiguous blocks; slots no row may read hold `garbage` (NaN allowed)."""
    rng = np.random.default_rng(seed)
    ctx = [int(c) for c in ctx]
    MB = max(-(-c // bs) for c in ctx) + 1  # one table entry past every row's last block
    nblocks = B * MB + spare
    S = nblocks * bs
    k = rng.standard_normal((S, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((S, Hkv, D)).astype(np.float32)
    perm = rng.permutation(nblocks)
    bt = perm[: B * MB].reshape(B, MB).astype(np.int32)
    valid = np.zeros(S, bool)
    for b, c in enumerate(ctx):
        pos = np.arange(c)
        valid[bt[b, pos // bs] * bs + pos % bs] = True
    k[~valid], v[~valid] = garbage, garbage
    bt[:, -1] = perm[-1]  # an entry past the last block: any value in range
    q = mx.array(rng.standard_normal((B, Hq, L, D)).astype(np.float32)).astype(dtype)
    K, V = mx.array(k), mx.array(v)
    if bits:
        def qz(x):
            w, s, b = mx.quantize(mx.nan_to_num(x, nan=0.0).reshape(-1, D), group_size=gs, bits=bits)
            s, b = s.reshape(S, Hkv, -1).astype(dtype), b.reshape(S, Hkv, -1).astype(dtype)
            if np.isnan(garbage):
                bad = mx.array(~valid)[:, None, None]
                s = mx.where(bad, mx.array(np.nan, dtype=dtype), s)
            return w.reshape(S, Hkv, -1), s, b
        kc, vc = qz(K), qz(V)
    else:
        kc, vc = K.astype(dtype), V.astype(dtype)
    return dict(queries=q, k_cache=kc, v_cache=vc, block_tables=mx.array(bt),
                context_lens=mx.array(np.array(ctx, np.int32))), dict(scale=D ** -0.5, block_size=bs, bits=bits,
                                                                      group_size=gs)


def upcast(args):
    f = lambda c: c.astype(mx.float32) if isinstance(c, mx.array) else (c[0], *(x.astype(mx.float32) for x in c[1:]))
    return {**args, "queries": args["queries"].astype(mx.float32), "k_cache": f(args["k_cache"]),
            "v_cache": f(args["v_cache"])}


def compare(args, kw, label=""):
    got = pa.paged_attention(**args, **kw, impl="cpu")
    want = pa.twin(**args, **kw)
    mx.eval(got, want)
    assert got.dtype == args["queries"].dtype and got.shape == args["queries"].shape
    g, w = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert np.isfinite(g).all(), label
    dt = args["queries"].dtype
    mag = max(1.0, float(np.abs(w).max()))
    err = float(np.abs(g - w).max())
    if dt == mx.float32:
        assert err <= 1e-5 * mag, f"{label}: f32 err {err:.3g}"
    else:
        assert err <= 4 * EPS[dt] * mag, f"{label}: {dt} err vs twin {err:.3g}"
        ref = np.array(pa.twin(**upcast(args), **kw))
        bound = EPS[dt] * np.abs(ref) + 1e-5
        assert (np.abs(g - ref) <= bound).all(), f"{label}: {dt} err vs f32 twin {np.abs(g - ref).max():.3g}"
    return got


def _matrix():
    cases = []
    gqa = itertools.cycle([(9, 3), (4, 4), (8, 2), (12, 4), (6, 2)])  # ratios 3, 1, 4, 3, 3
    batches = itertools.cycle([(16, 3), (1, 0), (5, 1)])  # (B, which ragged set)
    groups = {64: itertools.cycle([32, 64]), 128: itertools.cycle([128, 32, 64])}
    for dtype, bits, D in itertools.product((mx.float32, mx.float16, mx.bfloat16), (None, 8, 4), (64, 128)):
        Hq, Hkv = next(gqa)
        B, _ = next(batches)
        gs = next(groups[D]) if bits else 64
        cases.append((dtype, bits, D, Hq, Hkv, B, gs))
    return cases


def _ctx(B, bs, rng):
    base = [1, bs, bs + 1, 300, 2 * bs - 1, 260, 7, 3 * bs, 512 + 5, 40, 1, bs + 1, 129, 64, 2, 100]
    return base[:B] if B > 1 else [int(rng.integers(200, 600))]


@pytest.mark.parametrize("dtype,bits,D,Hq,Hkv,B,gs", _matrix(),
                         ids=lambda v: str(v).removeprefix("mlx.core.") if not isinstance(v, int) else str(v))
def test_decode_matrix(ext, dtype, bits, D, Hq, Hkv, B, gs):
    bs = 16 if D == 64 else 32
    ctx = _ctx(B, bs, np.random.default_rng(B + D))
    args, kw = make(B, Hq, Hkv, 1, D, bs, ctx, dtype=dtype, bits=bits, gs=gs, seed=D + B)
    compare(args, kw, f"decode {dtype} bits={bits} D={D} B={B}")


@pytest.mark.parametrize("dtype,bits,D,Hq,Hkv,L,ctx", [
    (mx.float32, None, 64, 9, 3, 37, 300),     # chunk at a nonzero offset, tiles straddle
    (mx.float32, None, 128, 8, 2, 130, 700),   # several tiles and segments
    (mx.float32, 8, 64, 9, 3, 64, 64),         # the whole context is the chunk (offset 0)
    (mx.bfloat16, 4, 128, 12, 4, 20, 257),
    (mx.float16, None, 64, 4, 4, 9, 33),
    (mx.float32, 4, 64, 6, 2, 256, 600),
])
def test_prefill_chunks(ext, dtype, bits, D, Hq, Hkv, L, ctx):
    args, kw = make(1, Hq, Hkv, L, D, 16, [ctx], dtype=dtype, bits=bits, gs=32 if bits == 4 else 64, seed=L)
    compare(args, kw, f"prefill L={L} ctx={ctx}")


def test_prefill_rows_ragged(ext):
    """L > 1 with several rows of different lengths (each row's chunk at its own offset)."""
    args, kw = make(3, 6, 2, 5, 64, 16, [5, 40, 333], seed=3)
    compare(args, kw, "ragged L=5")


def test_every_isa(ext):
    args, kw = make(4, 9, 3, 3, 64, 16, [3, 16, 17, 300], bits=8, gs=32, seed=11)
    fargs, fkw = make(2, 8, 2, 1, 128, 32, [33, 600], dtype=mx.float16, seed=12)
    try:
        for isa in ("avx512", "avx2", "scalar"):
            if ext.force_isa(isa):
                assert ext.paged_attention_isa() == isa
                compare(args, kw, isa)
                compare(fargs, fkw, isa)
    finally:
        ext.force_isa("auto")


# ----------------------------------------------------------- invariance

def _row(args, b):
    return {"queries": args["queries"][b:b + 1], "k_cache": args["k_cache"], "v_cache": args["v_cache"],
            "block_tables": args["block_tables"][b:b + 1], "context_lens": args["context_lens"][b:b + 1]}


@pytest.mark.parametrize("bits,L", [(None, 1), (8, 1), (None, 6), (4, 3)])
def test_batch_invariance(ext, bits, L):
    """A row alone (few tiles: the split schedule) == the same row in a batch of 16 (tiles), bit for bit."""
    ctx = [max(L, c) for c in (1, 16, 17, 300, 700, 31, 2, 64, 65, 513, 100, 5, 250, 600, 48, 3)]
    args, kw = make(16, 9, 3, L, 64, 16, ctx, bits=bits, gs=64, seed=5)
    batch = np.array(pa.paged_attention(**args, **kw, impl="cpu"))
    for b in (0, 3, 4, 9, 13):
        alone = np.array(pa.paged_attention(**_row(args, b), **kw, impl="cpu"))
        np.testing.assert_array_equal(alone[0], batch[b], err_msg=f"row {b}")


def test_thread_count_invariance(ext):
    args, kw = make(3, 8, 2, 4, 128, 16, [4, 300, 900], bits=8, seed=6)
    n = ext.num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            ext.set_num_threads(t)
            outs.append(np.array(pa.paged_attention(**args, **kw, impl="cpu")))
    finally:
        ext.set_num_threads(n)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_chunk_equals_decode_steps(ext):
    """Query l of a prefill chunk == a decode step at the same position (per-query results never depend on L)."""
    L, ctx = 40, 290
    args, kw = make(1, 9, 3, L, 64, 16, [ctx], seed=7)
    chunk = np.array(pa.paged_attention(**args, **kw, impl="cpu"))
    for l in (0, 17, 39):
        step = {**args, "queries": args["queries"][:, :, l:l + 1],
                "context_lens": mx.array([ctx - L + l + 1], dtype=mx.int32)}
        np.testing.assert_array_equal(np.array(pa.paged_attention(**step, **kw, impl="cpu"))[:, :, 0], chunk[:, :, l])


@pytest.mark.parametrize("bits", [None, 8])
def test_unread_slots_never_read(ext, bits):
    """Slots past each row's length (and unused blocks) may hold NaN: same output, bit for bit."""
    ctx = [1, 17, 40, 100]
    a, kw = make(4, 6, 2, 1, 64, 16, ctx, bits=bits, seed=8, garbage=1e3)
    b, _ = make(4, 6, 2, 1, 64, 16, ctx, bits=bits, seed=8, garbage=np.nan)
    x, y = np.array(pa.paged_attention(**a, **kw, impl="cpu")), np.array(pa.paged_attention(**b, **kw, impl="cpu"))
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(x, y)


def test_out_of_range_rows_are_nan(ext):
    """A row whose length exceeds its table (or points outside the pool) is NaN; the others are untouched."""
    args, kw = make(3, 6, 2, 1, 64, 16, [20, 50, 9], seed=9)
    good = np.array(pa.paged_attention(**args, **kw, impl="cpu"))
    MB = args["block_tables"].shape[1]
    bad = {**args, "context_lens": mx.array([20, MB * 16 + 1, 9], dtype=mx.int32)}
    out = np.array(pa.paged_attention(**bad, **kw, impl="cpu"))
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(out[[0, 2]], good[[0, 2]])
    bt = np.array(args["block_tables"])
    bt[0, 0] = 10_000
    out = np.array(pa.paged_attention(**{**args, "block_tables": mx.array(bt)}, **kw, impl="cpu"))
    assert np.isnan(out[0]).all() and np.isfinite(out[1:]).all()


# -------------------------------------------------------------- dispatch

def test_dispatch_and_switches(ext, monkeypatch):
    args, kw = make(2, 6, 2, 1, 64, 16, [10, 30], seed=10)
    assert pa.choose(args["queries"], args["k_cache"]) == "cpu"
    assert pa.kernel_verified()[0]
    kernel = np.array(pa.paged_attention(**args, **kw))
    np.testing.assert_array_equal(kernel, np.array(pa.paged_attention(**args, **kw, impl="cpu")))
    twin = np.array(pa.twin(**args, **kw))
    for var, val in (("MLX_RAY_KERNELS_DISABLE", "qmm_cpu,paged_attention_cpu"), ("MLX_RAY_KERNELS", "0")):
        monkeypatch.setenv(var, val)
        assert pa.choose(args["queries"], args["k_cache"]) == "twin"
        ok, reason = pa.kernel_verified()
        assert not ok and "disabled by" in reason
        assert not pa.status()["active"]
        np.testing.assert_array_equal(np.array(pa.paged_attention(**args, **kw)), twin)
        with pytest.raises(RuntimeError, match="unavailable"):
            pa.paged_attention(**args, **kw, impl="cpu")
        monkeypatch.delenv(var)
    assert pa.kernel_verified()[0]
    st = pa.status()
    assert st["active"] and st["name"] == "paged_attention_cpu" and st["isa"] and st["threads"] >= 1


def test_prefill_threshold(ext, monkeypatch):
    args, _ = make(1, 6, 2, 8, 64, 16, [40], seed=13)
    monkeypatch.setenv("MLX_RAY_PAGED_MAX_L", "4")
    assert pa.choose(args["queries"], args["k_cache"]) == "twin"
    assert pa.choose(args["queries"][:, :, :1], args["k_cache"]) == "cpu"
    monkeypatch.setenv("MLX_RAY_PAGED_MAX_L", "8")
    assert pa.choose(args["queries"], args["k_cache"]) == "cpu"


def test_unsupported_head_dim_takes_twin(ext):
    args, kw = make(2, 4, 2, 1, 32, 16, [10, 20], seed=14)
    assert pa.choose(args["queries"], args["k_cache"]) == "twin"
    np.testing.assert_array_equal(np.array(pa.paged_attention(**args, **kw)), np.array(pa.twin(**args, **kw)))


def test_bad_shapes_raise(ext):
    args, kw = make(2, 6, 2, 1, 64, 16, [10, 30], seed=15)
    qargs, qkw = make(2, 6, 2, 1, 64, 16, [10, 30], bits=8, seed=15)
    bad = [
        ({**args, "queries": args["queries"][:, :5]}, kw, "multiple of Hkv"),
        ({**args, "queries": args["queries"][0]}, kw, "4-D"),
        ({**args, "block_tables": args["block_tables"][:1]}, kw, "block_tables"),
        ({**args, "context_lens": args["context_lens"][:1]}, kw, "context_lens"),
        ({**args, "k_cache": args["k_cache"][..., :32]}, kw, "k_cache"),
        (args, {**kw, "block_size": 7}, "multiple of block_size"),
        (args, {**kw, "bits": 8}, "tuples"),
        (qargs, {**qkw, "bits": None}, "float caches"),
        (qargs, {**qkw, "bits": 3}, "bits"),
        (qargs, {**qkw, "group_size": 48}, "group_size"),
    ]
    for a, k, match in bad:
        for impl in (None, "cpu"):
            with pytest.raises(ValueError, match=match):
                pa.paged_attention(**a, **k, impl=impl)
    # The primitive itself validates too (std::invalid_argument -> ValueError).
    q, kc, vc, bt, cl = (args[n] for n in ("queries", "k_cache", "v_cache", "block_tables", "context_lens"))
    with pytest.raises(ValueError, match="queries' dtype"):
        ext.paged_attention(q.astype(mx.float16), kc, vc, bt, cl, scale=0.1, block_size=16)
    with pytest.raises(ValueError, match="head dim"):
        ext.paged_attention(q[..., :48], kc[..., :48], vc[..., :48], bt, cl, scale=0.1, block_size=16)
    with pytest.raises(ValueError, match="int32"):
        ext.paged_attention(q, kc, vc, bt.astype(mx.int64), cl, scale=0.1, block_size=16)
    with pytest.raises(ValueError, match="scales"):
        ext.paged_attention(q, kc, vc, bt, cl, kc, kc, kc, kc, scale=0.1, block_size=16)
    with pytest.raises((ValueError, RuntimeError)):
        ext.paged_attention(q, kc, vc, bt, cl, scale=0.1, block_size=16, stream=mx.gpu)
