"""A launchd agent that keeps ``mlx-ray worker start --block`` running.

The plist is generated with ``plistlib`` (never by string templating), read
back and checked before it is written. The token is referenced by path only.
``launchctl bootstrap gui/<uid>`` loads it on macOS; elsewhere we write and
validate, and say that nothing was loaded.
"""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from pathlib import Path

from ..errors import BadRequest, EngineFault
from .servicefile import remove, write_atomic

DEFAULT_LABEL = "io.ray.worker"
REQUIRED = ("Label", "ProgramArguments", "RunAtLoad", "KeepAlive", "StandardOutPath", "StandardErrorPath",
            "EnvironmentVariables")


def default_path(label: str) -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{label}.plist"


def default_log_dir() -> Path:
    return Path.home() / "Library" / "Logs" / "mlx-ray"


def build(label: str, program_args: list[str], env: dict[str, str], log_dir: Path) -> dict:
    return {
        "Label": label,
        "ProgramArguments": list(program_args),
        "RunAtLoad": True,
        # Restart whenever it exits (crash, head restart, network loss) but not in a tight loop.
        "KeepAlive": True,
        "ThrottleInterval": 30,
        # On SIGTERM `ray start` drains the node for up to 30 s (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S);
        # launchd's default is to SIGKILL after 20 s.
        "ExitTimeOut": 45,
        # Interactive: no App Nap / background throttling of the inference process.
        "ProcessType": "Interactive",
        "WorkingDirectory": str(Path.home()),
        "StandardOutPath": str(log_dir / f"{label}.out.log"),
        "StandardErrorPath": str(log_dir / f"{label}.err.log"),
        "EnvironmentVariables": dict(env),
    }


def render(plist: dict) -> bytes:
    data = plistlib.dumps(plist, fmt=plistlib.FMT_XML, sort_keys=False)
    validate(data, plist["Label"])
    return data


def validate(data: bytes, label: str) -> dict:
    """Parse the plist back and check what launchd needs; raise BadRequest otherwise."""
    try:
        plist = plistlib.loads(data)
    except Exception as e:  # noqa: BLE001 - plistlib raises several types
        raise BadRequest(f"generated plist does not parse: {e}")
    missing = [k for k in REQUIRED if k not in plist]
    if missing:
        raise BadRequest(f"generated plist lacks {', '.join(missing)}")
    if plist["Label"] != label or not all(isinstance(a, str) for a in plist["ProgramArguments"]):
        raise BadRequest("generated plist has a wrong Label or non-string ProgramArguments")
    if any("TOKEN" in k and not k.endswith("_PATH") for k in plist["EnvironmentVariables"]):
        raise BadRequest("refusing to write a token into the plist: use --token-file")
    return plist


def _launchctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["launchctl", *args], capture_output=True, text=True, timeout=30)


def _domain() -> str:
    return f"gui/{os.getuid()}"


def install(path: Path, data: bytes, label: str, *, load: bool = True) -> list[str]:
    """Write (atomically) and, on macOS, (re)load the agent. Returns what was done."""
    done = []
    plist = plistlib.loads(data)
    for key in ("StandardOutPath", "StandardErrorPath"):
        Path(plist[key]).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    done.append(f"wrote and validated {path}")
    if sys.platform != "darwin" or not load:
        why = "not macOS" if sys.platform != "darwin" else "--no-load"
        done.append(f"{why}: launchctl not run, the agent is not loaded")
        return done
    lint = subprocess.run(["plutil", "-lint", str(path)], capture_output=True, text=True)
    if lint.returncode != 0:
        raise BadRequest(f"plutil rejected {path}: {lint.stdout.strip() or lint.stderr.strip()}")
    _launchctl("bootout", f"{_domain()}/{label}")  # replace a loaded older version; fails harmlessly if none
    res = _launchctl("bootstrap", _domain(), str(path))
    if res.returncode != 0:
        raise EngineFault(f"launchctl bootstrap {_domain()} {path} failed: {res.stderr.strip() or res.returncode}")
    done.append(f"loaded {label} into {_domain()} (launchctl print {_domain()}/{label} shows its state)")
    return done


def uninstall(path: Path, label: str, *, load: bool = True) -> list[str]:
    done = []
    if sys.platform == "darwin" and load:
        res = _launchctl("bootout", f"{_domain()}/{label}")
        done.append(f"unloaded {label}" if res.returncode == 0 else f"{label} was not loaded")
    done.append(remove(path))
    return done


def agent_state(label: str = DEFAULT_LABEL) -> tuple[str, str]:
    """('running'|'loaded'|'not loaded'|'n/a', detail) for doctor."""
    if sys.platform != "darwin":
        return "n/a", "launchd exists only on macOS"
    res = _launchctl("print", f"{_domain()}/{label}")
    if res.returncode != 0:
        exists = default_path(label).exists()
        return "not loaded", f"{default_path(label)} {'exists' if exists else 'missing'}"
    state = next((ln.split("=", 1)[1].strip() for ln in res.stdout.splitlines()
                  if ln.strip().startswith("state =")), "unknown")
    return ("running" if state == "running" else "loaded"), f"state = {state}"
