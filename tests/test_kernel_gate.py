"""mlx_ray/kernels/gate.py: the on-device verdict, forced on the CPU.

There is no Metal device here, so the tests mock exactly one thing: the device
(``gate.Device("fake-metal", metal=True, mx_device=mx.cpu)``). Everything else
is the real gate: it runs the "fast" function and the twin, compares them with
the spec's check, times both, decides, caches and dispatches. The "fast"
functions are deliberately wrong, slow (a sleep) or right and fast (the twin
made slow by a sleep), so each verdict path is taken for a known reason.
"""

from __future__ import annotations

import json
import time

import mlx.core as mx
import pytest

from mlx_ray.kernels import _common, gate, skinny_qmm
from mlx_ray.kernels._common import Case, KernelSpec, MetalKernel

FAKE = gate.Device("fake-metal", metal=True, mx_device=mx.cpu)


@pytest.fixture(autouse=True)
def _clean(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_RAY_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLX_RAY_KERNELS", raising=False)
    monkeypatch.delenv("MLX_RAY_KERNELS_DISABLE", raising=False)
    gate.reset()
    yield
    gate.reset()


def _twin(x):
    return x * 2 + 1


def _slow(fn, seconds=0.004):
    def slow(*a, **k):
        out = fn(*a, **k)
        mx.eval(out)
        time.sleep(seconds)
        return out
    return slow


def _check(out, ref):
    err = _common.max_abs_err(out, ref)
    return None if err <= 1e-6 else f"max err {err:.3g}"


def _spec(tmp_path, fast, twin=_twin, source="out[0] = 1;", name="toy"):
    src = tmp_path / f"{name}.metal"
    src.write_text(source)
    calls = {"twin": 0, "fast": 0}

    def counted(fn, key):
        def f(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return f

    spec = KernelSpec(name=name, metal=MetalKernel(name, ["x"], ["out"], src), metal_fn=counted(fast, "fast"),
                      twin=counted(twin, "twin"), cpu_fn=None,
                      cases=lambda kind: [Case("n=64", (mx.arange(64, dtype=mx.float32),)),
                                          Case("n=256", (mx.arange(256, dtype=mx.float32),))],
                      tolerance="max abs err 1e-6", check=_check)
    spec.calls = calls
    return spec


def test_no_metal_here_means_off_and_stock_path():
    assert not _common.metal_available()
    v = gate.verdict("skinny_qmm")
    assert (v.enabled, v.reason) == (False, "no Metal device") and v.device.startswith("cpu:")
    assert not gate.enabled("skinny_qmm")
    case = skinny_qmm.cases("emulate")[0]
    x, w, s, b = case.args
    got = skinny_qmm.quantized_matmul(x, w, s, b, **case.kwargs)
    want = mx.quantized_matmul(x, w, s, b, transpose=True, **case.kwargs)
    assert mx.array_equal(got, want).item()


def test_mismatch_is_not_enabled_logged_and_dispatch_gives_the_twin(tmp_path, caplog):
    spec = _spec(tmp_path, fast=lambda x: x * 2)  # off by one everywhere
    with caplog.at_level("WARNING", logger="mlx_ray.kernels.gate"):
        v = gate.verdict(spec, device=FAKE)
    assert not v.enabled and v.reason.startswith("mismatch on n=64: max err 1")
    assert "toy" in caplog.text and "mismatch" in caplog.text
    x = mx.linspace(-3, 3, 50)
    assert mx.array_equal(gate.dispatch(spec, x), _twin(x)).item()
    assert not gate.enabled("toy")


def test_a_crashing_kernel_is_not_enabled(tmp_path):
    def boom(x):
        raise RuntimeError("kernel exploded")
    v = gate.verdict(_spec(tmp_path, fast=boom), device=FAKE)
    assert not v.enabled and "failed: RuntimeError: kernel exploded" in v.reason


def test_correct_but_slower_is_not_enabled(tmp_path):
    spec = _spec(tmp_path, fast=_slow(_twin))
    v = gate.verdict(spec, device=FAKE)
    assert not v.enabled and v.reason.startswith("slower than the twin")
    assert v.max_err == 0.0 and v.speedup < 1 and len(v.cases) == 2
    x = mx.arange(8, dtype=mx.float32)
    before = spec.calls["fast"]
    assert mx.array_equal(gate.dispatch(spec, x), _twin(x)).item() and spec.calls["fast"] == before


def test_correct_and_faster_is_enabled_and_dispatched(tmp_path):
    spec = _spec(tmp_path, fast=_twin, twin=_slow(_twin))
    v = gate.verdict(spec, device=FAKE)
    assert v.enabled and "faster on all 2 cases" in v.reason and v.speedup > 1
    assert all(r["speedup"] > 1 for r in v.cases) and v.kernel_ms < v.twin_ms
    before = spec.calls["fast"]
    gate.dispatch(spec, mx.arange(4, dtype=mx.float32))
    assert spec.calls["fast"] == before + 1
    assert gate.enabled("toy")


def test_one_slower_case_is_enough_to_refuse(tmp_path):
    def mixed(x):  # fast on the small case, slow on the big one
        return _slow(_twin, 0.006)(x) if x.size > 100 else _twin(x)
    v = gate.verdict(_spec(tmp_path, fast=mixed, twin=_slow(_twin, 0.002)), device=FAKE)
    assert not v.enabled and "on n=256" in v.reason and "faster on 1 of 2" in v.reason


def test_cache_hit_then_keyed_by_source_device_and_mlx(tmp_path, monkeypatch):
    spec = _spec(tmp_path, fast=_twin, twin=_slow(_twin))
    first = gate.verdict(spec, device=FAKE)
    assert first.enabled and not first.cached
    n = spec.calls["twin"]
    gate.reset()
    second = gate.verdict(spec, device=FAKE)
    assert second.cached and second.enabled and spec.calls["twin"] == n  # nothing measured again
    assert second.reason == first.reason and second.source_hash == spec.source_hash
    data = json.loads(gate.cache_path().read_text())
    key = gate.cache_key(spec, FAKE)
    assert key in data and "fake-metal" in key and mx.__version__ in key and spec.source_hash in key
    assert data[key]["enabled"] is True and "cached" not in data[key]

    changed = _spec(tmp_path, fast=_twin, twin=_slow(_twin), source="out[0] = 2;")
    assert changed.source_hash != spec.source_hash
    assert not gate.verdict(changed, device=FAKE).cached and changed.calls["twin"] > 0
    assert not gate.verdict(spec, device=gate.Device("other-metal", True, mx.cpu)).cached
    monkeypatch.setattr(mx, "__version__", "0.0.1-test")
    assert not gate.verdict(spec, device=FAKE).cached
    assert len(json.loads(gate.cache_path().read_text())) == 4  # merged, not overwritten
    monkeypatch.undo()


def test_model_shapes_join_the_key():
    spec = skinny_qmm.SPEC
    a = gate.cache_key(spec, FAKE, {(4096, 4096, 4, 64, "float16")})
    b = gate.cache_key(spec, FAKE, {(4096, 11008, 4, 64, "float16")})
    assert a != b != gate.cache_key(spec, FAKE) and a.startswith(gate.cache_key(spec, FAKE))


def test_a_corrupt_cache_is_measured_again_and_rewritten(tmp_path):
    gate.cache_path().parent.mkdir(parents=True)
    gate.cache_path().write_text("{not json")
    spec = _spec(tmp_path, fast=_twin, twin=_slow(_twin))
    assert not gate.verdict(spec, device=FAKE).cached
    assert gate.cache_key(spec, FAKE) in json.loads(gate.cache_path().read_text())
    assert not list(gate.cache_path().parent.glob(".verdicts.*"))  # no temp file left behind


def test_test_hooks_are_never_cached(tmp_path):
    spec = _spec(tmp_path, fast=_twin, twin=_slow(_twin))
    gate.verdict(spec, device=FAKE, fast_fn=lambda x: x)
    gate.verdict(spec, device=FAKE, cases=[Case("one", (mx.ones(3),))])
    assert not gate.cache_path().exists()


def test_switches_win_over_a_good_verdict(tmp_path, monkeypatch):
    spec = _spec(tmp_path, fast=_twin, twin=_slow(_twin))
    assert gate.verdict(spec, device=FAKE).enabled
    monkeypatch.setenv("MLX_RAY_KERNELS_DISABLE", "toy")
    assert not gate.enabled("toy")  # dispatch re-reads the switches on every call
    v = gate.verdict(spec, device=FAKE)
    assert not v.enabled and "MLX_RAY_KERNELS_DISABLE" in v.reason
    monkeypatch.delenv("MLX_RAY_KERNELS_DISABLE")
    monkeypatch.setenv("MLX_RAY_KERNELS", "0")
    v = gate.verdict(spec, device=FAKE)
    assert not v.enabled and v.reason == "disabled by MLX_RAY_KERNELS=0"
    assert mx.array_equal(gate.dispatch(spec, mx.ones(2)), _twin(mx.ones(2))).item()
