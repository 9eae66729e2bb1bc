"""The Metal emulator (mlx_ray/kernels/metal_emu): MLX's generated source, type-checked and run on CPU fibers.

Small hand-written kernels exercise each modelled feature against numpy; copies of kernels with an
injected typo, an off-by-one or a missing barrier show what the checks catch; mlx-lm's own kernels
and every registered kernel of ours run against their references.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_ray.kernels import _common
from mlx_ray.kernels import metal_emu as emu
from mlx_ray.kernels._common import Case, KernelSpec, MetalKernel

_DIR = Path(tempfile.mkdtemp(prefix="metal_emu_test_"))


def kernel(name: str, inputs: list[str], outputs: list[str], body: str, **kw) -> MetalKernel:
    path = _DIR / f"{name}.metal"
    path.write_text(body)
    return MetalKernel(name, inputs, outputs, path, **kw)


def run(k: MetalKernel, **call) -> list[np.ndarray]:
    with _common.emulate():
        return [np.array(o.astype(mx.float32) if o.dtype == mx.bfloat16 else o) for o in k(**call)]


# ------------------------------------------------------------------ features

ELEMENTWISE = """
    uint2 p = uint2(thread_position_in_grid.x, thread_position_in_grid.y);
    if (p.x >= uint(x_shape[1]) || p.y >= uint(x_shape[0])) return;
    T v = x[p.y * x_strides[0] + p.x * x_strides[1]];
    out[p.y * x_shape[1] + p.x] = T(float(v) * s + (FLIP ? -N : N) + x_ndim);
