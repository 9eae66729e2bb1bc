"""Atomic publish of a model directory and an NFS-safe lock per target.

Publish: write into ``<parent>/.<name>.tmp-<host>-<pid>`` beside the target,
fsync every file and the directory, then ``rename`` it to the final name. A
crash, Ctrl-C, a full disk or a failed verify leaves at most a hidden temp
directory, which the next convert of the same target removes (it holds the
lock, so no one else can be writing it).

Lock: ``<parent>/.<name>.lock`` created with ``O_CREAT|O_EXCL`` (atomic on
NFSv3+ as well as locally; ``fcntl``/``flock`` locks are not reliable across NFS
clients). It records host, pid, time and a random token, and a heartbeat thread
refreshes its mtime. A lock is stale when its owner is on this host and dead, or
when its heartbeat is older than ``STALE_AFTER`` seconds (owner on another node).

Breaking a stale lock is exclusive. Nobody removes a lock file except the one
process that first wins ``O_EXCL`` on ``<lock>.break-<token>``, a name derived
from the very lock it judged stale; the winner then re-reads the lock and
unlinks it only if it still carries that token. The holder's own release goes
through the same claim, so between a claim and its unlink the file cannot
change hands: two waiters that both judged one lock stale cannot both remove
something, and neither can remove the lock the other has taken meanwhile. A
claim whose maker died mid-way (microseconds) is stale by the same rule and is
removed the same way. The one hole left is the one every lease has: a process
that stalls for longer than ``STALE_AFTER`` on another node can be overtaken.

Why not filelock's ``SoftFileLease`` (3.30+, which does heartbeat and expiry):
it breaks a stale marker only with an atomic name exchange
(``renameat2(RENAME_EXCHANGE)``), which NFS cannot do (its RENAME has no
exchange), and it has no fallback there, so on NFS a crashed converter's lease
is never broken and blocks the target forever (``tests/test_publish_lock.py``
shows it). Its older ``SoftFileLock`` never breaks a stale lock at all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mlx_ray.errors import Conflict, MlxRayError, ReadOnlyCache

HEARTBEAT = 10.0
STALE_AFTER = 120.0
BREAK_GRACE = 5.0  # past the wait, how long a live break by someone else may take before we give up
_TOKEN = re.compile(r"[0-9a-f]{32}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class _Record:
    """What one read of a lock (or break claim) file saw: owner, identity key and mtime."""

    info: dict
    key: str
    mtime: float


def _read(path: Path) -> _Record | None:
    """Read a lock-protocol file in one open (content and mtime of the same inode); None if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read(4096)
    try:
        info = json.loads(data or b"{}")
    except ValueError:  # being written, or not ours
        info = {}
    if not isinstance(info, dict):
        info = {}
    token = info.get("token")
    if isinstance(token, str) and _TOKEN.fullmatch(token):
        key = token
    else:  # a lock written before tokens (or still being written): its content and inode identify it
        key = hashlib.sha256(data + str(st.st_ino).encode()).hexdigest()[:32]
    return _Record(info, key, st.st_mtime)


def _is_stale(rec: _Record) -> bool:
    info = rec.info
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return not _pid_alive(info["pid"])
    return time.time() - rec.mtime > STALE_AFTER


def _owner(lock: Path) -> dict:
    rec = _read(lock)
    return {} if rec is None else rec.info


