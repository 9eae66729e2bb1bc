"""mlx_ray/kernels/skinny_qmm: the Metal kernel run under the CPU emulator against its twin, and its dispatch.

The kernel's own .metal source runs here through ``_common.emulate()``
(mlx_ray/kernels/metal_emu compiles the source MLX generates as C++ and runs it on CPU
threads). The gate's device is the one mocked part where a verdict is needed
(``gate.Device("fake-metal", metal=True, mx_device=mx.cpu)``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_ray.kernels import _common, gate, skinny_qmm
from mlx_ray.kernels._common import MetalKernel

from mlx_ray.kernels import metal_emu as emu  # noqa: F401  shipped with the package: a hard import, never a skip

FAKE = gate.Device("fake-metal", metal=True, mx_device=mx.cpu)
EMULATE = skinny_qmm.cases("emulate")


pytestmark = pytest.mark.usefixtures("clean_gate")  # tests/fixtures_kernels.py


def _emulated(case, kernel=None):
    with _common.emulate():
        return skinny_qmm.skinny_qmm(*case.args, **case.kwargs)


@pytest.mark.parametrize("case", EMULATE, ids=[c.label for c in EMULATE])
def test_emulated_kernel_matches_the_twin(case):
    got = _emulated(case)
    want = skinny_qmm.twin(*case.args, **case.kwargs)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert skinny_qmm.check(got, want) is None, skinny_qmm.check(got, want)


def test_twin_on_cpu_is_float32_accurate():
    """The twin's CPU path (f32 upcast) against a float64 NumPy product of the dequantized weights."""
    import numpy as np

    case = skinny_qmm.make_case(5, 64, 256, 4, 64, mx.bfloat16)
    x, w, s, b = case.args
    wd = np.array(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=4), np.float64)
    ref = np.array(x.astype(mx.float32), np.float64) @ wd.T
    got = np.array(skinny_qmm.twin(*case.args, **case.kwargs).astype(mx.float32), np.float64)
    assert np.abs(got - ref).max() <= 2 ** -8 * np.abs(ref).max()


def _broken_kernel(tmp_path, old: str, new: str) -> MetalKernel:
    text = skinny_qmm.KERNEL.source_file.read_text()
    assert old in text
    path = tmp_path / "skinny_qmm_broken.metal"
    path.write_text(text.replace(old, new))
    k = skinny_qmm.KERNEL
    return MetalKernel(k.name + "_broken", k.input_names, k.output_names, path)


@pytest.mark.parametrize("old,new", [
    ("acc[c][m] += s[c] * d + b[c] * xsum;", "acc[c][m] += s[c] * d;"),  # forgets the bias
    ("for (int k = lane * VPL; k < K; k += 32 * VPL)", "for (int k = lane * VPL; k + VPL < K; k += 32 * VPL)"),  # drops the last 8 of K
    ("if (lane == (m & 31) && n < N)", "if (lane == (m & 31) && n < N - 1)"),  # off by one: last column unwritten
], ids=["no-bias", "k-off-by-one", "n-off-by-one"])
def test_a_logic_error_is_caught(tmp_path, monkeypatch, old, new):
    monkeypatch.setattr(skinny_qmm, "KERNEL", _broken_kernel(tmp_path, old, new))
    bad = [skinny_qmm.check(_emulated(c), skinny_qmm.twin(*c.args, **c.kwargs)) for c in EMULATE[:3]]
    assert any(bad), "the emulated run did not catch the injected error"


def test_gate_runs_the_emulated_kernel_and_it_matches():
    with _common.emulate():
        v = gate.verdict(skinny_qmm.SPEC, device=FAKE, cases=EMULATE[:2])
    assert not v.reason.startswith("mismatch"), v.reason
    assert all("problem" not in r and r["max_err"] is not None for r in v.cases)
    # The emulator is far slower than MLX's CPU op, so the verdict is "slower" and the twin serves.
    if not v.enabled:
        assert v.reason.startswith("slower")
        x, w, s, b = EMULATE[0].args
        got = skinny_qmm.quantized_matmul(x, w, s, b, **EMULATE[0].kwargs)
        assert mx.array_equal(got, mx.quantized_matmul(x, w, s, b, transpose=True, **EMULATE[0].kwargs)).item()


class _Tiny(nn.Module):
    def __init__(self, bits=4, group_size=64, dtype=mx.float16):
        super().__init__()
        self.up = nn.Linear(128, 64, bias=True)
        self.down = nn.Linear(64, 128, bias=False)
        self.set_dtype(dtype)
        nn.quantize(self, group_size=group_size, bits=bits)

    def __call__(self, x):
        return self.down(nn.relu(self.up(x)))


