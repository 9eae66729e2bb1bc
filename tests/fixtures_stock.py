"""A cluster whose head is a stock Ray, as KubeRay runs it: no mlx-ray, no MLX.

* the head runs from its own virtualenv (``build/envs/head-ray-<version>``:
  ``ray[serve]`` of the same version as this test session's Ray, with the
  version's constraints file if the project has one, and nothing else), started
  from a directory outside the project, with the dashboard (``serve deploy``
  goes through it, as KubeRay's does);
* a second node from this session's environment declares ``gpu_apple_mps``, as
  the Mac does;
* ``mlx-ray package``'s zip is published over HTTPS on loopback (a self-signed
  certificate both nodes trust through REQUESTS_CA_BUNDLE, which Ray's HTTPS
  download honours), as a user publishes it to a registry the cluster reaches.

The test process never connects to this cluster as a driver (the session's other
cluster holds that slot); it talks to it through the head's CLI and REST API.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures_ray import RAY, RESOURCE, RayCluster, _node_args, _spawn, _wait_started, free_ports

ROOT = Path(__file__).resolve().parents[1]


def _ray_version() -> str:
    import ray

    return ray.__version__


def stock_head_env(version: str) -> Path:
    """The head's virtualenv (built once, then reused): ray[serve]==version, nothing else."""
    env = ROOT / "build" / "envs" / f"head-ray-{version}"
    done = env / ".complete"
    if done.exists():
        return env
    shutil.rmtree(env, ignore_errors=True)
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(env)], check=True)
    cmd = [uv, "pip", "install", "-q", "--python", str(env / "bin" / "python"), f"ray[serve]=={version}"]
    constraints = ROOT / "constraints" / f"ray-{version}.txt"
    if constraints.exists():
        cmd += ["-c", str(constraints)]
    subprocess.run(cmd, check=True)
    done.touch()
    return env


def _https_server(directory: Path, work: Path) -> tuple[str, Path, http.server.ThreadingHTTPServer]:
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"https://127.0.0.1:{srv.server_address[1]}", cert, srv


@dataclass
class StockCluster:
    cluster: RayCluster
    head_env: Path
    gcs: str
    dashboard: str
    http_port: int
    package_uri: str
    env: dict
    node_env: dict

    def head_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run one of the head environment's CLIs (serve, ray) from outside the project."""
        exe, *rest = args
        return subprocess.run([str(self.head_env / "bin" / exe), *rest], capture_output=True, text=True,
                              timeout=timeout, env=self.env, cwd=self.cluster.temp_dir)

    def build_attempts(self) -> list[dict]:
        """Every run of Serve's build task: state and node (task events are on for it)."""
        import httpx

        r = httpx.get(f"{self.dashboard}/api/v0/tasks", params={
            "filter_keys": "name", "filter_predicates": "=", "filter_values": "build_serve_application",
            "detail": "1", "limit": "100"}, timeout=30)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def head_node_id(self) -> str:
        import httpx

        nodes = httpx.get(f"{self.dashboard}/nodes?view=summary", timeout=30).json()["data"]["summary"]
        return next(n["raylet"]["nodeId"] for n in nodes if n["raylet"].get("isHeadNode"))

    def controller_log(self) -> str:
        logs = sorted((self.cluster.temp_dir / "session_latest" / "logs" / "serve").glob("controller_*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)


@pytest.fixture(scope="module")
def stock_cluster(tmp_path_factory, model_cache):
    version = _ray_version()
    head_env = stock_head_env(version)
    work = tmp_path_factory.mktemp("stock")
    pub = work / "registry"
    out = subprocess.run([sys.executable, "-m", "mlx_ray.cli", "package", "--out", str(pub)],
                         capture_output=True, text=True, check=True)
    zip_path = Path(out.stdout.strip())
    base, cert, srv = _https_server(pub, work)

    temp_dir = Path(tempfile.mkdtemp(prefix="ms", dir="/tmp"))
    outside = temp_dir / "cwd"
    outside.mkdir()
    port, dash, http_port = free_ports(3)
    common = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled", "REQUESTS_CA_BUNDLE": str(cert),
              "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1"}
    # The head: the stock environment only (its own PATH, no PYTHONPATH, no LD_PRELOAD, no project).
    head_env_vars = {"PATH": f"{head_env / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
                     "LANG": "C.UTF-8", **common,
                     # the test reads each build attempt from the state API (Serve turns its task events off)
                     "RAY_SERVE_ENABLE_TASK_EVENTS": "1"}
    mac_env = {**os.environ, **common, "MLX_RAY_CACHE": str(model_cache)}
    mac_env.pop("RAY_AUTH_TOKEN", None)
    cluster = RayCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir)
    try:
        head = [str(head_env / "bin" / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *_node_args(temp_dir, 1)]
        cluster.logs.append(temp_dir / "head.log")
        with open(cluster.logs[-1], "wb") as log:
            cluster.procs.append(subprocess.Popen(head, stdout=log, stderr=subprocess.STDOUT, env=head_env_vars,
                                                  cwd=outside, start_new_session=True))
        _wait_started(cluster.procs[-1], cluster.logs[-1])
        mac = [RAY, "start", f"--address={cluster.address}",
               # 2: the module runs a second app (`serve --address`) beside the config-deployed one
               f"--resources={json.dumps({RESOURCE: 2})}", *_node_args(temp_dir, 2)]
        cluster.logs.append(temp_dir / "mac.log")
        cluster.procs.append(_spawn(mac, cluster.logs[-1], mac_env))
        _wait_started(cluster.procs[-1], cluster.logs[-1])
        yield StockCluster(cluster=cluster, head_env=head_env, gcs=cluster.address, dashboard=f"http://127.0.0.1:{dash}",
                           http_port=http_port, package_uri=f"{base}/{zip_path.name}",
                           env={**head_env_vars, "RAY_ADDRESS": cluster.address}, node_env=mac_env)
    finally:
        cluster.stop()
        srv.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
