"""Atomic publish of a model directory and an NFS-safe lock per target.

Publish: write into ``<parent>/.<name>.tmp-<host>-<pid>`` beside the target,
fsync every file and the directory, then ``rename`` it to the final name. A
crash, Ctrl-C, a full disk or a failed verify leaves at most a hidden temp
directory, which the next convert of the same target removes (it holds the
lock, so no one else can be writing it).

Lock: ``<parent>/.<name>.lock`` created with ``O_CREAT|O_EXCL`` (atomic on
NFSv3+ as well as locally; ``fcntl``/``flock`` locks are not reliable across NFS
clients). It records host, pid and time, and a heartbeat thread refreshes its
mtime. A lock is stale when its owner is on this host and dead, or when its
heartbeat is older than ``STALE_AFTER`` seconds (owner on another node). Hand
written rather than filelock's SoftFileLock because that one never breaks a
stale lock, and a crashed converter would block the target forever.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from mlx_ray.errors import Conflict, MlxRayError, ReadOnlyCache

HEARTBEAT = 10.0
STALE_AFTER = 120.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _is_stale(lock: Path) -> bool:
    info = _owner(lock)
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False  # gone already: not stale, just retry
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return not _pid_alive(info["pid"])
    return age > STALE_AFTER


def writable_error(path: Path, err: OSError) -> MlxRayError:
    """Map an OSError while writing the cache to a one-line taxonomy error."""
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ReadOnlyCache(f"cannot write to {path} ({os.strerror(err.errno)}); the model cache is read-only "
                             f"here: convert on a node that can write it or pass --cache-dir/--out")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return MlxRayError(f"no space left writing {path}; free space or pick another --cache-dir "
                           f"(nothing was published)")
    return MlxRayError(f"cannot write {path}: {err}")


class TargetLock:
    """Exclusive lock on one target directory. ``wait=None`` waits forever, 0 fails at once."""

    def __init__(self, target: Path, wait: float | None = None, poll: float = 0.5):
        self.target = target
        self.path = target.parent / f".{target.name}.lock"
        self.wait = wait
        self.poll = poll
        self.waited = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise writable_error(self.path, e) from e
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
        return True

    def acquire(self) -> "TargetLock":
        deadline = None if self.wait is None else time.monotonic() + self.wait
        announced = False
        while not self._try_create():
            if _is_stale(self.path):
                # Rename first so that two breakers cannot both delete a fresh lock.
                with contextlib.suppress(FileNotFoundError):
                    grave = self.path.with_name(self.path.name + f".stale-{uuid.uuid4().hex[:8]}")
                    os.rename(self.path, grave)
                    grave.unlink()
                continue
            self.waited = True
            info = _owner(self.path)
            who = f"{info.get('host', '?')} pid {info.get('pid', '?')}"
            if deadline is not None and time.monotonic() >= deadline:
                raise Conflict(f"{self.target} is being converted by {who} (lock {self.path}); wait for it "
                               f"to finish, or delete the lock if that process is gone")
            if not announced:
                print(f"[mlx-ray] waiting for {who}, which is converting {self.target}", file=sys.stderr,
                      flush=True)
                announced = True
            time.sleep(self.poll)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="mlx-ray-lock-heartbeat")
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> "TargetLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def remove_leftovers(target: Path) -> None:
    """Delete temp/trash dirs of earlier crashed converts of ``target`` (call with the lock held)."""
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in target.parent.glob(f".{target.name}.trash-*"):
        shutil.rmtree(p, ignore_errors=True)


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(stage: Path, target: Path, *, replace: bool) -> None:
    """Rename ``stage`` to ``target``; with ``replace`` an existing target is moved aside first."""
    fsync_tree(stage)
    trash = None
    if target.exists():
        if not replace:
            raise Conflict(f"{target} already exists; pass --force to replace it")
        trash = target.parent / f".{target.name}.trash-{uuid.uuid4().hex[:6]}"
        os.rename(target, trash)
    try:
        os.rename(stage, target)
    except OSError:
        if trash is not None:
            os.rename(trash, target)
        raise
    fsync_dir(target.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
