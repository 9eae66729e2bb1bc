"""The gate's verdict cache: one JSON file of verdicts and *pending markers*, merged under a file lock.

``$MLX_RAY_KERNEL_CACHE/verdicts.json`` (default ``~/.cache/mlx-ray/kernels``)
maps a key (kernel, device name, MLX version, kernel-source hash[, model
shapes]) to either a verdict (``gate.Verdict.as_dict()``) or, while a
process measures that key, a pending marker::

    {"pending": true, "pid": 1234, "started": <unix time>, "deadline": <unix time>}

The gate writes the marker *before* it measures. A process that dies while
measuring (MLX aborts the process when a Metal command buffer fails; a GPU
hang can take the whole machine down) leaves it behind, and the next process
that finds it turns it into a failed verdict (:func:`stale_reason`) instead of
measuring, and crashing, again. Every write goes to a temp file that is
renamed over the cache, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger("mlx_ray.kernels.gate")


def cache_path() -> Path:
    root = os.environ.get("MLX_RAY_KERNEL_CACHE") or Path.home() / ".cache" / "mlx-ray" / "kernels"
    return Path(root) / "verdicts.json"


def read() -> dict:
    """The whole cache ({} when it is missing or unreadable)."""
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def get(key: str) -> dict | None:
    return read().get(key)


def put(key: str, entry: dict) -> bool:
    """Merge one entry into the cache: under a file lock, written to a temp file and renamed. False if not written."""
    from filelock import FileLock  # noqa: PLC0415

    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=30):
            data = read()
            data[key] = entry
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".verdicts.", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        return True
    except Exception as e:  # noqa: BLE001 - a read-only home only costs a re-measure next time
        log.warning("kernel verdict cache not written (%s): %s", path, e)
        return False


# ------------------------------------------------------------ pending markers

GRACE_S = 30.0  # past a marker's deadline by this much, its measurement is over whatever its process says


def pending(timeout_s: float) -> dict:
    """The marker this process writes before measuring for at most ``timeout_s`` seconds."""
    now = time.time()
    return {"pending": True, "pid": os.getpid(), "started": now, "deadline": now + timeout_s,
            "timeout_s": timeout_s}


def is_pending(entry: dict | None) -> bool:
    return isinstance(entry, dict) and entry.get("pending") is True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError):
        return True  # someone else's live process (or an odd value): assume alive, the deadline decides
    return True


def stale_reason(entry: dict, now: float | None = None) -> str | None:
    """Why a pending marker means a failed measurement, or None while its measurement may still be running.

    Its process is gone (it crashed, or was killed, while measuring), or the
    deadline plus :data:`GRACE_S` has passed (hung; a reboot also lands here,
    whatever pid now has that number).
    """
    now = time.time() if now is None else now
    pid = entry.get("pid")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(entry.get("started") or 0)))
    if now > float(entry.get("deadline") or 0) + GRACE_S:
        return (f"timed out after {float(entry.get('timeout_s') or 0):.0f} s "
                f"(the measurement pending since {since}, process {pid}, never finished)")
    if pid != os.getpid() and not pid_alive(pid):
        return f"crashed during measurement (process {pid} died with the measurement pending since {since})"
    return None
