"""Where the weights come from: a local HF directory or a hub repo id.

Hub ids go through huggingface_hub's ``snapshot_download`` (its cache layout,
revisions and offline mode). ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE``
are read at call time, not at import time as huggingface_hub's constants are,
so a process that changes them (tests, a long-lived worker) is honoured.

Every safetensors header is checked before any work starts, so a truncated
or corrupt shard fails fast with a one-line error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from mlx_ray.errors import BadRequest, CorruptModel, NotFound

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
# Files that are weights (or their index) and never copied verbatim to the output.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".npz")
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", ".gitattributes",
              "README.md", "manifest.json"}
SNAPSHOT_RE = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{40})/?$")


@dataclass
class Source:
    spec: str                 # what the user typed
    path: Path                # local directory holding config.json and the shards
    repo_id: str | None       # hub id when known
    revision: str | None      # commit hash when known
    shards: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Cache directory name for this source: ``org--name`` or the local directory's name."""
        return (self.repo_id or self.path.name).replace("/", "--")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home) / "hub"


def _looks_like_repo_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not spec.startswith((".", "/", "~"))


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = _env_true("HF_HUB_OFFLINE")
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(),
                                 allow_patterns=ALLOW_PATTERNS, local_files_only=offline)
    except (LocalEntryNotFoundError, FileNotFoundError) as e:
        where = "offline (HF_HUB_OFFLINE=1)" if offline else "and the hub is unreachable"
        raise NotFound(f"repo {repo_id}{'@' + revision if revision else ''} is not in the hub cache "
                       f"{hub_cache_dir()} {where}; download it on a connected machine or pass a local directory",
                       param="source") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise NotFound(f"repo {repo_id}{'@' + revision if revision else ''} not found on the hub "
                       f"({type(e).__name__}); check the id, revision and HF_TOKEN", param="source") from e
    except OSError as e:  # network errors surface as OSError subclasses
        raise NotFound(f"cannot fetch {repo_id}: {e}; set HF_HUB_OFFLINE=1 to use the local hub cache",
                       param="source") from e
    return Path(path)


def resolve_source(spec: str, revision: str | None = None) -> Source:
    """Find the checkpoint directory for ``spec`` (local path first, then hub id)."""
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise BadRequest(f"source {spec} is a file; pass the model directory that holds config.json",
                             param="source")
        p = p.resolve()
        m = SNAPSHOT_RE.search(str(p))
        repo_id = f"{m['org']}/{m['name']}" if m else None
        rev = m["rev"] if m else revision
        src = Source(spec, p, repo_id, rev)
    elif _looks_like_repo_id(spec):
        path = _download(spec, revision)
        src = Source(spec, path, spec, path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else revision)
    else:
        raise NotFound(f"source {spec} does not exist; pass a local HF model directory or a hub repo id "
                       f"like HuggingFaceTB/SmolLM2-135M-Instruct", param="source")
    if not (src.path / "config.json").is_file():
        raise NotFound(f"{src.path} has no config.json; is it a Hugging Face model directory?", param="source")
    src.shards = weight_shards(src.path)
    return src


def weight_shards(path: Path) -> list[Path]:
    """The safetensors shards, in index order when there is an index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CorruptModel(f"{index} is not a valid safetensors index: {e}") from e
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CorruptModel(f"{path} is missing shard(s) {', '.join(missing[:3])} listed in its index; "
                               f"re-download the checkpoint")
        return [path / n for n in names]
    shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not shards:
        other = [p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES]
        hint = (f"found {', '.join(other[:3])}; only safetensors checkpoints are supported, re-save with "
                f"save_pretrained(safe_serialization=True)") if other else "no weight files at all"
        raise NotFound(f"{path} has no *.safetensors weights ({hint})", param="source")
    return shards


def read_header(path: Path) -> dict:
    """Parse and bounds-check a safetensors header; CorruptModel (one line) when it is broken."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModel(f"corrupt safetensors file {path}: {e}; re-download or re-convert it") from e
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            a, b = v["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise CorruptModel(f"corrupt safetensors file {path}: bad entry {k!r}") from e
        end = max(end, b)
    if 8 + n + end != size:
        raise CorruptModel(f"truncated or corrupt safetensors file {path}: header says {8 + n + end} bytes, "
                           f"file has {size}; re-download or re-convert it")
    return header


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of a file; a hub blob named by its sha256 (LFS files) is trusted, not re-read."""
    real = Path(os.path.realpath(path))
    if re.fullmatch(r"[0-9a-f]{64}", real.name) and real.parent.name == "blobs":
        return real.name
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def copy_files(src: Path) -> list[Path]:
    """Non-weight files to carry over verbatim (tokenizer, chat template, generation config, code)."""
    out = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in SKIP_FILES and not p.name.endswith(WEIGHT_SUFFIXES) \
                and not p.name.startswith("."):
            out.append(p)
    return out
