"""A systemd unit for the same worker, so a Linux box joins the same way.

By default a **system** unit (``/etc/systemd/system/<name>.service``,
``User=``/``Group=`` the installing user, ``WantedBy=multi-user.target``): it
starts at boot without a login. ``--user-agent`` writes the old per-user unit
(``~/.config/systemd/user``, ``WantedBy=default.target``), which needs
``loginctl enable-linger`` to start before that user logs in.

``ExecStart`` is quoted by systemd's rules (double quotes, C escapes, ``%%``
for a literal percent), so the resources JSON survives intact; ``parse`` reads
a unit back for validation and tests.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ..errors import BadRequest, EngineFault
from . import servicefile
from .servicefile import RunAs, remove, write_atomic

DEFAULT_NAME = "mlx-ray-worker"
SYSTEM_DIR = Path("/etc/systemd/system")
PLATFORM = sys.platform  # systemctl runs only on Linux
HAVE_SYSTEMCTL = None  # None: look for it on PATH (tests set True to check the commands without running them)


def default_path(name: str = DEFAULT_NAME, *, system: bool = False) -> Path:
    if system:
        return SYSTEM_DIR / f"{name}.service"
    return Path.home() / ".config" / "systemd" / "user" / f"{name}.service"


def systemctl(*args: str, system: bool) -> list[str]:
    return ["systemctl", *([] if system else ["--user"]), *args]


def quote(arg: str, *, exec_line: bool = True) -> str:
    """One ExecStart word, quoted the way systemd.syntax(7) unquotes it."""
    escaped = arg.replace("%", "%%")
    if exec_line:  # ExecStart= expands $VAR; $$ is a literal dollar
        escaped = escaped.replace("$", "$$")
    if escaped and not any(c in escaped for c in ' \t\n"\'\\;'):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def unquote_words(line: str) -> list[str]:
    """Inverse of :func:`quote` over a whole command line (for validation and tests)."""
    words, cur, i, inq, have = [], [], 0, False, False
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            nxt = line[i + 1]
            cur.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        if c == '"':
            inq, have = not inq, True
        elif c.isspace() and not inq:
            if cur or have:
                words.append("".join(cur))
            cur, have = [], False
        else:
            cur.append(c)
        i += 1
    if cur or have:
        words.append("".join(cur))
    return [w.replace("%%", "%").replace("$$", "$") for w in words]


def build(program_args: list[str], env: dict[str, str], description: str, run_as: RunAs | None = None) -> str:
    """The unit text; ``run_as`` makes it a system unit run as that (non-root) user."""
    env = dict(env)
    if run_as:
        env.update({"HOME": str(run_as.home), "USER": run_as.user, "LOGNAME": run_as.user})
    lines = ["[Unit]", f"Description={description}", "After=network-online.target", "Wants=network-online.target",
             "", "[Service]", "Type=simple"]
    if run_as:
        lines += [f"User={run_as.user}", f"Group={run_as.group}", f"WorkingDirectory={quote(str(run_as.home))}"]
    for key, value in sorted(env.items()):
        lines.append(f"Environment={quote(f'{key}={value}', exec_line=False)}")
    lines += [f"ExecStart={' '.join(quote(a) for a in program_args)}",
              # The supervisor inside rejoins after a head restart itself; systemd restarts the
              # supervisor if it exits (a bad argument, a crash).
              "Restart=always", "RestartSec=30",
              # SIGTERM to the supervisor only: it forwards it to `ray start`, which drains the node
              # (up to 30 s) and stops its raylet & co.; whatever is left is SIGKILLed after 60 s.
              "KillMode=mixed", "TimeoutStopSec=60",
              "", "[Install]", f"WantedBy={'multi-user.target' if run_as else 'default.target'}", ""]
    text = "\n".join(lines)
    validate(text)
    return text


def parse(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> [(key, value)] in order (systemd allows repeated keys such as Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif "=" in line and current is not None:
            key, value = line.split("=", 1)
            current.append((key.strip(), value.strip()))
        else:
            raise BadRequest(f"bad systemd unit line: {raw!r}")
    return sections


def validate(text: str) -> dict:
    sections = parse(text)
    for sec, key in (("Unit", "Description"), ("Service", "ExecStart"), ("Service", "Restart"),
                     ("Install", "WantedBy")):
        if not any(k == key for k, _ in sections.get(sec, [])):
            raise BadRequest(f"generated systemd unit lacks [{sec}] {key}=")
    for k, v in sections["Service"]:
        if k == "Environment":
            name = unquote_words(v)[0].split("=", 1)[0]
            if "TOKEN" in name and not name.endswith("_PATH"):
                raise BadRequest("refusing to write a token into the unit: use --token-file")
    return sections


def _loadable(load: bool, platform: str | None) -> bool:
    if not (platform or PLATFORM).startswith("linux") or not load:
        return False
    return shutil.which("systemctl") is not None if HAVE_SYSTEMCTL is None else HAVE_SYSTEMCTL


def install(path: Path, text: str, *, system: bool, load: bool = True, platform: str | None = None) -> list[str]:
    sections = validate(text)
    if system and not any(k == "User" for k, _ in sections["Service"]):
        raise BadRequest("a system unit must name the (non-root) User= the worker runs as")
    loadable = _loadable(load, platform)
    if system and loadable and os.geteuid() != 0:
        raise BadRequest("installing a system unit needs root: rerun with sudo (the worker still runs as "
                         "you), or pass --user-agent for a systemd user unit")
    write_atomic(path, text.encode(), mode=0o644 if system else None)
    done = [f"wrote and validated {path}"]
    if not loadable:
        why = "--no-load" if not load else "no systemctl here"
        enable = " ".join(systemctl("enable", "--now", path.stem, system=system))
        done.append(f"{why}: the unit is not enabled (run: {'sudo ' if system else ''}{enable})")
        return done
    for cmd in (systemctl("daemon-reload", system=system), systemctl("enable", "--now", path.stem, system=system)):
        res = servicefile.run(cmd)
        if res.returncode != 0:
            raise EngineFault(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.returncode}")
    logs = f"journalctl {'' if system else '--user '}-u {path.stem} -f"
    done.append(f"enabled and started {path.stem} ({logs} for its logs)")
    return done


def uninstall(path: Path, *, system: bool, load: bool = True, platform: str | None = None) -> list[str]:
    done = []
    loadable = _loadable(load, platform)
    if loadable:
        if system and os.geteuid() != 0:
            raise BadRequest("removing a system unit needs root: rerun with sudo (or --user-agent for the user unit)")
        servicefile.run(systemctl("disable", "--now", path.stem, system=system))
        done.append(f"disabled {path.stem}")
    done.append(remove(path))
    if loadable:
        servicefile.run(systemctl("daemon-reload", system=system))
    return done
