"""File handling and the one command runner shared by the launchd and systemd writers.

Every ``launchctl`` / ``systemctl`` / ``plutil`` call goes through :func:`run`,
the seam the tests replace to assert the exact commands without running them.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadRequest


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class RunAs:
    """The account a system service runs the worker as (never root)."""

    user: str
    group: str
    uid: int
    gid: int
    home: Path


def resolve_user(name: str | None, environ=os.environ) -> RunAs:
    """--run-as USER, else the account that ran sudo (SUDO_USER), else the current one; never root."""
    name = name or environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise BadRequest(f"--run-as {name!r}: no such user on this machine")
    if pw.pw_uid == 0:
        raise BadRequest("refusing to run the worker as root: run `sudo mlx-ray worker install ...` from the "
                         "account that should run it, or pass --run-as USER")
    try:
        group = grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        group = str(pw.pw_gid)
    return RunAs(pw.pw_name, group, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write beside the target then rename: a reader never sees half a service file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    except PermissionError:
        raise BadRequest(f"cannot write {path} (permission denied): a system service needs sudo "
                         "(or --user-agent for a per-user one)")


def make_log_dir(path: Path, owner: RunAs | None) -> None:
    """Create the log directory; for a system service, owned by the account the worker runs as."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise BadRequest(f"cannot create the log directory {path} (permission denied): run with sudo "
                         "or pass --log-dir")
    if owner is not None and os.geteuid() == 0:
        os.chown(path, owner.uid, owner.gid)


def remove(path: Path) -> str:
    if path.exists():
        try:
            path.unlink()
        except PermissionError:
            raise BadRequest(f"cannot remove {path} (permission denied): run with sudo")
        return f"removed {path}"
    return f"{path} did not exist"
