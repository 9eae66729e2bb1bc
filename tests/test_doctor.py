"""`mlx-ray doctor` against a real Ray head, a closed port, and a cache holding a corrupted model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from fixtures_worker import clean_env, free_port

pytestmark = pytest.mark.ray  # run on the cluster's Ray by scripts/test.sh

CLI = [sys.executable, "-m", "mlx_ray.cli", "doctor"]


def doctor(*args, env=None):
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env or clean_env())
    return res


def by_name(report: dict) -> dict:
    return {c["name"]: c for c in report["checks"]}


def make_model(root, name: str, quant: str = "q4-g64"):
    """A small model directory with a real manifest, written by the converter's own manifest code."""
    from safetensors.numpy import save_file

    from mlx_ray.conversion.manifest import write_manifest

    d = root / name / quant
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}, str(d / "model.safetensors"))
    write_manifest(d, name=f"{name}/{quant}", source={"id": name.replace("--", "/")},
                   quantization={"bits": 4, "group_size": 64})
    return d


@pytest.fixture
def good_cache(tmp_path):
    root = tmp_path / "cache"
    make_model(root, "acme--tiny")
    return root


def test_doctor_passes_against_the_reachable_head(ray_head, good_cache):
    res = doctor("--address", ray_head.address, "--token-file", str(ray_head.token_file),
                 "--cache-dir", str(good_cache), "--json")
    report = json.loads(res.stdout)
    fails = [c for c in report["checks"] if c["status"] == "fail"]
    assert res.returncode == 0 and report["ok"] and not fails, fails
    checks = by_name(report)
    assert checks["head"]["status"] == "pass" and checks["versions"]["status"] == "pass"
    assert checks["token-auth"]["status"] == "pass"
    assert checks["model"]["status"] == "pass" and checks["model"]["message"].startswith("acme--tiny/q4-g64: ")
    assert checks["mlx"]["status"] == "pass"
    # every CPU kernel, the batched sampler's primitive included, reports its state
    assert all(f"{k} active" in checks["kernels"]["message"] for k in ("qmm_cpu", "dense_cpu", "sampler_cpu"))
    assert ray_head.token_file.read_text().strip() not in res.stdout
    # every warn and fail carries a one-line fix
    assert all(c["fix"] and "\n" not in c["fix"] for c in report["checks"] if c["status"] in ("warn", "fail"))


def test_doctor_fails_the_head_check_on_a_closed_port(good_cache):
    port = free_port()
    res = doctor("--address", f"127.0.0.1:{port}", "--timeout", "2", "--cache-dir", str(good_cache))
    assert res.returncode == 1
    head = [ln for ln in res.stdout.splitlines() if ln.split()[1:2] == ["head"]]
    assert head and head[0].split()[0] == "FAIL" and f"127.0.0.1:{port}" in head[0]
    assert "fix: " in res.stdout


def test_doctor_fails_on_a_version_mismatch(ray_head, good_cache):
    import ray

    other = "2.60.0" if ray.__version__ == "2.53.0" else "2.53.0"  # this session may run on either
    env = clean_env(MLX_RAY_LOCAL_RAY_VERSION=other)
    res = doctor("--address", ray_head.address, "--token-file", str(ray_head.token_file),
                 "--cache-dir", str(good_cache), "--json", env=env)
    checks = by_name(json.loads(res.stdout))
    assert res.returncode == 1
    assert checks["head"]["status"] == "pass" and checks["versions"]["status"] == "fail"
    assert other in checks["versions"]["message"] and ray.__version__ in checks["versions"]["message"]


def test_doctor_reports_the_corrupted_model(tmp_path):
    root = tmp_path / "cache"
    make_model(root, "acme--good")
    truncated = make_model(root, "acme--truncated") / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    flipped = make_model(root, "acme--flipped") / "model.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF  # same size: only a hash can see it
    flipped.write_bytes(bytes(data))

    res = doctor("--cache-dir", str(root), "--quiet")
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert any(ln.startswith("FAIL") and "acme--truncated/q4-g64" in ln and "model.safetensors" in ln for ln in lines)
    assert not any("acme--good" in ln or "acme--flipped" in ln for ln in lines)  # quiet hides passes
    assert not any(ln.startswith("PASS") for ln in lines)

    from mlx_ray.worker.checks import check_cache

    shallow = {c.message.split(":")[0].split()[0]: c for c in check_cache(str(root), deep=False) if c.name == "model"}
    deep = {c.message.split(":")[0].split()[0]: c for c in check_cache(str(root), deep=True) if c.name == "model"}
    assert shallow["acme--flipped/q4-g64"].status == "pass"  # sizes match: the fast check cannot see it
    assert deep["acme--flipped/q4-g64"].status == "fail" and "sha256" in deep["acme--flipped/q4-g64"].message
    assert deep["acme--good/q4-g64"].status == "pass" and deep["acme--truncated/q4-g64"].status == "fail"


def test_missing_cache_fails_with_a_fix(tmp_path):
    from mlx_ray.worker.checks import check_cache

    (c,) = check_cache(str(tmp_path / "nope"), deep=False)
    assert c.status == "fail" and "MLX_RAY_CACHE" in c.fix


def test_token_settings(tmp_path):
    from mlx_ray.worker.checks import check_token

    token = tmp_path / "token"
    token.write_text("abc\n")
    token.chmod(0o644)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    assert check_token(env).status == "warn" and "chmod 600" in check_token(env).fix
    token.chmod(0o600)
    assert check_token(env).status == "pass"
    assert check_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "x")}).status == "fail"
    assert check_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "x")}).status == "warn"


def test_pmset_sleep_parsing(monkeypatch):
    """pmset exists only on macOS: its output is replayed here (a sample from a Mac mini)."""
    from mlx_ray.worker import checks

    sample = " standby              0\n sleep                {n} (sleep prevented by caffeinate)\n displaysleep         10\n"
    monkeypatch.setattr(checks.sys, "platform", "darwin")
    for n, status in (("0", "pass"), ("1", "warn")):
        monkeypatch.setattr(checks.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
            a, 0, stdout=sample.format(n=n), stderr=""))
        assert checks.check_sleep().status == status
