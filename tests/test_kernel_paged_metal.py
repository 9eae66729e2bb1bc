"""mlx_ray/kernels/paged_attention_metal: the Metal paged-attention kernel under the CPU emulator, against its twin.

The kernel's own .metal source runs here through ``_common.emulate()``
(mlx_ray/kernels/metal_emu compiles the source MLX generates as C++ and runs it on CPU
fibers: SIMD-group shuffles and threadgroup barriers emulated, guard pages
after every buffer). Nothing here runs Metal or says anything about speed.

The one mocked part is the gate's device where a verdict is needed:
``gate.Device("fake-metal", metal=True, mx_device=mx.cpu)``, so the real
gate (compare, time, decide, dispatch) runs on the CPU.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_ray.kernels import _common, gate
from mlx_ray.kernels import metal_emu as emu  # shipped with the package: a hard import, never a skip
from mlx_ray.kernels import paged_attention as pa
from mlx_ray.kernels import paged_attention_metal as pm
from mlx_ray.kernels._common import MetalKernel

FAKE = gate.Device("fake-metal", metal=True, mx_device=mx.cpu)  # the only mock: the device
EMULATE = pm.cases("emulate")


pytestmark = pytest.mark.usefixtures("clean_gate")  # tests/fixtures_kernels.py


def _emulated(case, **kw):
    with _common.emulate():
        out = pm._launch(*case.args, **case.kwargs, **kw)
        mx.eval(out)
        return out


def _reference64(q, k_cache, v_cache, tables, lens, *, scale, block_size, bits=None, group_size=64):
    """Float64 NumPy attention over the gathered (dequantized) K/V: independent of MLX's sdpa."""
    k = np.array(pa.gather(k_cache, tables, block_size, bits, group_size, mx.float32).astype(mx.float32), np.float64)
    v = np.array(pa.gather(v_cache, tables, block_size, bits, group_size, mx.float32).astype(mx.float32), np.float64)
    qn = np.array(q.astype(mx.float32), np.float64)
    G = qn.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, 1), np.repeat(v, G, 1)
    s = np.einsum("bhld,bhtd->bhlt", qn, k) * scale
    s = np.where(np.array(pa.causal_mask(lens, qn.shape[2], k.shape[2])), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhlt,bhtd->bhld", p / p.sum(-1, keepdims=True), v)


# ------------------------------------------------------------ correctness

def test_registered():
    assert _common.get("paged_attention") is pm.SPEC
    assert pm.SPEC.twin is pa.twin and pm.SPEC.metal_fn is pm.metal


@pytest.mark.parametrize("case", EMULATE, ids=[c.label for c in EMULATE])
def test_emulated_kernel_matches_the_twin_in_both_thread_orders(case):
    row = emu.check_case(pm.SPEC, case)
    assert row["typecheck"] and row["emulated"], row


@pytest.mark.parametrize("i", [0, 1, 3, 5], ids=lambda i: EMULATE[i].label)
def test_emulated_kernel_is_float32_accurate(i):
    """Against float64: the error is the output type's rounding (f32: ~1e-6 of max|out|)."""
    case = EMULATE[i]
    want = _reference64(*case.args, **case.kwargs)
    got = np.array(_emulated(case).astype(mx.float32), np.float64)
    rel = {mx.float32: 2e-6, mx.float16: 2.0 ** -10, mx.bfloat16: 2.0 ** -7}[case.args[0].dtype]
    assert np.abs(got - want).max() <= rel * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 40])
def test_partitions_merge_to_the_same_result(parts):
    """The split path (partial outputs merged by MLX ops), including partitions past every row's end."""
    case = pm.make_case(2, 4, 2, 64, [70, 33], dtype=mx.float32, block_size=8, seed=11)
    want = pa.twin(*case.args, **case.kwargs)
    got = _emulated(case, parts=parts)
    assert pm.check(got, want) is None, pm.check(got, want)


def test_k_and_v_are_passed_in_place(monkeypatch):
    """The pool arrays themselves reach the kernel (no gather, no copy on the Python side)."""
    seen = []
    real = pm.KERNEL

    class Spy:
        def __call__(self, **kw):
            seen.append(kw)
            return real(**kw)

    monkeypatch.setattr(pm, "KERNEL", Spy())
    for case in (EMULATE[0], EMULATE[2]):
        q, kc, vc, tables, lens = case.args
        _emulated(case)
        inputs = seen[-1]["inputs"]
        if isinstance(kc, tuple):
            assert all(a is b for a, b in zip(inputs[1:7], (*kc, *vc)))
        else:
            assert inputs[1] is kc and inputs[4] is vc


