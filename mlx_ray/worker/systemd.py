"""A systemd user unit for the same worker, so a Linux box joins the same way.

``ExecStart`` is quoted by systemd's rules (double quotes, C escapes, ``%%``
for a literal percent), so the resources JSON survives intact; ``parse`` reads
a unit back for validation and tests.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import BadRequest, EngineFault
from .servicefile import remove, write_atomic

DEFAULT_NAME = "mlx-ray-worker"


def default_path(name: str = DEFAULT_NAME) -> Path:
    return Path.home() / ".config" / "systemd" / "user" / f"{name}.service"


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


def build(program_args: list[str], env: dict[str, str], description: str) -> str:
    lines = ["[Unit]", f"Description={description}", "After=network-online.target", "Wants=network-online.target",
             "", "[Service]", "Type=simple"]
    for key, value in sorted(env.items()):
        lines.append(f"Environment={quote(f'{key}={value}', exec_line=False)}")
    lines += [f"ExecStart={' '.join(quote(a) for a in program_args)}",
              "Restart=always", "RestartSec=30",
              # ray start --block stops its raylet & co. on SIGTERM; give it time to tell the GCS.
              "KillMode=control-group", "TimeoutStopSec=60",
              "", "[Install]", "WantedBy=default.target", ""]
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


def install(path: Path, text: str, *, load: bool = True) -> list[str]:
    write_atomic(path, text.encode())
    done = [f"wrote and validated {path}"]
    if not sys.platform.startswith("linux") or not load or not shutil.which("systemctl"):
        why = "--no-load" if not load else "no systemctl here"
        done.append(f"{why}: the unit is not enabled (run: systemctl --user enable --now {path.stem})")
        return done
    for cmd in (["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", path.stem]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise EngineFault(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.returncode}")
    done.append(f"enabled and started {path.stem} (journalctl --user -u {path.stem} -f for its logs)")
    return done


def uninstall(path: Path, *, load: bool = True) -> list[str]:
    done = []
    if sys.platform.startswith("linux") and load and shutil.which("systemctl"):
        subprocess.run(["systemctl", "--user", "disable", "--now", path.stem], capture_output=True, timeout=60)
        done.append(f"disabled {path.stem}")
    done.append(remove(path))
    return done
