"""``mlx-ray models list|verify|rm`` and the read-only cache.

The read-only case mounts the cache read-only in a private mount namespace
(``unshare -m`` + ``mount -o remount,bind,ro``): tests run as root, and a
chmod would not stop root from writing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from fixtures_convert import can_unshare, run_cli

from mlx_ray.errors import NotFound


@pytest.fixture(scope="module")
def cache(tiny_llama_hf, tmp_path_factory):
    from mlx_ray.conversion.convert import convert

    root = tmp_path_factory.mktemp("models_cache")
    convert(str(tiny_llama_hf), cache_dir=root, progress=False)
    convert(str(tiny_llama_hf), cache_dir=root, quantize=False, dtype="bfloat16", progress=False)
    return root


def test_list_table_and_json(cache):
    r = run_cli("models", "list", "--cache-dir", str(cache))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "QUANTIZATION", "SIZE", "SOURCE"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["TinyLlama-random/bf16", "bf16"],
                                                    ["TinyLlama-random/q4-g64", "q4-g64"]]
    r = run_cli("models", "list", "--json", "--cache-dir", str(cache))
    rows = json.loads(r.stdout)
    assert {x["name"] for x in rows} == {"TinyLlama-random/bf16", "TinyLlama-random/q4-g64"}
    for x in rows:
        assert x["size"] == json.loads((cache / x["name"] / "manifest.json").read_text())["total_size"]
        assert x["source"].endswith("TinyLlama-random")


def test_verify_ok_then_detects_corruption_and_truncation(cache, tmp_path):
    from mlx_ray.conversion.cache import verify_model

    model = tmp_path / "copy"
    shutil.copytree(cache / "TinyLlama-random" / "q4-g64", model)
    r = run_cli("models", "verify", str(model))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    shard = sorted(model.glob("model*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF                                # flip one byte of tensor data: same size
    shard.write_bytes(bytes(data))
    assert verify_model(model, deep=False) == []     # the fast check only sees sizes and headers
    r = run_cli("models", "verify", str(model))
    assert r.returncode == 6 and "sha256 mismatch" in r.stderr and r.stderr.count("\n") == 1
    assert f"{shard.name}: sha256 mismatch" in r.stdout
    shard.write_bytes(bytes(data[:-100]))            # truncated
    problems = verify_model(model, deep=False)
    assert len(problems) == 1 and "truncated" in problems[0]
    r = run_cli("models", "verify", "--json", str(model))
    out = json.loads(r.stdout)
    assert r.returncode == 6 and out["ok"] is False and "truncated" in out["problems"][0]


def test_verify_by_cache_name_and_unknown_name(cache):
    r = run_cli("models", "--cache-dir", str(cache), "verify", "TinyLlama-random/bf16")
    assert r.returncode == 0 and "OK" in r.stdout
    r = run_cli("models", "--cache-dir", str(cache), "verify", "TinyLlama-random/q8-g64")
    assert r.returncode == 3 and "variants bf16, q4-g64" in r.stderr and r.stderr.count("\n") == 1


def test_resolve_model_rules(cache):
    from mlx_ray.conversion.cache import resolve_model

    q4 = cache / "TinyLlama-random" / "q4-g64"
    assert resolve_model("TinyLlama-random/q4-g64", cache) == q4
    assert resolve_model(str(q4)) == q4.resolve()
    with pytest.raises(NotFound, match="variants bf16, q4-g64"):
        resolve_model("TinyLlama-random", cache)     # ambiguous: two variants
    with pytest.raises(NotFound, match="models list"):
        resolve_model("nothing/here", cache)


def test_rm(tiny_llama_hf, tmp_path):
    from mlx_ray.conversion.cache import list_models
    from mlx_ray.conversion.convert import convert

    convert(str(tiny_llama_hf), cache_dir=tmp_path, quantize=False, dtype="float16", progress=False)
    r = run_cli("models", "rm", "TinyLlama-random/f16", "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert list_models(tmp_path) == [] and not any(tmp_path.iterdir())
    r = run_cli("models", "rm", "TinyLlama-random/f16", "--cache-dir", str(tmp_path))
    assert r.returncode == 3


@pytest.mark.skipif(not can_unshare(), reason="needs `unshare -m` to mount the cache read-only")
def test_read_only_cache(cache, tiny_llama_hf, tmp_path):
    ro = tmp_path / "ro"
    shutil.copytree(cache, ro)
    cli = f"{sys.executable} -m mlx_ray.cli"
    script = "; ".join([
        f'mount --bind "{ro}" "{ro}" && mount -o remount,bind,ro "{ro}" || exit 99',
        f'touch "{ro}/probe" 2>/dev/null && echo WRITABLE',
        f'{cli} models list --cache-dir "{ro}"; echo "list_rc=$?"',
        f'{cli} models verify TinyLlama-random/q4-g64 --cache-dir "{ro}"; echo "verify_rc=$?"',
        f'{cli} models rm TinyLlama-random/q4-g64 --cache-dir "{ro}"; echo "rm_rc=$?"',
        f'{cli} convert "{tiny_llama_hf}" --cache-dir "{ro}" --q-bits 8 --quiet; echo "convert_rc=$?"',
        f'{cli} convert "{tiny_llama_hf}" --cache-dir "{ro}/new-org-dir" --quiet; echo "convert2_rc=$?"',
    ])
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    out, err = r.stdout, r.stderr
    assert "WRITABLE" not in out, "the read-only mount did not take"
    assert "list_rc=0" in out and "TinyLlama-random/q4-g64" in out
    assert "verify_rc=0" in out and ": OK" in out
    assert "rm_rc=5" in out and "convert_rc=5" in out and "convert2_rc=5" in out, (out, err)
    errors = [ln for ln in err.splitlines() if ln.strip()]
    assert len(errors) == 3 and all("read-only" in ln for ln in errors), errors
    assert "Traceback" not in err