def test_layout():
    # decode: the whole GQA group in one pass; few threadgroups and a long context -> partitions
    assert pm.layout(1, 40, 8, 1, 256, 16) == {"G": 5, "qmax": 5, "passes": 1, "parts": 16, "part_blocks": 16}
    assert pm.layout(32, 40, 8, 1, 256, 16)["parts"] == 1  # 256 threadgroups already
    assert pm.layout(1, 9, 3, 1, 10, 16)["parts"] == 1  # short context: one partition
    assert pm.layout(1, 4, 1, 5, 4, 16) == {"G": 4, "qmax": 8, "passes": 3, "parts": 1, "part_blocks": 4}


def test_supports_refuses_what_it_cannot_do():
    q, kc, vc, tables, lens = EMULATE[0].args
    kw = {"block_size": 16}
    assert pm.supports(q, kc, vc, tables, lens, **kw) is None
    assert "head dim" in pm.supports(mx.zeros((1, 4, 1, 96)), mx.zeros((8, 2, 96)), mx.zeros((8, 2, 96)),
                                     tables[:1], lens[:1], **kw)
    assert "bits" in pm.supports(q, kc, vc, tables, lens, bits=2, **kw)
    assert "dtype" in pm.supports(q, kc.astype(mx.float16), vc, tables, lens, **kw)
    assert "multiple" in pm.supports(q[:, :3], kc, vc, tables, lens, **kw)
    with pytest.raises(ValueError, match="head dim"):
        pm.metal(mx.zeros((1, 4, 1, 32)), mx.zeros((8, 2, 32)), mx.zeros((8, 2, 32)), tables[:1], lens[:1],
                 scale=1.0, block_size=16)


def test_generated_source_typechecks_and_uses_no_simdgroup_matrix():
    with emu.recording() as calls, _common.emulate():
        for case in EMULATE:
            pm.metal(*case.args, **case.kwargs)
    sources = dict.fromkeys(src for _, src in calls)
    assert len(sources) >= 6  # distinct template variants: dtypes x D x bits x QMAX x PARTS
    for src in sources:
        ok, log = emu.typecheck(src)
        assert ok, log
    assert "simdgroup_matrix" not in pm.KERNEL.source
    assert not emu.typecheck(next(iter(sources)).replace("kmax = metal::max", "kmax = metal::maxx"))[0]


# ------------------------------------------- bounds: a bad table or length is a NaN row, not a fault

BAD_ROWS = {
    "entry past the pool": lambda t, lens, nb: (t.__setitem__((1, 0), nb + 10_000), lens),
    "entry just past the pool": lambda t, lens, nb: (t.__setitem__((1, 1), nb), lens),
    "negative entry": lambda t, lens, nb: (t.__setitem__((1, 0), -5), lens),
    "length past the table": lambda t, lens, nb: (None, lens.__setitem__(1, t.shape[1] * 16 + 1)),
    "huge length": lambda t, lens, nb: (None, lens.__setitem__(1, 2_000_000_000)),
    "length below the queries": lambda t, lens, nb: (None, lens.__setitem__(1, 0)),
}


@pytest.mark.parametrize("parts", [None, 3])
@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("bad", BAD_ROWS)
def test_an_out_of_range_row_is_nan_and_reads_nothing(bad, bits, parts):
    """As the CPU primitive: the bad row's output is NaN, the other rows are exactly what they are without it, and
    nothing is read outside the pool or the table (the emulator's guard pages turn such a read into an error)."""
    case = pm.make_case(3, 4, 2, 64, [40, 50, 33], dtype=mx.float32, block_size=16, bits=bits, group_size=32,
                        seed=5)
    q, kc, vc, tables, lens = case.args
    nb = (kc[0] if isinstance(kc, tuple) else kc).shape[0] // 16
    t, n = np.array(tables), np.array(lens)
    BAD_ROWS[bad](t, n, nb)
    good = np.array(_emulated(case, parts=parts))
    bad_case = type(case)(case.label, (q, kc, vc, mx.array(t), mx.array(n)), case.kwargs)
    out = np.array(_emulated(bad_case, parts=parts))
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(out[[0, 2]], good[[0, 2]])
    assert np.isfinite(good).all()