"""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_elementwise_with_strides_templates_and_a_2d_grid(dtype):
    """A transposed (strided) input read in place, shape/stride/ndim buffers, dtype/int/bool template
    values, a 2-D grid whose edge threadgroups are partial, and a 0-d input as a constant."""
    k = kernel("elementwise", ["x", "s"], ["out"], ELEMENTWISE, ensure_row_contiguous=False)
    x = mx.random.normal((9, 7)).astype(dtype).T  # (7, 9), strides (1, 7)
    assert x.shape == (7, 9)
    src = emu.generated_source(k, inputs=[x, mx.array(3.0)], template=[("T", dtype), ("N", 5), ("FLIP", True)],
                               output_shapes=[x.shape], output_dtypes=[dtype])
    assert "const constant float& s [[buffer(" in src and "x_strides" in src and "FLIP" in src
    (out,) = run(k, inputs=[x, mx.array(3.0)], template=[("T", dtype), ("N", 5), ("FLIP", True)],
                 grid=(9, 7, 1), threadgroup=(4, 4, 1), output_shapes=[x.shape], output_dtypes=[dtype])
    want = np.array(x.astype(mx.float32)) * 3 - 5 + 2
    np.testing.assert_allclose(out, want, rtol=1e-2 if dtype != mx.float32 else 1e-6, atol=1e-2)


ROW_SUM = """
    // One threadgroup per row: a strided partial sum per thread, then a tree in threadgroup memory.
    threadgroup float part[TG];
    threadgroup uint shared_row;
    uint row = threadgroup_position_in_grid.x, tid = thread_position_in_threadgroup.x;
    uint n = x_shape[1];
    if (tid == 0) shared_row = row + 1;
    float acc = 0.0f;
    for (uint i = tid; i < n; i += TG) acc += x[row * n + i];
    part[tid] = acc;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint w = TG / 2; w > 0; w /= 2) {
        if (tid < w) part[tid] += part[tid + w];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (tid == 0) out[row] = part[0];
    if (tid == TG - 1) rows[row] = shared_row;
"""


def row_sum_spec(body: str = ROW_SUM, name: str = "row_sum") -> KernelSpec:
    k = kernel(name, ["x"], ["out", "rows"], body)

    def metal_fn(x):
        return k(inputs=[x], template=[("TG", 64)], grid=(64 * x.shape[0], 1, 1), threadgroup=(64, 1, 1),
                 output_shapes=[(x.shape[0],), (x.shape[0],)], output_dtypes=[mx.float32, mx.uint32])

    def twin(x):
        return [x.sum(axis=1), mx.arange(1, x.shape[0] + 1).astype(mx.uint32)]

    def check(got, want):
        err = _common.max_abs_err(got, want)
        return None if err < 1e-3 else f"max abs err {err:.3g}"

    cases = [Case("3x300", (mx.random.normal((3, 300), key=mx.random.key(1)),)),
             Case("2x1000", (mx.random.normal((2, 1000), key=mx.random.key(2)),))]
    return KernelSpec(name, k, metal_fn, twin, None, lambda kind: cases, "abs err 1e-3", check)


def test_threadgroup_memory_and_barriers_reduce_a_row():
    """Threadgroup arrays and scalars are shared by the group's threads, barriers order them,
    and every threadgroup gets fresh threadgroup memory."""
    spec = row_sum_spec()
    row = emu.check_case(spec, spec.cases("emulate")[1])
    assert row["typecheck"] and row["emulated"], row


SIMD = """
    uint lane = thread_index_in_simdgroup;
    int v = x[thread_position_in_grid.x];
    uint i = thread_position_in_grid.x * 9;
    out[i + 0] = simd_sum(v);
    out[i + 1] = simd_prefix_exclusive_sum(v);
    out[i + 2] = simd_prefix_inclusive_sum(v);
    out[i + 3] = simd_shuffle(v, lane ^ 3);
    out[i + 4] = simd_shuffle_down(v, 1);
    out[i + 5] = simd_shuffle_xor(v, 1);
    out[i + 6] = simd_max(v);
    out[i + 7] = simd_broadcast(v, 2);
    out[i + 8] = int(uint64_t(simd_ballot(v > 0)) & 0xffffffff);
"""


def simd_reference(x: np.ndarray) -> np.ndarray:
    """What Metal's SIMD-group functions give for lanes in groups of 32 (the last group partial)."""
    out = np.zeros((x.size, 9), np.int64)
    for start in range(0, x.size, 32):
        g = x[start:start + 32].astype(np.int64)
        n = g.size
        for lane in range(n):
            r = out[start + lane]
            r[0], r[1], r[2] = g.sum(), g[:lane].sum(), g[:lane + 1].sum()
            r[3] = g[lane ^ 3] if (lane ^ 3) < n else 0  # an inactive source lane: 0 in the emulator
            r[4] = g[lane + 1] if lane + 1 < n else (g[lane] if lane + 1 >= 32 else 0)
            r[5] = g[lane ^ 1] if (lane ^ 1) < n else 0
            r[6], r[7] = g.max(), g[2]
            r[8] = sum(1 << j for j in range(n) if g[j] > 0)
    return out.astype(np.int32).ravel()


def test_simd_group_functions_exchange_among_the_32_lanes():
    """Full and partial SIMD groups (a 48-thread threadgroup: 32 + 16 lanes) for the reductions,
    prefix sums, shuffles, broadcast and ballot."""
    k = kernel("simd", ["x"], ["out"], SIMD)
    x = mx.random.randint(-50, 50, (96,), dtype=mx.int32, key=mx.random.key(3))
    (out,) = run(k, inputs=[x], grid=(96, 1, 1), threadgroup=(48, 1, 1), output_shapes=[(96 * 9,)],
                 output_dtypes=[mx.int32])
    want = np.concatenate([simd_reference(np.array(x)[s:s + 48]) for s in (0, 48)])
    np.testing.assert_array_equal(out, want)


HISTOGRAM = """
    uint i = thread_position_in_grid.x;
    if (i >= uint(x_shape[0])) return;
    atomic_fetch_add_explicit(&hist[x[i] % BINS], 1u, memory_order_relaxed);
    atomic_fetch_add_explicit(&total[0], float(x[i]), memory_order_relaxed);
    atomic_fetch_max_explicit(&biggest[0], x[i], memory_order_relaxed);
"""


def test_atomic_outputs_with_init_value():
    k = kernel("histogram", ["x"], ["hist", "total", "biggest"], HISTOGRAM, atomic_outputs=True)
    x = mx.random.randint(0, 1000, (1000,), dtype=mx.uint32, key=mx.random.key(4))
    hist, total, biggest = run(k, inputs=[x], template=[("BINS", 16)], grid=(1024, 1, 1), threadgroup=(256, 1, 1),
                               output_shapes=[(16,), (1,), (1,)], output_dtypes=[mx.uint32, mx.float32, mx.uint32],
                               init_value=0)
    xs = np.array(x)
    np.testing.assert_array_equal(hist, np.bincount(xs % 16, minlength=16))
    assert total[0] == pytest.approx(xs.sum(), rel=1e-6) and biggest[0] == xs.max()


def test_unwritten_outputs_read_as_garbage():
    """Without init_value an output starts as all ones (NaN for floats), as Metal's fresh buffers hold garbage."""
    k = kernel("half_written", ["x"], ["out"], "uint i = thread_position_in_grid.x; if (i % 2) out[i] = x[i];")
    (out,) = run(k, inputs=[mx.ones((8,))], grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(8,)],
                 output_dtypes=[mx.float32])
    assert np.isnan(out[::2]).all() and (out[1::2] == 1).all()


