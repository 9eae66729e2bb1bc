"""``mlx-ray kernels selftest | check``, ``--kernels on|off``, and the verdicts in doctor and the replica's info().

No Metal here: selftest must say so, test the CPU kernels against their twins
and exit 0; a kernel that mismatches must make it exit 1. ``check`` is the
emulator's table (its own tests are in the emulator's file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_ray import kernels_cli
from mlx_ray.kernels import _common, gate


pytestmark = pytest.mark.usefixtures("clean_gate")  # tests/fixtures_kernels.py


def _cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "mlx_ray.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_selftest_on_cpu_says_no_metal_and_passes(tmp_path):
    out = tmp_path / "selftest.json"
    p = _cli("kernels", "selftest", "--quick", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert kernels_cli.NO_METAL_NOTE in p.stdout and "selftest: ok" in p.stdout
    report = json.loads(out.read_text())
    assert report["metal"] is False and report["ok"] is True and not report["skipped_modules"]
    kernels = {r["kernel"] for r in report["rows"]}
    assert {"qmm_cpu", "dense_cpu"} <= kernels
    assert all("problem" not in r and r["kernel_ms"] > 0 and r["twin_ms"] > 0 for r in report["rows"])
    assert not any(r["path"] == "metal" for r in report["rows"])
    verdicts = {v["name"]: v for v in report["verdicts"]}
    assert "skinny_qmm" in verdicts and all(v["reason"] == "no Metal device" for v in verdicts.values())
    for name, spec in _common.kernels().items():  # every kernel with a CPU path was tested against its twin
        if spec.cpu_fn is not None:
            assert name in kernels


def test_selftest_fails_on_a_mismatching_cpu_kernel(monkeypatch, capsys):
    from mlx_ray.kernels._common import Case, KernelSpec

    def wrong(x):
        return x + 1e-2

    bad = KernelSpec("wrong_cpu", [], wrong, lambda x: x, wrong, lambda kind: [Case("n=8", (mx.ones(8),))],
                     "exact", lambda got, want: None if _common.max_abs_err(got, want) == 0 else "differs")
    monkeypatch.setattr(kernels_cli, "cpu_specs", lambda: [bad, ("absent_cpu", "extension not built")])
    monkeypatch.setattr(_common, "kernels", lambda: {})  # only the bad one (the real ones: the test above)
    monkeypatch.setattr(_common, "SKIPPED", {})
    rc = kernels_cli.main(argparse.Namespace(action="selftest", json=None, quick=True))
    text = capsys.readouterr().out
    assert rc == 1 and "MISMATCH: differs" in text and "absent_cpu: not active here: extension not built" in text
    assert "selftest: FAILED" in text


def test_check_renders_rows_and_exits_on_failure(monkeypatch, capsys):
    import types

    fake = types.ModuleType("mlx_ray.kernels.metal_emu")
    ok = {"kernel": "a", "case": "x", "typecheck": True, "emulated": True, "reason": "", "ms": 1.0}
    fake.check_all = lambda: [ok, {**ok, "kernel": "b", "emulated": False, "reason": "forward order: max err 3"}]
    monkeypatch.setitem(sys.modules, "mlx_ray.kernels.metal_emu", fake)
    import mlx_ray.kernels as pkg
    monkeypatch.setattr(pkg, "metal_emu", fake, raising=False)
    assert kernels_cli.main(argparse.Namespace(action="check", json=None)) == 1
    text = capsys.readouterr().out
    assert "max err 3" in text and "check: FAILED" in text
    fake.check_all = lambda: [ok]
    assert kernels_cli.main(argparse.Namespace(action="check", json=None)) == 0
    fake.check_all = lambda: [ok, {**ok, "typecheck": False, "reason": "type-check: error: x"}]
    assert kernels_cli.main(argparse.Namespace(action="check", json=None)) == 1
    fake.check_all = lambda: [ok, {**ok, "kernel": "m", "case": "-", "typecheck": False, "emulated": False,
                                   "reason": "not registered: ImportError"}]
    assert kernels_cli.main(argparse.Namespace(action="check", json=None)) == 1
    fake.check_all = lambda: []
    assert kernels_cli.main(argparse.Namespace(action="check", json=None)) == 1


def test_check_runs_the_emulator_and_passes(tmp_path):
    out = tmp_path / "check.json"
    p = _cli("kernels", "check", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows and "check: ok" in p.stdout
    assert "skinny_qmm" in {r["kernel"] for r in rows}
    assert all(r["typecheck"] and r["emulated"] and not r["reason"] for r in rows)


def test_kernels_flag_off_and_on(monkeypatch):
    from mlx_ray.kernels import dense, qmm

    monkeypatch.setattr(os, "environ", dict(os.environ))  # apply_kernels_flag writes the process env
    kernels_cli.apply_kernels_flag("off")
    assert os.environ["MLX_RAY_KERNELS"] == "0"
    assert not qmm.status()["active"] and not dense.status()["active"]
    assert gate.verdict("skinny_qmm").reason == "disabled by MLX_RAY_KERNELS=0"
    kernels_cli.apply_kernels_flag("on")
    assert qmm.status()["active"] == qmm.extension_state().active
    assert gate.verdict("skinny_qmm").reason == "no Metal device"
    kernels_cli.apply_kernels_flag(None)
    assert os.environ["MLX_RAY_KERNELS"] == "1"
    qmm.reset()
    dense.reset()


@pytest.mark.parametrize("module", ["mlx_ray.bench.cli", "mlx_ray.parity.cli"])
def test_bench_and_parity_take_the_flag(module):
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(module).configure_parser(parser)
    extra = [] if module.endswith("bench.cli") else ["--hf", "x", "--mlx", "y"]
    assert parser.parse_args(extra + ["--kernels", "off"]).kernels == "off"
    assert parser.parse_args(extra).kernels is None
    with pytest.raises(SystemExit):
        parser.parse_args(extra + ["--kernels", "maybe"])


def test_doctor_reports_each_metal_kernel(monkeypatch):
    from mlx_ray.worker import checks

    lines = {c.name: c for c in checks.check_metal_kernels()}
    assert lines["kernel skinny_qmm"].status == "skip" and lines["kernel skinny_qmm"].message == "off: no Metal device"
    # A device where the Metal path fails (here: a "Metal" device that is really the CPU, where
    # MLX refuses to run a Metal kernel) is a warning with a fix, and the kernel stays off.
    gate.reset()
    monkeypatch.setattr(gate, "current_device", lambda: gate.Device("fake-metal", True, mx.cpu))
    monkeypatch.setattr(_common, "KERNELS", {"skinny_qmm": _common.get("skinny_qmm")})
    monkeypatch.setattr(_common, "SKIPPED", {})
    from mlx_ray.kernels import skinny_qmm
    monkeypatch.setattr(skinny_qmm.SPEC, "cases", lambda kind: [skinny_qmm.make_case(2, 64, 128, 4, 64)])
    (line,) = checks.check_metal_kernels()
    assert line.status == "warn" and "mismatch on M=2" in line.message and "Metal" in line.message and line.fix
    assert not gate.enabled("skinny_qmm")


def test_replica_info_has_the_verdicts():
    from mlx_ray.serve.server import _runtime_facts

    facts = _runtime_facts()
    assert facts["metal_kernels"]["skinny_qmm"]["enabled"] is False
    assert facts["metal_kernels"]["skinny_qmm"]["reason"] == "no Metal device"
    assert "qmm_cpu" in facts["kernels"]


def test_bench_kernels_off_runs_the_stock_ops(mlx_f32, tmp_path, monkeypatch):
    """`mlx-ray bench --kernels off`: the f32 fixture is not patched (dense_cpu would be), and the JSON says so."""
    from mlx_ray.cli import main as cli_main
    from mlx_ray.kernels import dense, qmm

    monkeypatch.setenv("MLX_RAY_BLAS_REEXEC", "1")  # no re-exec inside pytest (as tests/test_bench.py)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    out = tmp_path / "b.json"
    rc = cli_main(["bench", "--model", str(mlx_f32), "--backends", "mlx", "--quick", "--bandwidth-gbs", "20",
                   "--kernels", "off", "--json", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["kernels"] == "off" and r["backends"]["mlx"]["cpu_kernel"] is False
    assert os.environ["MLX_RAY_KERNELS"] == "0"
    monkeypatch.undo()
    qmm.reset()
    dense.reset()
