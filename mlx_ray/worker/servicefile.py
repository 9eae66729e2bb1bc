"""File handling shared by the launchd and systemd writers."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside the target then rename: a reader never sees half a service file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def remove(path: Path) -> str:
    if path.exists():
        path.unlink()
        return f"removed {path}"
    return f"{path} did not exist"
