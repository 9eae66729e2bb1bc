"""launchd: keep ``mlx-ray worker start --block`` (the supervisor) running on a Mac.

Two kinds of job:

* a **LaunchDaemon** (the default): ``/Library/LaunchDaemons/<label>.plist``,
  loaded with ``launchctl bootstrap system``, run as the installing user
  (``UserName``/``GroupName``), so it starts at boot without anyone logging
  in. Installing it needs root.
* a **LaunchAgent** (``--user-agent``): ``~/Library/LaunchAgents``, loaded into
  ``gui/<uid>``; it starts only once that user logs in (and automatic login is
  unavailable while FileVault is on).

The plist is generated with ``plistlib`` (never by string templating), read
back and checked before it is written. The token is referenced by path only.
Commands go through :func:`servicefile.run` (the tests' seam); off macOS we
write and validate, and say that nothing was loaded.
"""

from __future__ import annotations

import os
import plistlib
import sys
from pathlib import Path

from ..errors import BadRequest, EngineFault
from . import servicefile
from .servicefile import RunAs, make_log_dir, remove, write_atomic

DEFAULT_LABEL = "io.ray.worker"
REQUIRED = ("Label", "ProgramArguments", "RunAtLoad", "KeepAlive", "StandardOutPath", "StandardErrorPath",
            "EnvironmentVariables")
DAEMON_DIR = Path("/Library/LaunchDaemons")
DAEMON_LOG_DIR = Path("/Library/Logs/mlx-ray")
PLATFORM = sys.platform  # launchctl runs only on "darwin" (tests set it to check the commands elsewhere)


def default_path(label: str, *, daemon: bool = False) -> Path:
    if daemon:
        return DAEMON_DIR / f"{label}.plist"
    return Path.home() / "Library" / "LaunchAgents" / f"{label}.plist"


def default_log_dir(*, daemon: bool = False) -> Path:
    return DAEMON_LOG_DIR if daemon else Path.home() / "Library" / "Logs" / "mlx-ray"


def build(label: str, program_args: list[str], env: dict[str, str], log_dir: Path,
          run_as: RunAs | None = None) -> dict:
    """The job's dict; ``run_as`` makes it a daemon's (UserName/GroupName, the user's HOME)."""
    home = run_as.home if run_as else Path.home()
    env = dict(env)
    if run_as:  # a daemon gets no login environment: give Ray and MLX the user's
        env.update({"HOME": str(home), "USER": run_as.user, "LOGNAME": run_as.user})
    plist = {"Label": label, "ProgramArguments": list(program_args)}
    if run_as:
        plist.update({"UserName": run_as.user, "GroupName": run_as.group})
    plist.update({
        "RunAtLoad": True,
        # The supervisor inside rejoins after a head restart itself; launchd restarts the supervisor
        # if it exits (a bad argument, a crash), but not in a tight loop.
        "KeepAlive": True,
        "ThrottleInterval": 30,
        # On SIGTERM `ray start` drains the node for up to 30 s (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S);
        # launchd's default is to SIGKILL after 20 s.
        "ExitTimeOut": 45,
        # Interactive: no App Nap / background throttling of the inference process.
        "ProcessType": "Interactive",
        "WorkingDirectory": str(home),
        "StandardOutPath": str(log_dir / f"{label}.out.log"),
        "StandardErrorPath": str(log_dir / f"{label}.err.log"),
        "EnvironmentVariables": env,
    })
    return plist


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
    if plist.get("UserName") in ("root", "") or ("GroupName" in plist and "UserName" not in plist):
        raise BadRequest("a daemon plist must name the (non-root) UserName the worker runs as")
    return plist


def domain(*, daemon: bool) -> str:
    return "system" if daemon else f"gui/{os.getuid()}"


def install(path: Path, data: bytes, label: str, *, daemon: bool, run_as: RunAs | None = None,
            load: bool = True, platform: str | None = None) -> list[str]:
    """Write (atomically) and, on macOS, (re)load the job. Returns what was done."""
    platform = platform or PLATFORM
    done = []
    plist = validate(data, label)
    if daemon and load and platform == "darwin" and os.geteuid() != 0:
        raise BadRequest("installing a LaunchDaemon needs root: rerun with sudo (the worker still runs as "
                         f"{plist.get('UserName', 'you')}), or pass --user-agent for a per-user LaunchAgent")
    for key in ("StandardOutPath", "StandardErrorPath"):
        make_log_dir(Path(plist[key]).parent, run_as if daemon else None)
    # launchd refuses a daemon plist that is writable by anyone but root.
    write_atomic(path, data, mode=0o644 if daemon else None)
    done.append(f"wrote and validated {path}")
    if platform != "darwin" or not load:
        why = "not macOS" if platform != "darwin" else "--no-load"
        done.append(f"{why}: launchctl not run, the {'daemon' if daemon else 'agent'} is not loaded")
        return done
    lint = servicefile.run(["plutil", "-lint", str(path)])
    if lint.returncode != 0:
        raise BadRequest(f"plutil rejected {path}: {lint.stdout.strip() or lint.stderr.strip()}")
    dom = domain(daemon=daemon)
    servicefile.run(["launchctl", "bootout", f"{dom}/{label}"])  # replace an older copy; harmless if none
    # A job disabled once (launchctl disable) refuses to bootstrap and is skipped at boot: enable it first.
    servicefile.run(["launchctl", "enable", f"{dom}/{label}"])
    res = servicefile.run(["launchctl", "bootstrap", dom, str(path)])
    if res.returncode != 0:
        raise EngineFault(f"launchctl bootstrap {dom} {path} failed: {res.stderr.strip() or res.returncode}")
    who = f" as {plist['UserName']}" if daemon else ""
    done.append(f"loaded {label} into {dom}{who} ({'sudo ' if daemon else ''}launchctl print {dom}/{label} "
                "shows its state)")
    return done


def uninstall(path: Path, label: str, *, daemon: bool, load: bool = True,
              platform: str | None = None) -> list[str]:
    platform = platform or PLATFORM
    done = []
    if platform == "darwin" and load:
        if daemon and os.geteuid() != 0:
            raise BadRequest("removing a LaunchDaemon needs root: rerun with sudo (or --user-agent for the agent)")
        dom = domain(daemon=daemon)
        res = servicefile.run(["launchctl", "bootout", f"{dom}/{label}"])
        done.append(f"unloaded {label} from {dom}" if res.returncode == 0 else f"{label} was not loaded in {dom}")
    done.append(remove(path))
    return done


def agent_state(label: str = DEFAULT_LABEL, platform: str | None = None) -> tuple[str, str]:
    """('running'|'loaded'|'not loaded'|'n/a', detail) for doctor: the daemon first, then the agent."""
    platform = platform or PLATFORM
    if platform != "darwin":
        return "n/a", "launchd exists only on macOS"
    for daemon in (True, False):
        dom = domain(daemon=daemon)
        res = servicefile.run(["launchctl", "print", f"{dom}/{label}"], timeout=30)
        if res.returncode == 0:
            state = next((ln.split("=", 1)[1].strip() for ln in res.stdout.splitlines()
                          if ln.strip().startswith("state =")), "unknown")
            return ("running" if state == "running" else "loaded"), f"{dom}/{label}: state = {state}"
    paths = [default_path(label, daemon=True), default_path(label)]
    found = [str(p) for p in paths if p.exists()]
    return "not loaded", f"{', '.join(found)} exists" if found else f"neither {paths[0]} nor {paths[1]} exists"