# --------------------------------------------------------- what the checks catch

def test_typecheck_catches_an_injected_typo():
    k = kernel("elementwise", ["x", "s"], ["out"], ELEMENTWISE, ensure_row_contiguous=False)
    call = dict(inputs=[mx.ones((3, 4)), mx.array(1.0)], template=[("T", mx.float32), ("N", 1), ("FLIP", False)],
                output_shapes=[(4, 3)], output_dtypes=[mx.float32], grid=(3, 4, 1), threadgroup=(3, 4, 1))
    ok, log = emu.typecheck(emu.generated_source(k, **call))
    assert ok, log
    bad = kernel("elementwise_typo", ["x", "s"], ["out"], ELEMENTWISE.replace("T v = x[", "T v = xx["),
                 ensure_row_contiguous=False)
    ok, log = emu.typecheck(emu.generated_source(bad, **call))
    assert not ok and "'xx' was not declared" in log and "generated:" in log
    with pytest.raises(emu.EmulatorError, match="does not compile"), _common.emulate():
        bad(**call)


def test_an_off_by_one_disagrees_with_the_twin():
    good = row_sum_spec()
    assert all(emu.check_case(good, c)["emulated"] for c in good.cases("emulate"))
    bad = row_sum_spec(ROW_SUM.replace("i < n; i += TG", "i <= n; i += TG"), name="row_sum_off_by_one")
    rows = [emu.check_case(bad, c) for c in bad.cases("emulate")]
    assert all(r["typecheck"] and not r["emulated"] for r in rows), rows
    # The last row reads one float past the end of x: a guard page turns that into a named fault.
    assert any("past the end of buffer(0)" in r["reason"] and "buffer(0) is x" in r["reason"] for r in rows), rows


def test_a_missing_barrier_is_caught_here():
    """Threads run until they block, so a reader that no barrier holds back runs before the writers.
    That catches this race (and the reverse-order run catches the mirror image); the emulator does not
    promise to catch every race."""
    racy = row_sum_spec(ROW_SUM.replace("part[tid] = acc;\n    threadgroup_barrier(mem_flags::mem_threadgroup);",
                                        "part[tid] = acc;"), name="row_sum_racy")
    assert racy.metal.source != row_sum_spec().metal.source
    rows = [emu.check_case(racy, c) for c in racy.cases("emulate")]
    assert all(not r["emulated"] for r in rows), rows


def test_faults_deadlocks_and_limits_are_reported():
    call = dict(inputs=[mx.ones((64,))], grid=(64, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(64,)],
                output_dtypes=[mx.float32])
    oob = kernel("oob", ["x"], ["out"], "out[thread_position_in_grid.x + 8] = x[thread_position_in_grid.x];")
    with pytest.raises(emu.EmulatorError, match=r"past the end of buffer\(1\).*buffer\(1\) is out"):
        run(oob, **call)
    divergent = kernel("divergent", ["x"], ["out"], """
        uint t = thread_position_in_grid.x;
        if (t < 40) threadgroup_barrier(mem_flags::mem_threadgroup);
        out[t] = simd_sum(x[t]);""")
    with pytest.raises(emu.EmulatorError, match="deadlock|divergent"):
        run(divergent, **call)
    simd_divergent = kernel("simd_divergent", ["x"], ["out"], """
        uint t = thread_position_in_grid.x;
        float a = 0;
        if (t % 32 < 16) a = simd_sum(x[t]);
        else a = simd_max(x[t]);
        out[t] = a;""")
    with pytest.raises(emu.EmulatorError, match="divergent control flow"):  # Metal would reduce each half alone
        run(simd_divergent, **call)
    big = kernel("big", ["x"], ["out"], "threadgroup float buf[9000]; buf[0] = 1; out[0] = buf[0];")
    with pytest.raises(emu.EmulatorError, match="threadgroup memory"):
        run(big, **call)
    with pytest.raises(emu.EmulatorError, match="more than Metal's 1024"):
        run(oob, **{**call, "grid": (2048, 1, 1), "threadgroup": (2048, 1, 1)})