def _small_cases(monkeypatch):
    monkeypatch.setattr(skinny_qmm.SPEC, "cases", lambda kind: EMULATE[:1])


def test_a_broken_kernel_is_never_patched_and_the_output_is_the_twins(tmp_path, monkeypatch):
    _small_cases(monkeypatch)
    monkeypatch.setattr(skinny_qmm, "KERNEL", _broken_kernel(tmp_path, "b[c] * xsum", "b[c] * xsum * 2.0f"))
    model = _Tiny()
    x = mx.random.normal((1, 4, 128), key=mx.random.key(1)).astype(mx.float16)
    want = model(x)
    with _common.emulate():
        assert skinny_qmm.patch_model(model, device=FAKE) == 0
        v = gate.latest("skinny_qmm")
        assert not v.enabled and v.reason.startswith("mismatch"), v.reason
        assert type(model.up) is nn.QuantizedLinear
        assert mx.array_equal(model(x), want).item()
        got = skinny_qmm.quantized_matmul(x, model.up.weight, model.up.scales, model.up.biases, group_size=64, bits=4)
    assert mx.array_equal(got, mx.quantized_matmul(x, model.up.weight, model.up.scales, model.up.biases,
                                                   transpose=True, group_size=64, bits=4)).item()


def test_an_enabled_verdict_patches_and_dispatches_at_decode_rows_only(monkeypatch):
    _small_cases(monkeypatch)
    model = _Tiny(bits=8, group_size=32, dtype=mx.float32)
    shapes = skinny_qmm.model_shapes(model)
    assert shapes == {(64, 128, 8, 32, "float32"), (128, 64, 8, 32, "float32")}
    # A verdict measured earlier on this (fake) device, read back from the cache.
    key = gate.cache_key(skinny_qmm.SPEC, FAKE, shapes)
    gate._write_cache(key, gate.Verdict("skinny_qmm", True, "seeded by the test", device=FAKE.name))
    ref = {m: model(mx.random.normal((m, 128), key=mx.random.key(m))) for m in (1, 4, 40)}
    assert skinny_qmm.patch_model(model, device=FAKE) == 2
    assert gate.latest("skinny_qmm").cached and gate.enabled("skinny_qmm")
    assert type(model.up) is skinny_qmm.SkinnyQuantizedLinear
    calls = []
    real = skinny_qmm.skinny_qmm
    monkeypatch.setattr(skinny_qmm, "skinny_qmm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    with _common.emulate():
        for m, want in ref.items():
            got = model(mx.random.normal((m, 128), key=mx.random.key(m)))
            mx.eval(got)
            if m == 4:
                assert skinny_qmm.check(got, want) is None
            else:  # M = 1 and M = 40 stay on MLX's op
                assert mx.array_equal(got, want).item()
    assert calls == [(4, 128), (4, 64)]
    monkeypatch.setenv("MLX_RAY_KERNELS_DISABLE", "skinny_qmm")  # the switch still wins, call by call
    with _common.emulate():
        model(mx.ones((4, 128)))
    assert len(calls) == 2
    assert skinny_qmm.unpatch_model(model) == 2 and type(model.up) is nn.QuantizedLinear


def test_supports():
    x, w, s, b = EMULATE[0].args
    kw = EMULATE[0].kwargs
    assert skinny_qmm.supports(x, w, s, b, **kw)
    assert not skinny_qmm.supports(x[:1], w, s, b, **kw)  # M = 1: MLX's qmv
    assert not skinny_qmm.supports(mx.concatenate([x] * 17), w, s, b, **kw)  # M > 32
    assert not skinny_qmm.supports(x, w, s, None, **kw)
    assert not skinny_qmm.supports(x, w, s, b, group_size=kw["group_size"], bits=2)
    assert not skinny_qmm.supports(x, w, s, b, group_size=16, bits=kw["bits"])
    x3 = x.reshape(1, *x.shape)
    assert skinny_qmm.supports(x3, w, s, b, **kw)
    with _common.emulate():
        y3 = skinny_qmm.skinny_qmm(x3, w, s, b, **kw)
    assert y3.shape == (1, x.shape[0], w.shape[0])


def test_no_metal_no_patch():
    assert skinny_qmm.patch_model(_Tiny()) == 0
    assert gate.latest("skinny_qmm").reason == "no Metal device"
