"""The exact ``ray start`` command and environment for this worker.

Secrets never appear in argv: the token is passed to Ray by path
(``RAY_AUTH_TOKEN_PATH``), and anything token-like in the environment is
masked whenever the command is shown.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadRequest, NotFound
from .resources import NodeResources

MASK = "****"
# Ray's metrics export port (its Prometheus endpoint, /metrics): Ray's own default is a free port
# picked at each start, which no scrape config can name. KubeRay pins 8080 on every Ray pod (the port
# its PodMonitor scrapes), so a worker does the same; `--metrics-export-port` changes it, 0 leaves
# it to Ray, and one given to `ray start` after `--` wins.
DEFAULT_METRICS_EXPORT_PORT = 8080
METRICS_FLAG = "--metrics-export-port"
CAFFEINATE = "/usr/bin/caffeinate"  # part of every macOS install
# Environment variables this command sets or forwards (shown by --dry-run).
FORWARDED = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "MLX_RAY_CACHE", "HF_HOME",
             "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL")


def is_secret(name: str) -> bool:
    upper = name.upper()
    return any(w in upper for w in ("TOKEN", "PASSWORD", "SECRET", "KEY")) and not upper.endswith("_PATH")


@dataclass
class WorkerCommand:
    argv: list[str]
    env_updates: dict[str, str]  # what we add on top of the inherited environment
    env: dict[str, str] = field(repr=False, default_factory=dict)  # the full environment to exec with
    metrics_port: int | None = None  # Ray's metrics export port on this node (None: Ray picks one)

    def shown_env(self) -> dict[str, str]:
        """The variables worth showing: ours plus the forwarded ones, secrets masked."""
        shown = {k: self.env[k] for k in FORWARDED if k in self.env}
        shown.update(self.env_updates)
        return {k: (MASK if is_secret(k) else v) for k, v in sorted(shown.items())}

    def render(self) -> str:
        """Copy-pasteable shell text: env assignments then the command (secrets masked)."""
        env = " ".join(f"{k}={v if v == MASK else shlex.quote(v)}" for k, v in self.shown_env().items())
        cmd = shlex.join(self.argv)
        return f"{env} {cmd}".strip() if env else cmd


def ray_executable() -> str:
    """The ``ray`` script of this interpreter's environment (so its Ray is the one we checked)."""
    here = Path(sys.executable).parent / "ray"
    if here.exists():
        return str(here)
    found = shutil.which("ray")
    if not found:
        raise NotFound("the `ray` command is not installed here: pip install 'ray[serve]' matching the head's version")
    return found


def token_env(token_file: str | None) -> dict[str, str]:
    """RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH for a token file; the token itself is never read into argv."""
    if not token_file:
        return {}
    path = Path(token_file).expanduser().resolve()
    if not path.is_file():
        raise NotFound(f"--token-file {token_file}: no such file; copy the cluster token there (mode 600)")
    if not path.read_text().strip():
        raise BadRequest(f"--token-file {token_file} is empty; it must hold the cluster's Ray auth token")
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def ray_arg(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``ray start`` arguments (``--flag V`` or ``--flag=V``; the last wins)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1:]
    return value


def scrape_target(cmd: WorkerCommand, head_host: str) -> str | None:
    """``http://IP:PORT/metrics`` of this node's Ray metrics (None when Ray picks the port). IP: the
    ``--node-ip-address`` given to ``ray start``, else this machine's address on the route to the head
    (what Ray's node IP is, and what a Prometheus beside the head reaches)."""
    if not cmd.metrics_port:
        return None
    ip = ray_arg(cmd.argv, "--node-ip-address")
    if ip is None:
        try:
            with socket.socket(socket.AF_INET6 if ":" in head_host else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((head_host, 9))  # UDP: nothing is sent, the kernel only picks the route
                ip = s.getsockname()[0]
        except OSError:
            ip = "THIS_MACHINE_IP"
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{cmd.metrics_port}/metrics"


def build(address: str, res: NodeResources, *, block: bool, token_file: str | None = None,
          extra_args: list[str] | None = None, platform: str = sys.platform,
          base_env: dict | None = None, caffeinate: bool = True,
          metrics_export_port: int = DEFAULT_METRICS_EXPORT_PORT) -> WorkerCommand:
    """``caffeinate=False``: no ``caffeinate -s`` wrapper (the supervisor holds the assertion itself).
    ``metrics_export_port``: Ray's Prometheus port on this node (0: Ray's choice), unless
    ``extra_args`` name one."""
    argv = [ray_executable(), "start", "--address", address, "--num-cpus", str(res.num_cpus)]
    if res.num_gpus is not None:
        argv += ["--num-gpus", str(res.num_gpus)]
    if res.resources:
        argv += ["--resources", json.dumps({k: (int(v) if float(v).is_integer() else v)
                                            for k, v in sorted(res.resources.items())})]
    argv += ["--memory", str(res.memory), "--object-store-memory", str(res.object_store_memory),
             "--node-name", res.node_name]
    if res.labels:
        argv += ["--labels", ",".join(f"{k}={v}" for k, v in sorted(res.labels.items()))]
    argv += ["--disable-usage-stats"]
    theirs = ray_arg(list(extra_args or []), METRICS_FLAG)
    if theirs is None:
        port = metrics_export_port
        if port:
            argv += [METRICS_FLAG, str(port)]
    else:
        port = int(theirs) if theirs.isdigit() else None
    argv += list(extra_args or [])
    if block:
        argv.append("--block")
        if platform == "darwin" and caffeinate:  # keep the Mac awake (on AC power) for as long as the worker runs
            argv = [CAFFEINATE, "-s", *argv]
    updates: dict[str, str] = {}
    if platform == "darwin":
        updates["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    # Ray starts worker processes (Serve replicas, the proxy) at nice 15, below any process a
    # person starts; on this node serving is the machine's job. An explicit value wins.
    if "RAY_worker_niceness" not in (base_env if base_env is not None else os.environ):
        updates["RAY_worker_niceness"] = "0"
    updates.update(token_env(token_file))
    if platform.startswith("linux"):
        # MLX actors started on this node inherit the raylet's environment: give them the fast BLAS.
        from ..blas import wanted_library

        lib = wanted_library()
        env_preload = (base_env if base_env is not None else os.environ).get("LD_PRELOAD", "")
        if lib and lib not in env_preload:
            updates["LD_PRELOAD"] = ":".join(p for p in (lib, env_preload) if p)
    env = dict(os.environ if base_env is None else base_env)
    if token_file:
        env.pop("RAY_AUTH_TOKEN", None)  # the file is the one source of the token
    env.update(updates)
    return WorkerCommand(argv=argv, env_updates=updates, env=env, metrics_port=port or None)
