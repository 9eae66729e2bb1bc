"""``manifest.json``: provenance and integrity of a converted model.

It records the source (id, revision, sha256 of every source file), the
quantization, the size and sha256 of every output file, the versions of mlx,
mlx-lm and mlx-ray, and the creation time. :func:`verify_model` re-checks a
model directory against it.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path

from mlx_ray.errors import CorruptModel

from .source import read_header, sha256_file

MANIFEST = "manifest.json"
FORMAT = "mlx-ray-model/1"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {"mlx": _version("mlx"), "mlx-lm": _version("mlx-lm"), "mlx-ray": _version("mlx-ray"),
            "python": platform.python_version()}


def file_entries(directory: Path, names: list[str] | None = None) -> dict:
    names = names if names is not None else sorted(
        p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    return {n: {"size": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)} for n in names}


def write_manifest(out_dir: Path, *, name: str, source: dict, quantization: dict) -> dict:
    files = file_entries(out_dir)
    manifest = {
        "format": FORMAT,
        "name": name,
        "source": source,
        "quantization": quantization,
        "files": files,
        "total_size": sum(f["size"] for f in files.values()),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(model_dir: Path) -> dict | None:
    p = Path(model_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise CorruptModel(f"{p} is not valid JSON ({e}); re-convert the model") from e


def verify_model(path: str | Path, deep: bool = True) -> list[str]:
    """Problems found in a model directory; an empty list means it is intact.

    ``deep=False`` checks presence, sizes and safetensors headers only (fast,
    for ``mlx-ray doctor``); ``deep=True`` also re-hashes every file.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        return [f"{path}: no config.json (not a model directory)"]
    try:
        manifest = read_manifest(path)
    except CorruptModel as e:
        return [str(e)]
    if manifest is None:
        return [f"{path}: no {MANIFEST} (not converted by mlx-ray); cannot verify integrity"]
    problems = []
    for name, want in sorted(manifest.get("files", {}).items()):
        f = path / name
        if not f.is_file():
            problems.append(f"{name}: missing")
            continue
        size = f.stat().st_size
        if size != want["size"]:
            problems.append(f"{name}: size {size} != {want['size']} in manifest (truncated or modified)")
            continue
        if name.endswith(".safetensors"):
            try:
                read_header(f)
            except CorruptModel as e:
                problems.append(f"{name}: {e}")
                continue
        if deep and sha256_file(f) != want["sha256"]:
            problems.append(f"{name}: sha256 mismatch (corrupted or modified)")
    return problems