# --------------------------------------------------- what a logic error does

def _broken(tmp_path, old: str, new: str) -> MetalKernel:
    text = pm.KERNEL.source_file.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / "paged_attention_broken.metal"
    path.write_text(text.replace(old, new))
    k = pm.KERNEL
    return MetalKernel(k.name + "_broken", k.input_names, k.output_names, path)


BUGS = {
    "causal-limit-minus-one": ("lim[qi] = bad ? 0 : ctx - L + l + 1;", "lim[qi] = bad ? 0 : ctx - L + l;"),
    "causal-limit-plus-one": ("lim[qi] = bad ? 0 : ctx - L + l + 1;", "lim[qi] = bad ? 0 : ctx - L + l + 2;"),
    "block-index-plus-one": ("block_tables[size_t(b) * MB + blk]", "block_tables[size_t(b) * MB + blk + 1]"),
    "last-block-dropped": ("const int n_blocks = (kmax + BS - 1) / BS;", "const int n_blocks = kmax / BS;"),
    "token-in-block": ("const size_t vec = (phys * BS + t) * n_kv + kvh;",
                       "const size_t vec = (phys * BS + t0) * n_kv + kvh;"),
    "key-slots-not-merged": ("for (int off = TPK; off < 32; off <<= 1)", "for (int off = TPK; off < 16; off <<= 1)"),
    "gqa-head": ("const int h = kvh * G + i % G;", "const int h = kvh * G + i / L % G;"),
}


@pytest.mark.parametrize("bug", BUGS)
def test_a_logic_error_is_caught(tmp_path, monkeypatch, bug):
    monkeypatch.setattr(pm, "KERNEL", _broken(tmp_path, *BUGS[bug]))
    found = []
    for case in EMULATE:
        try:
            why = pm.check(_emulated(case), pa.twin(*case.args, **case.kwargs))
        except emu.EmulatorError as e:  # e.g. a read past the end of the block table
            why = str(e)
        if why:
            found.append(why)
            break
    assert found, f"the emulated run did not catch {bug}"


# ------------------------------------------------------------------ the gate

def test_gate_refuses_a_mismatching_kernel_and_the_dispatch_gives_the_twin(tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "KERNEL", _broken(tmp_path, *BUGS["causal-limit-plus-one"]))
    calls = []
    real = pm.metal
    monkeypatch.setattr(pm.SPEC, "metal_fn", lambda *a, **k: calls.append(1) or real(*a, **k))
    with _common.emulate():
        v = gate.verdict(pm.SPEC, device=FAKE, cases=EMULATE[:2])
        assert not v.enabled and v.reason.startswith("mismatch"), v.reason
        assert not gate.enabled("paged_attention") and calls
        n = len(calls)
        case = EMULATE[0]
        want = pa.twin(*case.args, **case.kwargs)
        assert mx.array_equal(gate.dispatch(pm.SPEC, *case.args, **case.kwargs), want).item()
        got = pa.paged_attention(*case.args, **case.kwargs)  # the other engineer's dispatch
    assert len(calls) == n, "the refused kernel was called after the verdict"
    assert pm.check(got, want) is None


def test_gate_runs_the_emulated_kernel_and_it_matches():
    with _common.emulate():
        v = gate.verdict(pm.SPEC, device=FAKE, cases=[EMULATE[0]])
    assert not v.reason.startswith("mismatch"), v.reason
    assert v.cases and all("problem" not in r and r["max_err"] is not None for r in v.cases)
    if not v.enabled:  # the emulator is far slower than the twin on the CPU: "slower", the twin serves
        assert v.reason.startswith("slower")


def test_no_metal_here():
    v = gate.verdict("paged_attention")
    assert (v.enabled, v.reason) == (False, "no Metal device")


def test_device_cases_are_the_gate_matrix():
    """Built lazily (arrays unevaluated until the gate runs them); checked for shape only."""
    labels = [c.label for c in pm.cases("device")]
    assert any("SmolLM2-like B=32 ctx<=4096" in x for x in labels)
    assert any("Qwen2.5-32B-like B=1 ctx<=256" in x for x in labels)
    assert any("q4" in x for x in labels) and any("q8" in x for x in labels) and any("L=4" in x for x in labels)
    assert math.isclose(len(labels), 2 * (4 * 3 + 4 + 1))
