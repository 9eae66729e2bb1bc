"""The shared model cache: ``ROOT/<org>--<name>/<quant tag>/``.

``ROOT`` is ``$MLX_RAY_CACHE``, else ``~/.cache/mlx-ray/models``. Every node of
the cluster mounts the same ROOT (NFS); a Mac typically mounts it read-only,
so everything here except :func:`remove_model` only reads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlx_ray.errors import NotFound

from .manifest import read_manifest, verify_model  # noqa: F401  (re-exported API)
from .publish import TargetLock, writable_error


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("MLX_RAY_CACHE"):
        return Path(os.environ["MLX_RAY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "mlx-ray" / "models"


def source_dir_name(source: str) -> str:
    """``HuggingFaceTB/SmolLM2-135M-Instruct`` -> ``HuggingFaceTB--SmolLM2-135M-Instruct``; a path -> its name."""
    p = Path(source).expanduser()
    if p.exists():
        from .source import SNAPSHOT_RE

        m = SNAPSHOT_RE.search(str(p.resolve()))
        return f"{m['org']}--{m['name']}" if m else p.resolve().name
    return source.strip("/").replace("/", "--")


def model_dir_name(source: str, quant_tag: str) -> str:
    """Cache-relative name of a converted model, e.g. ``HuggingFaceTB--SmolLM2-135M-Instruct/q4-g64``."""
    return f"{source_dir_name(source)}/{quant_tag}"


@dataclass
class ModelEntry:
    name: str             # cache name, as `models list` prints and `resolve_model` accepts
    path: str
    quantization: str     # the quant tag (q4-g64, bf16, mxfp4, ...)
    size: int             # bytes on disk
    source: str | None
    revision: str | None
    created: str | None
    adapters: list[dict] = field(default_factory=list)  # fine-tuned adapters of this model (`adapter_entries`)

    def as_dict(self) -> dict:
        return asdict(self)


def adapter_entries(model_dir: Path, model_name: str) -> list[dict]:
    """The adapters published next to a model (``<tag>-adapters/NAME``), one dict each; a broken one has
    ``error`` set instead of its manifest's fields."""
    from mlx_ray.adapters import adapter_dir, scan_adapters

    out = []
    for name, m in scan_adapters(model_dir):
        d = {"name": name, "model": f"{model_name}:{name}", "path": str(adapter_dir(model_dir, name))}
        if isinstance(m, Exception):
            out.append({**d, "error": str(m)})
            continue
        size = sum(f.get("size", 0) for f in m.files.values())
        out.append({**d, "fine_tune_type": m.fine_tune_type, "rank": m.rank, "num_layers": m.num_layers,
                    "base_quantized": m.base_quantized, "size": size, "iterations": m.iterations,
                    "train_loss": m.train_loss, "val_loss": m.val_loss, "created": m.created,
                    "base_hash": m.base_hash, "error": None})
    return out


def _entry(root: Path, d: Path) -> ModelEntry:
    try:
        m = read_manifest(d) or {}
    except Exception:  # noqa: BLE001 - a broken manifest must not hide the model from `list`
        m = {}
    src = m.get("source", {})
    size = m.get("total_size") or sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    name = str(d.relative_to(root))
    return ModelEntry(name=name, path=str(d), quantization=d.name, size=size,
                      source=src.get("id") or src.get("path"), revision=src.get("revision"),
                      created=m.get("created"), adapters=adapter_entries(d, name))


def list_models(cache_dir: str | Path | None = None) -> list[ModelEntry]:
    """Published models under the cache root (temp dirs and locks are hidden)."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return []
    out = []
    for org in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for d in sorted(p for p in org.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (d / "config.json").is_file():
                out.append(_entry(root, d))
    return out


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> Path:
    """A model directory from a cache name (as `models list` prints it) or a path."""
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    root = cache_root(cache_dir)
    candidates = [spec, spec.replace("/", "--", 1) if spec.count("/") >= 2 else None]
    for c in filter(None, candidates):
        d = root / c
        if (d / "config.json").is_file() and not any(part.startswith(".") for part in Path(c).parts):
            return d
    # A source name without a variant is fine when exactly one variant exists; a
    # wrong variant of a known source lists the ones that exist.
    clean = spec.strip("/")
    whole = root / clean.replace("/", "--") if clean.count("/") <= 1 else None
    parent = root / clean.split("/")[0] if clean.count("/") == 1 else None
    base, variants = None, []
    for cand in (whole, parent):
        if cand is not None and cand.is_dir() and not cand.name.startswith("."):
            base = cand
            variants = sorted(x.name for x in cand.iterdir()
                              if (x / "config.json").is_file() and not x.name.startswith("."))
            if variants:
                break
    if base is whole and len(variants) == 1:
        return base / variants[0]
    hint = (f"it has variants {', '.join(variants)}: use {base.name}/<variant>" if variants
            else "run `mlx-ray models list` to see what is there, or `mlx-ray convert` it first")
    raise NotFound(f"model {spec!r} not found in cache {root} and not a model directory; {hint}", param="model")


def remove_model(spec: str, cache_dir: str | Path | None = None) -> Path:
    """Delete a model from the cache (under its convert lock, via an atomic rename first), with its adapters;
    ``BASE:ADAPTER`` deletes one adapter."""
    from mlx_ray.adapters import adapters_root, parse_model_name, resolve_adapter

    root = cache_root(cache_dir)
    if parse_model_name(spec)[1] is not None:
        _, target = resolve_adapter(spec, cache_dir)
        _remove_dir(target)
        return target
    target = resolve_model(spec, cache_dir)
    if root.resolve() not in target.resolve().parents:
        raise NotFound(f"{spec} is not inside the cache {root}; remove directories outside it yourself",
                       param="model")
    with TargetLock(target, wait=30):
        _remove_dir(target, locked=True)
        if adapters_root(target).is_dir():  # an adapter is useless without its base
            _remove_dir(adapters_root(target), locked=True)  # the base's lock guards its adapters
    org = target.parent
    if org != root and not any(org.iterdir()):
        with contextlib.suppress(OSError):
            org.rmdir()
    return target


def _remove_dir(target: Path, locked: bool = False) -> None:
    """Rename ``target`` aside (under its lock unless ``locked``), then delete it."""
    grave = target.parent / f".{target.name}.trash-rm-{os.getpid()}"
    try:
        with contextlib.nullcontext() if locked else TargetLock(target, wait=30):
            os.rename(target, grave)
    except OSError as e:
        raise writable_error(target, e) from e
    shutil.rmtree(grave, ignore_errors=True)
