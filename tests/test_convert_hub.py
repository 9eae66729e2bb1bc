"""Hub repo ids resolve through huggingface_hub's real offline path (HF_HOME + HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os

import pytest

from mlx_ray.errors import NotFound
from mlx_ray.fixtures import FIXTURE_REVISION, REPO_ID


@pytest.fixture
def offline_hub(hub_home, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_home


def test_repo_id_converts_offline_from_hub_cache(offline_hub, tmp_path):
    from mlx_ray.conversion.cache import list_models, resolve_model
    from mlx_ray.conversion.convert import convert
    from mlx_ray.conversion.manifest import read_manifest

    path = convert(REPO_ID, cache_dir=tmp_path, quantize=False, dtype="bfloat16", progress=False)
    assert path == tmp_path / "HuggingFaceTB--SmolLM2-135M-Instruct" / "bf16"
    m = read_manifest(path)
    assert m["source"]["id"] == REPO_ID and m["source"]["revision"] == FIXTURE_REVISION
    assert str(offline_hub) in m["source"]["path"]
    assert resolve_model("HuggingFaceTB--SmolLM2-135M-Instruct/bf16", tmp_path) == path
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == path  # single variant
    (entry,) = list_models(tmp_path)
    assert (entry.name, entry.quantization, entry.source) == ("HuggingFaceTB--SmolLM2-135M-Instruct/bf16", "bf16",
                                                              REPO_ID)


def test_unknown_repo_offline_is_not_found(offline_hub, tmp_path):
    from mlx_ray.conversion.convert import convert

    with pytest.raises(NotFound, match="not in the hub cache .* offline") as e:
        convert("nobody/no-such-model", cache_dir=tmp_path, progress=False)
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())


def test_unknown_revision_offline_is_not_found(offline_hub, tmp_path):
    from mlx_ray.conversion.convert import convert

    with pytest.raises(NotFound):
        convert(REPO_ID, cache_dir=tmp_path, revision="v9.9", progress=False)


def test_cli_unknown_repo_offline_exit_code(offline_hub, tmp_path):
    from fixtures_convert import run_cli

    r = run_cli("convert", "nobody/no-such-model", "--cache-dir", str(tmp_path), env=dict(os.environ))
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("\n") == 1 and "nobody/no-such-model" in r.stderr and "Traceback" not in r.stderr