# ------------------------------------------------- kernels written elsewhere

def test_mlx_lm_kernels_run_against_numpy():
    """Two of mlx-lm 0.32's own Metal kernels (simd_sum / simd_max / simd_min; strided inputs read in place)."""
    gate_mod = pytest.importorskip("mlx_lm.kernels.rms_norm_sigmoid_gate")
    routing_mod = pytest.importorskip("mlx_lm.kernels.expert_routing")
    B, H, L, D = 1, 3, 2, 40
    x = mx.random.normal((B, L, H, D), key=mx.random.key(5)).transpose(0, 2, 1, 3)  # (B, H, L, D), strided
    g = mx.random.normal((B, L, H * D), key=mx.random.key(6))
    k = kernel("rms_norm_sigmoid_gate", ["x", "g", "eps"], ["out"], gate_mod._NORM_GATE_SOURCE,
               ensure_row_contiguous=False)
    (out,) = run(k, inputs=[x, g, mx.array(1e-6)], template=[("T", mx.float32), ("D", D)],
                 grid=(B * L * H * 32, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(B, L, H * D)],
                 output_dtypes=[mx.float32])
    xn = np.array(x).transpose(0, 2, 1, 3)
    want = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6)
    want = want.reshape(B, L, H * D) / (1 + np.exp(-np.array(g)))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)

    E, K = 40, 4
    logits = mx.random.normal((5, E), key=mx.random.key(7))
    bias = mx.random.normal((E,), key=mx.random.key(8)) * 0.1
    k = kernel("expert_routing", ["logits", "bias", "multiplier", "eps", "scale"], ["inds", "weights"],
               routing_mod._ROUTING_SOURCE)
    inds, weights = run(k, inputs=[logits, bias, mx.array(1.0), mx.array(1e-9), mx.array(2.0)],
                        template=[("E", E), ("K", K)], grid=(5 * 32, 1, 1), threadgroup=(256, 1, 1),
                        output_shapes=[(5, K)] * 2, output_dtypes=[mx.uint32, mx.float32])
    score = 1 / (1 + np.exp(-np.array(logits)))
    top = np.argsort(-(score + np.array(bias)), axis=-1, kind="stable")[:, :K]
    np.testing.assert_array_equal(inds, top)
    w = np.take_along_axis(score, top, -1)
    np.testing.assert_allclose(weights, w / w.sum(-1, keepdims=True) * 2.0, rtol=1e-5)


def test_every_registered_kernel_passes_under_emulation():
    """The rows `mlx-ray kernels check` prints: type-check + emulated run (both orders) vs the twin."""
    rows = emu.check_all()
    assert rows and all(r["typecheck"] and r["emulated"] for r in rows), [r for r in rows if not r["emulated"]]


def test_injected_errors_in_registered_kernels_are_caught(monkeypatch):
    """A copy of each registered kernel with a typo fails the type-check; with every thread's grid
    position off by one it disagrees with its twin (or faults) under emulation."""
    for spec in _common.kernels().values():
        case = spec.cases("emulate")[0]
        for k in spec.metal_kernels:
            with emu.recording() as calls, _common.emulate():
                spec.metal_fn(*case.args, **case.kwargs)
            src = next(s for name, s in calls if name == k.name)
            assert emu.typecheck(src)[0]
            assert not emu.typecheck(src.replace(k.source, k.source + "\nundeclared_name = 1;\n"))[0]
            attr = next(a for a in ("thread_position_in_grid", "threadgroup_position_in_grid",
                                    "thread_position_in_threadgroup") if a in k.source)
            monkeypatch.setattr(k, "source", k.source.replace(attr, f"({attr} + 1)"))
            row = emu.check_case(spec, case)
            assert not row["emulated"], (spec.name, k.name, row)
            monkeypatch.undo()
