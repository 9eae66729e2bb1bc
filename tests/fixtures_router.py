"""Helpers of the router tests: real mlx-ray arms in processes of their own, the router's app under uvicorn.

An arm is ``tests/arm_server.py`` (mlx-ray's one-model OpenAI app over the real engine and model, without
Ray); SIGSTOP and SIGCONT of its process stand in for the Mac sleeping and waking.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

from fixtures_ray import free_ports
from mlx_ray.router.ingress import RouterIngress, create_app

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ArmProc:
    name: str
    model: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.root + "/v1"

    def signal(self, sig) -> None:
        os.kill(self.proc.pid, sig)


def start_arm(name: str, model_dir: Path, port: int, seqs: int, queue: int, log: Path, engine_class: str = "") -> ArmProc:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "arm_server.py"), str(model_dir), str(port),
                                 name, str(seqs), str(queue), engine_class], stdout=out, stderr=subprocess.STDOUT, env=env)
    return ArmProc(name, name, port, proc, log)


def wait_arm_healthy(arm: ArmProc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert arm.proc.poll() is None, f"arm {arm.name} exited: {arm.log.read_text()[-2000:]}"
        try:
            if httpx.get(arm.root + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"arm {arm.name} not healthy in {timeout}s: {arm.log.read_text()[-2000:]}")


@contextmanager
def running_router(cfg: dict):
    """The router's app under uvicorn on a free port in a thread of this process: (base URL, RouterIngress)."""
    import uvicorn

    ing = RouterIngress(cfg)
    (port,) = free_ports(1)
    app = create_app(ing)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await ing.router.close()  # its HTTP client, on the loop that made it

    app.router.lifespan_context = lifespan
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "the router's server did not start"
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}"
        httpx.get(url + "/health", timeout=10)  # starts the probe loop (as Serve's first health check does)
        yield url, ing
    finally:
        server.should_exit = True
        t.join(15)


def oai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def router_health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def wait_until(pred, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"{what} within {timeout}s")
