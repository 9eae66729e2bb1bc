"""mlx_ray/kernels/_common.py: the Metal kernel wrapper, the spec registry, the switches, emulation routing.

No Metal here: calling a MetalKernel outside emulation must reach MLX (which
refuses with "No Metal back-end"); inside ``emulate()`` it must reach
``kernels.metal_emu.run``, replaced here by a recorder (the emulator itself is
tested in its own file).
"""

from __future__ import annotations

import sys
import types

import mlx.core as mx
import pytest

from mlx_ray.kernels import _common as c


@pytest.fixture
def metal_file(tmp_path):
    p = tmp_path / "k.metal"
    p.write_text("inline float twice(float v) { return 2 * v; }\n// --- body ---\n"
                 "uint i = thread_position_in_grid.x;\nout[i] = twice(a[i]);\n")
    return p


def test_split_source_header_and_body(metal_file):
    header, body = c.split_source(metal_file.read_text())
    assert header == "inline float twice(float v) { return 2 * v; }\n"
    assert body.startswith("uint i") and "--- body ---" not in body
    assert c.split_source("out[0] = 1;") == ("", "out[0] = 1;")


def test_metal_kernel_attributes_and_hash(metal_file, tmp_path):
    k = c.MetalKernel("twice", ["a"], ["out"], metal_file, header="#define X 1\n")
    assert (k.name, k.input_names, k.output_names) == ("twice", ["a"], ["out"])
    assert k.header.startswith("#define X 1\ninline float twice")
    assert "out[i] = twice(a[i]);" in k.source
    same = c.MetalKernel("twice", ["a"], ["out"], metal_file, header="#define X 1\n")
    assert same.source_hash == k.source_hash and len(k.source_hash) == 64
    other = tmp_path / "k2.metal"
    other.write_text(metal_file.read_text().replace("2 * v", "3 * v"))
    assert c.MetalKernel("twice", ["a"], ["out"], other, header="#define X 1\n").source_hash != k.source_hash
    assert c.MetalKernel("twice", ["a"], ["out"], metal_file).source_hash != k.source_hash  # header counts


def test_metal_kernel_goes_to_mlx_without_emulation(metal_file):
    k = c.MetalKernel("twice", ["a"], ["out"], metal_file)
    assert k._mx_kernel is None  # built lazily
    with pytest.raises(Exception, match="Metal"):
        out = k(inputs=[mx.ones(4)], output_shapes=[(4,)], output_dtypes=[mx.float32], grid=(4, 1, 1),
                threadgroup=(4, 1, 1))
        mx.eval(out)
    assert k._mx_kernel is not None


def test_emulate_routes_to_metal_emu(metal_file, monkeypatch):
    calls = []
    fake = types.ModuleType("mlx_ray.kernels.metal_emu")
    fake.run = lambda kernel, **kw: calls.append((kernel, kw)) or [mx.zeros(4)]
    monkeypatch.setitem(sys.modules, "mlx_ray.kernels.metal_emu", fake)
    import mlx_ray.kernels as pkg
    monkeypatch.setattr(pkg, "metal_emu", fake, raising=False)
    k = c.MetalKernel("twice", ["a"], ["out"], metal_file)
    kw = dict(inputs=[mx.ones(4)], output_shapes=[(4,)], output_dtypes=[mx.float32], grid=(4, 1, 1),
              threadgroup=(4, 1, 1), template=[("T", mx.float32)])
    assert not c.emulating()
    with c.emulate():
        assert c.emulating()
        out = k(**kw)
    assert not c.emulating()
    assert calls and calls[0][0] is k and calls[0][1]["template"] == [("T", mx.float32)]
    assert calls[0][1]["grid"] == (4, 1, 1) and calls[0][1]["init_value"] is None
    assert out[0].shape == (4,) and k._mx_kernel is None  # MLX was never asked
    monkeypatch.setenv("MLX_RAY_METAL_EMULATE", "1")
    assert c.emulating()
    k(**kw)
    assert len(calls) == 2
    monkeypatch.setenv("MLX_RAY_METAL_EMULATE", "0")
    assert not c.emulating()


def test_env_switches(monkeypatch):
    monkeypatch.delenv("MLX_RAY_KERNELS", raising=False)
    monkeypatch.delenv("MLX_RAY_KERNELS_DISABLE", raising=False)
    assert c.enabled_by_env("skinny_qmm") and c.env_disabled("skinny_qmm") is None
    monkeypatch.setenv("MLX_RAY_KERNELS_DISABLE", "sampler, skinny_qmm")
    assert not c.enabled_by_env("skinny_qmm") and "MLX_RAY_KERNELS_DISABLE" in c.env_disabled("skinny_qmm")
    assert c.enabled_by_env("other")
    monkeypatch.delenv("MLX_RAY_KERNELS_DISABLE")
    for off in ("0", "off", "false"):
        monkeypatch.setenv("MLX_RAY_KERNELS", off)
        assert c.env_disabled("other") == "disabled by MLX_RAY_KERNELS=0"


def test_metal_available_matches_mlx():
    assert c.metal_available() == mx.metal.is_available()


def test_registry_skips_a_broken_module_with_reason(monkeypatch, caplog):
    monkeypatch.setattr(c, "KERNEL_MODULES", ("mlx_ray.kernels.no_such_kernel",) + c.KERNEL_MODULES)
    monkeypatch.setattr(c, "_loaded", False)
    monkeypatch.setattr(c, "KERNELS", {})
    monkeypatch.setattr(c, "SKIPPED", {})
    with caplog.at_level("WARNING", logger="mlx_ray.kernels"):
        specs = c.kernels()
    assert "ModuleNotFoundError" in c.SKIPPED["mlx_ray.kernels.no_such_kernel"]
    assert "no_such_kernel" in caplog.text
    assert "skinny_qmm" in specs  # the others still register
    for name, spec in specs.items():
        assert spec.name == name and spec.metal_kernels and callable(spec.twin) and spec.tolerance
        assert spec.cases("emulate") and spec.cases("device")
    with pytest.raises(KeyError, match="no_such"):
        c.get("no_such")


def test_max_abs_err_and_timing():
    a, b = mx.array([1.0, 2.0, 3.0]), mx.array([1.0, 2.5, 3.0])
    assert c.max_abs_err(a, b) == 0.5
    assert c.max_abs_err((a, a), (a, b)) == 0.5
    assert c.max_abs_err(a, mx.ones(2)) == float("inf")
    assert c.max_abs_err([a], [a, a]) == float("inf")
    assert c.max_abs_err(mx.array([float("nan")]), mx.array([0.0])) == float("inf")
    out, ms = c.time_ms(lambda x: x * 2, (a,), {}, warmup=1, reps=3)
    assert out.tolist() == [2.0, 4.0, 6.0] and ms >= 0


def test_on_device_restores_default():
    before = mx.default_device()
    with c.on_device(mx.cpu):
        assert mx.default_device() == mx.cpu
    assert mx.default_device() == before
