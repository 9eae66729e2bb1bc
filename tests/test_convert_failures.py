"""Failure paths of convert: each is a one-line error and nothing appears under the final name.

Crashes, Ctrl-C and concurrency run real ``mlx-ray convert`` subprocesses. To
hit "mid-write" deterministically the child wraps ``mx.save_safetensors`` (after
writing a shard it kills itself, or sleeps to hold the lock); nothing in the
converter knows about it. Full disk and read-only caches use a private mount
namespace (``unshare -m``) so no mount is visible outside the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fixtures_convert import can_unshare

from mlx_ray.errors import BadRequest, Conflict, CorruptModel

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import mlx.core as mx
    _save, _n = mx.save_safetensors, [0]
    def save(*a, **kw):
        _save(*a, **kw)
        _n[0] += 1
        while os.environ.get("HOOK_HOLD") and not os.path.exists(os.environ["HOOK_HOLD"]):
            time.sleep(0.05)
        if os.environ.get("HOOK_SIGNAL") and _n[0] == 1:
            os.kill(os.getpid(), getattr(signal, os.environ["HOOK_SIGNAL"]))
            time.sleep(5)
    mx.save_safetensors = save
    from mlx_ray.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _child(args: list[str], **env) -> subprocess.Popen:
    e = {**os.environ, **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, "-c", CHILD, "convert", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e)


def _visible(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


def _hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".")) if d.exists() else []


def test_crash_mid_write_leaves_nothing_and_next_convert_recovers(tiny_llama_hf, tmp_path):
    from mlx_ray.conversion.convert import convert
    from mlx_ray.conversion.manifest import verify_model

    p = _child([str(tiny_llama_hf), "--cache-dir", str(tmp_path), "--quiet"], HOOK_SIGNAL="SIGKILL")
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    org = tmp_path / "TinyLlama-random"
    assert _visible(org) == []                       # no q4-g64 under its final name
    hidden = _hidden(org)
    assert ".q4-g64.lock" in hidden                  # the dead process's lock ...
    assert any(h.startswith(".q4-g64.tmp-") for h in hidden)  # ... and its partial staging dir
    # The next convert breaks the stale lock (same host, dead pid) and cleans up.
    path = convert(str(tiny_llama_hf), cache_dir=tmp_path, progress=False)
    assert verify_model(path) == []
    assert _hidden(org) == []


@pytest.mark.parametrize("sig,rc", [("SIGINT", 130), ("SIGTERM", 128 + signal.SIGTERM)])
def test_ctrl_c_or_sigterm_mid_write_cleans_up(tiny_llama_hf, tmp_path, sig, rc):
    p = _child([str(tiny_llama_hf), "--cache-dir", str(tmp_path), "--quiet"], HOOK_SIGNAL=sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == rc, err
    if sig == "SIGINT":
        assert err.strip().splitlines()[-1] == "mlx-ray convert: interrupted"
    org = tmp_path / "TinyLlama-random"
    assert _visible(org) == [] and _hidden(org) == []  # no model, no temp dir, no lock


def test_concurrent_converts_one_waits_one_fails_fast(tiny_llama_hf, tmp_path):
    from mlx_ray.conversion.convert import convert
    from mlx_ray.conversion.manifest import verify_model

    args = [str(tiny_llama_hf), "--cache-dir", str(tmp_path)]
    release = tmp_path / "release-first"
    a = _child([*args, "--quiet"], HOOK_HOLD=release)  # writes one shard, then holds the lock until released
    lock = tmp_path / "TinyLlama-random" / ".q4-g64.lock"
    deadline = time.time() + 60
    while not lock.exists():
        assert time.time() < deadline and a.poll() is None, "first convert never took the lock"
        time.sleep(0.05)
    waiter = subprocess.Popen([sys.executable, "-m", "mlx_ray.cli", "convert", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    with pytest.raises(Conflict, match=f"is being converted by {socket.gethostname()} pid {a.pid}"):
        convert(str(tiny_llama_hf), cache_dir=tmp_path, lock_wait=0, progress=False)
    first_line = waiter.stderr.readline()
    assert "waiting for" in first_line and f"pid {a.pid}" in first_line
    release.touch()
    _, a_err = a.communicate(timeout=120)
    w_out, w_err = waiter.communicate(timeout=120)
    assert a.returncode == 0, a_err
    assert waiter.returncode == 0, w_err
    assert "converted meanwhile" in w_err
    target = tmp_path / "TinyLlama-random" / "q4-g64"
    assert w_out.strip().splitlines()[-1] == str(target)
    assert verify_model(target) == [] and _hidden(target.parent) == []


def test_stale_lock_from_another_host_is_broken_fresh_one_is_not(tmp_path):
    from mlx_ray.conversion.publish import STALE_AFTER, TargetLock

    target = tmp_path / "m" / "q4-g64"
    target.parent.mkdir()
    lock = target.parent / ".q4-g64.lock"
    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "time": 0}))
    with pytest.raises(Conflict, match="being converted by other-node pid 1"):
        TargetLock(target, wait=0).acquire()
    old = time.time() - STALE_AFTER - 5
    os.utime(lock, (old, old))
    with TargetLock(target, wait=0):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
    assert not lock.exists()


def test_existing_target_needs_force(tiny_llama_hf, tmp_path):
    from mlx_ray.conversion.convert import convert

    first = convert(str(tiny_llama_hf), cache_dir=tmp_path, progress=False)
    created = json.loads((first / "manifest.json").read_text())["created"]
    with pytest.raises(Conflict, match="already exists; pass --force"):
        convert(str(tiny_llama_hf), cache_dir=tmp_path, progress=False)
    (first / "marker").write_text("old")
    again = convert(str(tiny_llama_hf), cache_dir=tmp_path, force=True, verify=True, progress=False)
    assert again == first and not (first / "marker").exists()
    assert json.loads((first / "manifest.json").read_text())["created"] >= created
    assert _hidden(first.parent) == []


def test_failed_verify_publishes_nothing(tmp_path, smollm2_hf):
    from fixtures_convert import save_hf_dir, tiny_llama_config, tiny_llama_tensors

    from mlx_ray.conversion.convert import convert

    cfg = tiny_llama_config(vocab=1024)
    tensors = tiny_llama_tensors(cfg)
    del tensors["model.norm.weight"]                 # converts fine, but mlx-lm cannot load it
    src = save_hf_dir(tmp_path / "src" / "Broken", cfg, tensors, tokenizer_from=smollm2_hf)
    with pytest.raises(CorruptModel, match="--verify failed"):
        convert(str(src), cache_dir=tmp_path / "cache", verify=True, progress=False)
    org = tmp_path / "cache" / "Broken"
    assert _visible(org) == [] and _hidden(org) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "missing_shard"])
def test_corrupt_source_shard(tiny_llama_hf, tmp_path, damage):
    from fixtures_convert import run_cli

    from mlx_ray.conversion.convert import convert

    src = tmp_path / "src" / "Damaged"
    shutil.copytree(tiny_llama_hf, src)
    shard = src / "model-00002-of-00003.safetensors"
    if damage == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    else:
        shard.unlink()
    if damage == "truncate":  # one through the CLI for the exit code, the others in-process (faster)
        r = run_cli("convert", str(src), "--cache-dir", str(tmp_path / "cache"))
        assert r.returncode == 6, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert "model-00002-of-00003.safetensors" in r.stderr and "truncated" in r.stderr
    else:
        with pytest.raises(CorruptModel, match="model-00002-of-00003.safetensors") as e:
            convert(str(src), cache_dir=tmp_path / "cache", progress=False)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "cache" / "Damaged" / "q4-g64").exists()


def test_unsupported_architecture_names_it_and_lists_supported(tiny_llama_hf, tmp_path):
    from mlx_ray.conversion.convert import convert

    src = tmp_path / "Weird"
    shutil.copytree(tiny_llama_hf, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="fancy_new_arch", architectures=["FancyNewArchForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadRequest) as e:
        convert(str(src), cache_dir=tmp_path / "cache", progress=False)
    msg = str(e.value)
    assert "FancyNewArchForCausalLM" in msg and "fancy_new_arch" in msg
    assert "llama" in msg and "qwen2" in msg and "\n" not in msg


def test_missing_source_path(tmp_path):
    from fixtures_convert import run_cli

    r = run_cli("convert", str(tmp_path / "nope"), "--cache-dir", str(tmp_path))
    assert r.returncode == 3 and "does not exist" in r.stderr and r.stderr.count("\n") == 1


needs_mount_ns = pytest.mark.skipif(not can_unshare(), reason="needs `unshare -m` (root / user namespaces) "
                                                                "to mount a small or read-only filesystem")


@needs_mount_ns
def test_full_disk_leaves_nothing(tiny_llama_hf, tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    script = (f'mount -t tmpfs -o size=1m tmpfs "{d}" || exit 99; '
              f'{sys.executable} -m mlx_ray.cli convert "{tiny_llama_hf}" --cache-dir "{d}" --no-quantize '
              f'--dtype float32 --quiet; echo "rc=$?"; ls -A "{d}" "{d}/TinyLlama-random"')
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert "rc=1" in r.stdout, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "no space left" in r.stderr
    listing = r.stdout.split("rc=1", 1)[1].split()
    assert "f32" not in listing and not any(x.startswith(".f32") for x in listing), listing


def test_out_writes_exactly_there_and_is_guarded_too(tiny_llama_hf, tmp_path):
    from mlx_ray.conversion.convert import convert
    from mlx_ray.conversion.manifest import verify_model

    out = convert(str(tiny_llama_hf), out=tmp_path / "exact", quantize=False, dtype="float16", progress=False)
    assert out == tmp_path / "exact" and verify_model(out) == []
    with pytest.raises(Conflict):
        convert(str(tiny_llama_hf), out=tmp_path / "exact", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exact"]
