"""A real Ray head on this machine, for the worker and doctor tests.

Started with ``ray start --head --block`` under ``setsid`` with token
authentication on, its own temp dir and free ports; stopped by its process
group (never ``ray stop``: other clusters run on this machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlx_ray.worker.command import ray_executable

RAY = ray_executable()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 40.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL whatever is left of it.

    ``ray start --block`` drains its node on SIGTERM for up to
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s by default) before it exits.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@dataclass
class RayHead:
    address: str
    port: int
    token_file: Path
    env: dict  # environment for a client of this head (token by path)
    proc: subprocess.Popen
    temp_dir: Path


def clean_env(**extra) -> dict:
    """os.environ without any Ray auth settings or test hooks, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "MLX_RAY_LOCAL_")) and k != "RAY_ADDRESS"}
    env.update(extra)
    return env


_NODES_SCRIPT = r"""
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [{"name": n["NodeName"], "alive": n["Alive"], "resources": n["Resources"],
          "labels": n.get("Labels", {}), "id": n["NodeID"]} for n in ray.nodes()]
placed = None
if sys.argv[2:] == ["place"]:
    @ray.remote(num_cpus=0, resources={"gpu_apple_mps": 1})
    def where():
        return ray.get_runtime_context().get_node_id()
    placed = ray.get(where.remote(), timeout=60)
print(json.dumps({"nodes": nodes, "placed": placed}))
"""


_GCS_NODES_SCRIPT = r"""
import json, sys
from ray._raylet import GcsClient
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10).values()
print(json.dumps([{"id": n.node_id.hex(), "name": n.node_name, "alive": n.state == 0,
                    "death": type(n.death_info).Reason.Name(n.death_info.reason)} for n in nodes]))
"""


def gcs_nodes(head: RayHead) -> list[dict]:
    """The head's node table straight from its GCS (fast: no driver, no job)."""
    out = subprocess.run([sys.executable, "-c", _GCS_NODES_SCRIPT, head.address], capture_output=True, text=True,
                         timeout=60, env=head.env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cluster_nodes(head: RayHead, place: bool = False) -> dict:
    """What the head sees, through a real Ray driver: {'nodes': [...], 'placed': node id or None}."""
    out = subprocess.run([sys.executable, "-c", _NODES_SCRIPT, head.address, *(["place"] if place else [])],
                         capture_output=True, text=True, timeout=120, env=head.env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_head(temp_dir: Path, token_file: Path, port: int | None = None, timeout: float = 90) -> RayHead:
    """A token-authenticated Ray head on 127.0.0.1 (``port``: a free one by default), up and registered.

    Its own temp dir (``temp_dir/ray``) and log (``temp_dir/head.log``, appended to), its other ports free
    ones, started under ``setsid``: stopped by process group (:func:`stop_group`), never ``ray stop``.
    """
    port = port or free_port()
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    head_env = dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # no 30 s self-drain at teardown
    cmd = [RAY, "start", "--head", "--port", str(port), "--num-cpus", "1",
           "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp_dir / "ray"),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--object-store-memory", str(200 * 1024**2), "--block"]
    with open(temp_dir / "head.log", "a") as log:
        proc = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"127.0.0.1:{port}", port, token_file, env, proc, temp_dir)
    try:
        from mlx_ray.worker.versions import head_metadata

        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {(temp_dir / 'head.log').read_text()[-2000:]}")
            try:
                head_metadata(head.address, timeout=5, env=env)
                if any(n["alive"] for n in gcs_nodes(head)):  # the head's own raylet has registered
                    break
            except Exception:  # noqa: BLE001 - still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    except BaseException:
        stop_group(proc)
        raise
    return head


def make_token(temp_dir: Path) -> Path:
    token_file = temp_dir / "token"
    token_file.write_text("mlxraytesttoken" + os.urandom(12).hex() + "\n")
    token_file.chmod(0o600)
    return token_file


@pytest.fixture(scope="session")
def ray_head():
    """A token-authenticated Ray head on a free port of this machine."""
    temp_dir = Path(tempfile.mkdtemp(prefix="mlxray-w-", dir="/tmp"))  # short: Ray's socket paths are long
    head = None
    try:
        head = start_head(temp_dir, make_token(temp_dir))
        yield head
    finally:
        if head is not None:
            stop_group(head.proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