def _create(path: Path, token: str) -> None:
    """``O_EXCL``-create ``path`` holding our record; FileExistsError if it exists."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "token": token}, f)


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
        self.token: str | None = None
        self.lost = False  # set by the heartbeat if the lock was taken from us (we stalled past STALE_AFTER)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _claim_path(self, key: str) -> Path:
        return self.path.with_name(f"{self.path.name}.break-{key}")

    def _try_create(self) -> bool:
        token = uuid.uuid4().hex
        try:
            _create(self.path, token)
        except FileExistsError:
            return False
        except OSError as e:
            raise writable_error(self.path, e) from e
        self.token = token
        return True

    def _remove(self, path: Path, key: str, *, stale: bool = True, depth: int = 0) -> bool:
        """Unlink ``path`` if, and only if, it is still the file whose key is ``key`` (and, with ``stale``, still
        stale); True if we did.

        Only the winner of ``O_EXCL`` on the claim ``<lock>.break-<key>`` may unlink the file with that key, and
        nothing else ever unlinks or renames it, so once we hold the claim a re-read that still shows ``key``
        cannot go out of date before our unlink."""
        claim = self._claim_path(key)
        mine = uuid.uuid4().hex
        try:
            _create(claim, mine)
        except FileExistsError:
            # Another breaker (or the holder releasing) is at it. If it died mid-way its claim is stale: remove
            # the claim by the same rule, and let the caller retry.
            rec = _read(claim)
            if rec is not None and depth < 4 and _is_stale(rec):
                self._remove(claim, rec.key, depth=depth + 1)
            return False
        except OSError as e:
            raise writable_error(claim, e) from e
        try:
            rec = _read(path)
            if rec is None or rec.key != key:
                return False  # already removed (and maybe taken again) before we claimed it
            if stale and not _is_stale(rec):
                return False  # its holder is back (a heartbeat after a long stall)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return True
        finally:
            rec = _read(claim)
            if rec is not None and rec.key == mine:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(claim)

    def acquire(self) -> "TargetLock":
        deadline = None if self.wait is None else time.monotonic() + self.wait
        announced = False
        while not self._try_create():
            rec = _read(self.path)
            if rec is None:
                continue  # released meanwhile: try again at once
            stale = _is_stale(rec)
            if stale and self._remove(self.path, rec.key):
                continue
            info = rec.info
            who = f"{info.get('host', '?')} pid {info.get('pid', '?')}"
            if stale:  # someone else is breaking it right now (a matter of milliseconds)
                if deadline is not None and time.monotonic() >= deadline + BREAK_GRACE:
                    raise Conflict(f"{self.target}: the stale lock {self.path} of {who} is being broken by "
                                   f"another process that does not finish; delete the lock if nothing runs")
                time.sleep(min(self.poll, 0.01))
                continue
            self.waited = True
            if deadline is not None and time.monotonic() >= deadline:
                raise Conflict(f"{self.target} is being converted by {who} (lock {self.path}); wait for it "
                               f"to finish, or delete the lock if that process is gone")
            if not announced:
                print(f"[mlx-ray] waiting for {who}, which is converting {self.target}", file=sys.stderr,
                      flush=True)
                announced = True
            time.sleep(self.poll)
        self._sweep_claims()
        self._stop.clear()
        self.lost = False
        self._thread = threading.Thread(target=self._beat, daemon=True, name="mlx-ray-lock-heartbeat")
        self._thread.start()
        return self

    def _sweep_claims(self) -> None:
        """Remove break claims left by crashed breakers (by the same rule: a claim's removal is claimed too)."""
        for p in self.path.parent.glob(f"{self.path.name}.break-*"):
            rec = _read(p)
            if rec is not None and _is_stale(rec):
                self._remove(p, rec.key)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            rec = _read(self.path)
            if rec is None or rec.key != self.token:
                self.lost = True
                print(f"[mlx-ray] lost the lock {self.path} (taken as stale by "
                      f"{(rec.info if rec else {}).get('host', '?')}); this convert is no longer exclusive",
                      file=sys.stderr, flush=True)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def ensure_held(self) -> None:
        """Raise :class:`Conflict` unless we still hold the lock: its file must still carry our token.

        Read now, not only from the heartbeat's last look (every ``HEARTBEAT`` seconds), so a
        convert that stalled past ``STALE_AFTER`` and lost the target to another converter never
        publishes over that converter's work."""
        rec = _read(self.path)
        if not self.lost and self.token is not None and rec is not None and rec.key == self.token:
            return
        self.lost = True
        who = "nobody now" if rec is None else f"{rec.info.get('host', '?')} pid {rec.info.get('pid', '?')}"
        raise Conflict(f"{self.target}: this convert lost its lock {self.path} (broken as stale; held by {who}) "
                       f"before publishing; nothing was published: convert again")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
        token, self.token = self.token, None
        if token is None:
            return
        for _ in range(3):  # only ever unlinks our own lock: one that was broken and retaken is left alone
            if self._remove(self.path, token, stale=False):
                return
            rec = _read(self.path)
            if rec is None or rec.key != token:
                return
            time.sleep(0.01)

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


def publish(stage: Path, target: Path, *, replace: bool, lock: TargetLock | None = None) -> None:
    """Rename ``stage`` to ``target``; with ``replace`` an existing target is moved aside first.

    ``lock``: the target's lock; if it was lost meanwhile (see :meth:`TargetLock.ensure_held`) nothing is
    published and :class:`Conflict` is raised (the caller removes ``stage``)."""
    fsync_tree(stage)
    if lock is not None:
        lock.ensure_held()  # last, right before the renames: the fsync above can take long on a big model
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
