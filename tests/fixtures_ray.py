"""Session-scoped Ray fixtures shared by all Ray tests: one two-node cluster, like the real one.

* the head (``ray start --head``) offers no ``gpu_apple_mps``, like the cluster's head;
* a second node joins with ``--resources '{"gpu_apple_mps": 1}'``, as the Mac worker does.

Both run with ``--block`` under ``setsid`` on free ports with a short temp dir, and
are stopped by process group at the end of the session (never ``ray stop``: other
clusters may run on this machine). The test process connects as a driver.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlx_ray.worker.command import ray_executable

RESOURCE = "gpu_apple_mps"
RAY = ray_executable()  # this interpreter's Ray (the session may run on another Ray version's env)


_GIVEN: set[int] = set()  # ports already handed out in this session


def free_ports(n: int) -> list[int]:
    """n distinct free ports, never one handed out before in this session (the OS may give a port
    that was just closed again: the head's GCS port once came back as its object manager's)."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)  # held open until the end: this call never gets the same port twice
        port = s.getsockname()[1]
        if port not in _GIVEN:
            ports.append(port)
            _GIVEN.add(port)
    for s in socks:
        s.close()
    return ports


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def node_ids(self) -> dict[str, str]:
        """{"head": node_id, "mac": node_id} from the connected driver's view."""
        import ray

        out = {}
        for n in ray.nodes():
            if n.get("Alive"):
                out["mac" if n["Resources"].get(RESOURCE) else "head"] = n["NodeID"]
        return out

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5  # the nodes' drain is 1 s (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S below)
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _node_args(temp_dir: Path, num_cpus: int) -> list[str]:
    nm, om, client, agent, agent_grpc, metrics, renv = free_ports(7)
    # workers' ports: below Linux's ephemeral range (32768+), where free_ports() picks the others; a pass of the
    # suite running beside another (scripts/test.sh: MLX_RAY_TEST_SHARD=0|1) draws from its own half
    shard = int(os.environ.get("MLX_RAY_TEST_SHARD", "-1"))
    lo = random.randrange(*((20000, 32000) if shard < 0 else (20000 + 6000 * shard, 26000 + 6000 * shard)), 200)
    return ["--block", "--disable-usage-stats", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
            f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
            f"--min-worker-port={lo}", f"--max-worker-port={lo + 199}", "--node-ip-address=127.0.0.1"]


def _spawn(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_started(proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """`ray start --block` prints "Ray runtime started" once the node is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Ray runtime started" in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited ({proc.returncode}): {text[-2000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"ray start did not come up in {timeout:.0f}s: {log.read_text(errors='replace')[-2000:]}")


def start_two_node_cluster(worker_cpus: int = 2) -> RayCluster:
    # Ray's socket paths live under temp_dir and must stay short (AF_UNIX limit): /tmp/mrXXXX
    temp_dir = Path(tempfile.mkdtemp(prefix="mr", dir="/tmp"))
    # Token auth off for this private test cluster: Ray 2.59+ turns it on for a local head when
    # ~/.ray/auth_token exists (any embedded Ray on this machine creates it), while a driver
    # reads RAY_AUTH_MODE when `ray` is first imported, which in pytest is long before this.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1"}
    env.pop("RAY_AUTH_TOKEN", None)
    port = free_ports(1)[0]
    cluster = RayCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir)
    try:
        head = [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *_node_args(temp_dir, 1)]
        cluster.logs.append(temp_dir / "head.log")
        cluster.procs.append(_spawn(head, cluster.logs[-1], env))
        _wait_started(cluster.procs[-1], cluster.logs[-1])
        mac = [RAY, "start", f"--address={cluster.address}", f"--resources={json.dumps({RESOURCE: 1})}",
               *_node_args(temp_dir, worker_cpus)]
        cluster.logs.append(temp_dir / "mac.log")
        # as `mlx-ray worker start` runs it: replicas at nice 0, not Ray's default 15
        cluster.procs.append(_spawn(mac, cluster.logs[-1], {**env, "RAY_worker_niceness": "0"}))
        _wait_started(cluster.procs[-1], cluster.logs[-1])
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def ray_cluster():
    """A live two-node cluster (head without gpu_apple_mps, 'mac' node with it); the test process is a driver."""
    import ray

    cluster = start_two_node_cluster()
    try:
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        deadline = time.monotonic() + 60
        while len(cluster.node_ids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(cluster.node_ids()) == 2, ray.nodes()
        yield cluster
    finally:
        # No serve.shutdown(): a graceful stop of every replica costs ~5 s and the cluster goes next anyway.
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)

