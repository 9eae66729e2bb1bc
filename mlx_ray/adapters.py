"""Fine-tuned adapters on the model cache: where they live and what their manifest says.

The layout (a contract: ``mlx-ray finetune`` writes it, the engine loads by it):

    <cache_root>/<org>--<name>/<tag>/                  the base model (``<org>--<name>/<tag>`` is its cache name)
    <cache_root>/<org>--<name>/<tag>-adapters/NAME/    adapter NAME of that base:
        adapters.safetensors                           mlx-lm's files, as ``mlx_lm.lora`` writes them, so
        adapter_config.json                            ``mlx_lm.load(base, adapter_path=DIR)`` loads them
        manifest.json                                  mlx-ray's (:class:`AdapterManifest`)

A request names one as ``<base>:<adapter>`` (:func:`parse_model_name`). ``<tag>-adapters`` has no
``config.json``, so the cache scanners never take it for a model. An adapter is published atomically under
the same lock as a conversion (``mlx_ray.conversion.publish``), so a reader sees all of it or none.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlx_ray.errors import BadRequest, CorruptModel, NotFound

ADAPTERS_SUFFIX = "-adapters"
WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
FORMAT = "mlx-ray-adapter/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdapterManifest(BaseModel):
    """``manifest.json`` of a published adapter."""

    model_config = ConfigDict(extra="allow")

    format: str = Field(FORMAT, description="layout version")
    name: str = Field(description="the adapter's name (its directory's name)")
    base: str = Field(description="the base model's cache name, e.g. HuggingFaceTB--SmolLM2-135M-Instruct/f32")
    base_hash: str | None = Field(None, description="model_hash() of the base's manifest.json when trained")
    fine_tune_type: str = Field(description="lora or dora (QLoRA: lora or dora on a quantized base)")
    rank: int
    scale: float
    dropout: float = 0.0
    keys: list[str] | None = Field(None, description="the modules adapted in each layer; None: mlx-lm's default")
    num_layers: int = Field(description="how many of the last layers are adapted (-1: all)")
    layers: list[int] | None = Field(None, description="the indices of the adapted layers")
    base_quantized: bool = Field(False, description="the base is quantized, so this is a QLoRA adapter")
    data_sha256: str = Field(description="sha256 of the training JSONL")
    valid_data_sha256: str | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    iterations: int
    tokens: int | None = Field(None, description="training tokens seen")
    versions: dict = Field(default_factory=dict, description="mlx, mlx-lm, mlx-ray, ray")
    created: str | None = None
    files: dict = Field(default_factory=dict, description="name -> {size, sha256} of the adapter's files")
    training: dict = Field(default_factory=dict, description="batch size, learning rate, max sequence length, ...")


def adapters_root(base_dir: str | Path) -> Path:
    """``<cache_root>/<repo>/<tag>`` -> ``<cache_root>/<repo>/<tag>-adapters``."""
    base_dir = Path(base_dir)
    return base_dir.parent / f"{base_dir.name}{ADAPTERS_SUFFIX}"


def is_adapters_root(path: str | Path) -> bool:
    return Path(path).name.endswith(ADAPTERS_SUFFIX)


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadRequest(f"adapter name {name!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit", param="name")
    return name


def adapter_dir(base_dir: str | Path, name: str) -> Path:
    return adapters_root(base_dir) / validate_name(name)


def model_hash(manifest: dict | None) -> str | None:
    """One hash for a converted model: sha256 over its manifest's per-file sha256s (sorted by name)."""
    files = (manifest or {}).get("files")
    if not files:
        return None
    items = sorted((n, f.get("sha256")) for n, f in files.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def parse_model_name(model: str) -> tuple[str, str | None]:
    """``"base:adapter"`` -> ``("base", "adapter")``; ``"base"`` -> ``("base", None)``."""
    base, sep, adapter = model.rpartition(":")
    if not sep:
        return model, None
    if not base:
        raise BadRequest(f"model {model!r} names no base model before ':'", param="model")
    return base, validate_name(adapter)


def read_adapter(directory: str | Path) -> AdapterManifest:
    """The manifest of the adapter in ``directory``, after checking that its files are there and sound.

    NotFound: the directory or one of its files is missing. CorruptModel: a file is unreadable, the
    safetensors header is broken, or the manifest does not parse."""
    from mlx_ray.conversion.source import read_header

    d = Path(directory)
    if not d.is_dir():
        raise NotFound(f"adapter {d} not found", param="model")
    for f in (WEIGHTS, CONFIG, MANIFEST):
        if not (d / f).is_file():
            raise NotFound(f"adapter {d} has no {f}; re-run `mlx-ray finetune` for it", param="model")
    read_header(d / WEIGHTS)
    for f in (CONFIG, MANIFEST):
        try:
            data = json.loads((d / f).read_text())
        except (OSError, ValueError) as e:
            raise CorruptModel(f"adapter file {d / f} is unreadable ({type(e).__name__}: {e})") from e
        if not isinstance(data, dict):
            raise CorruptModel(f"adapter file {d / f} is not a JSON object")
    try:
        return AdapterManifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise CorruptModel(f"adapter manifest {d / MANIFEST} is invalid: {where}: {first['msg']}") from e


_ADAPTED = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.(?:lora_a|lora_b|m)$")


def keys_adapted(weights: str | Path) -> tuple[list[int], list[str]]:
    """(layer indices, module keys within a layer) that an ``adapters.safetensors`` adapts (from its header)."""
    from mlx_ray.conversion.source import read_header

    layers, keys = set(), set()
    for name in read_header(Path(weights)):
        m = _ADAPTED.search(name)
        if m:
            layers.add(int(m[1]))
            keys.add(m[2])
    return sorted(layers), sorted(keys)


def verify_adapter(directory: str | Path, deep: bool = True) -> list[str]:
    """Problems of a published adapter against its manifest (sizes, headers, with ``deep`` sha256s)."""
    from mlx_ray.conversion.source import sha256_file

    d = Path(directory)
    try:
        m = read_adapter(d)
    except (NotFound, CorruptModel) as e:
        return [str(e)]
    problems = []
    for name, want in sorted(m.files.items()):
        f = d / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif f.stat().st_size != want.get("size"):
            problems.append(f"{name}: size {f.stat().st_size} != {want.get('size')} in manifest")
        elif deep and sha256_file(f) != want.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (corrupted or modified)")
    return problems


def scan_adapters(base_dir: str | Path) -> list[tuple[str, AdapterManifest | Exception]]:
    """Every adapter directory of a base, each with its manifest or the error reading it."""
    root = adapters_root(base_dir)
    if not root.is_dir():
        return []
    out: list[tuple[str, AdapterManifest | Exception]] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            out.append((d.name, read_adapter(d)))
        except (NotFound, CorruptModel) as e:
            out.append((d.name, e))
    return out


def list_adapters(base_dir: str | Path) -> list[tuple[str, AdapterManifest]]:
    """The readable adapters of a base, by name (broken ones are left out: see :func:`scan_adapters`)."""
    return [(n, m) for n, m in scan_adapters(base_dir) if isinstance(m, AdapterManifest)]


def resolve_adapter(model: str, cache_dir: str | Path | None = None) -> tuple[Path, Path | None]:
    """``"base:adapter"`` -> (base model dir, adapter dir); NotFound naming the adapter when it is absent."""
    from mlx_ray.conversion.cache import resolve_model

    base, name = parse_model_name(model)
    base_dir = resolve_model(base, cache_dir)
    if name is None:
        return base_dir, None
    d = adapter_dir(base_dir, name)
    if not d.is_dir():
        have = [n for n, _ in scan_adapters(base_dir)]
        hint = f"it has {', '.join(have)}" if have else "it has none; train one with `mlx-ray finetune`"
        raise NotFound(f"adapter {name!r} of {base} not found ({d}); {hint}", param="model")
    return base_dir, d
