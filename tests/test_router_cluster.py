"""The router as a Ray Serve application on the two-node cluster (issue 31), on the cluster's Ray.

The router app is built by ``mlx_ray.router:app``'s builder and deployed beside the session's mlx-ray app,
whose model replica runs on the node offering ``gpu_apple_mps`` (the Mac). Its arms: a separate real
mlx-ray server (``tests/arm_server.py``) as the primary, and the Mac's app through Serve's proxy as the
secondary, with its load report. The router's replica must run on the head, never on the Mac; when the
Mac's node is stopped (SIGSTOP of its raylet and workers: the Mac asleep), the router takes it out within
a probe interval and uses it again after SIGCONT, without a restart.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from fixtures_ray import free_ports
from fixtures_router import oai_client, router_health, start_arm, wait_arm_healthy, wait_until

pytestmark = pytest.mark.ray

APP = "router-test"
PREFIX = "/router"
MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def primary(mlx_f32, tmp_path_factory):
    (port,) = free_ports(1)
    arm = start_arm("prim", mlx_f32, port, 2, 64, tmp_path_factory.mktemp("primary") / "primary.log")
    try:
        wait_arm_healthy(arm)
        yield arm
    finally:
        arm.proc.kill()
        arm.proc.wait(30)


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (from /proc: the Mac node's `ray start`, raylet, workers, ...)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _signal_all(pids: list[int], sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def test_the_router_runs_on_the_head_and_rides_out_the_mac_sleeping(ray_cluster, served, primary):
    from ray import serve

    from mlx_ray.router import app as router_app  # the import path mlx_ray.router:app

    url, _ = served
    cfg = {"public_model": "chat", "policy": "ab", "probe_interval_s": 1.0, "probe_timeout_s": 2.0,
           "cooldown_s": 2.0,
           "arms": [{"name": "primary", "role": "primary", "base_url": primary.url, "model": primary.model,
                     "weight": 0.5},
                    {"name": "mac", "role": "secondary", "base_url": f"{url}/v1", "model": "smol", "weight": 0.5,
                     "load": {"mlx_ray": f"{url}/v1/load", "model_name": "smol"}}]}
    serve.run(router_app(cfg), name=APP, route_prefix=PREFIX, blocking=False)
    base = url + PREFIX
    try:
        wait_until(lambda: _ok(base), 120, "the router app did not answer /health")
        h = router_health(base)
        nodes = ray_cluster.node_ids()
        assert h["node_id"] == nodes["head"] != nodes["mac"], (h["node_id"], nodes)  # never on the Mac
        wait_until(lambda: router_health(base)["arms"]["mac"]["load"], 10,
                   f"the Mac's load report was not read: {router_health(base)['arms']['mac']}")
        assert router_health(base)["arms"]["mac"]["load"]["source"] == "mlx_ray"
        c = oai_client(base)
        arm_of = {}
        for i in range(12):  # real answers through Serve's proxy, under the public name, from both arms
            r = c.chat.completions.with_raw_response.create(model="chat", messages=MSG, max_tokens=4, user=f"u{i}")
            assert r.parse().model == "chat" and r.headers["x-mlx-ray-route"] == "ab"
            arm_of[f"u{i}"] = r.headers["x-mlx-ray-arm"]
        assert set(arm_of.values()) == {"primary", "mac"}, arm_of
        mac_users = [u for u, a in arm_of.items() if a == "mac"]

        # the Mac sleeps under a steady load of the Mac's users
        results: list[dict] = []
        stop = threading.Event()

        def worker(k: int) -> None:
            cl = oai_client(base)
            i = 0
            while not stop.is_set():
                i += 1
                user = mac_users[(k + i) % len(mac_users)]
                rec = {"t0": time.monotonic(), "error": None, "arm": None}
                try:
                    r = cl.chat.completions.with_raw_response.create(model="chat", messages=MSG, max_tokens=16,
                                                                     user=user)
                    rec["arm"] = r.headers["x-mlx-ray-arm"]
                except openai.APIError as e:
                    rec["error"] = f"{type(e).__name__}: {e}"
                rec["t1"] = time.monotonic()
                results.append(rec)

        # 2 at a time: the session's app serves two models, so its model replicas take at most max_num_seqs (2)
        # + max_queue (1) calls, the load report's own call included (a one-model app, the Mac's usual, has room)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        mac_pids = _descendants(ray_cluster.procs[1].pid)
        try:
            wait_until(lambda: len(results) >= 3, 60, "no load")
            _signal_all(mac_pids, signal.SIGSTOP)
            t_stop = time.monotonic()
            opened = wait_until(lambda: router_health(base)["arms"]["mac"]["circuit"] != "closed" and time.monotonic(),
                                15, "the Mac's circuit did not open")
            time.sleep(3)
            _signal_all(mac_pids, signal.SIGCONT)
            t_cont = time.monotonic()
            wait_until(lambda: any(r["arm"] == "mac" and r["t0"] > t_cont for r in results), 60,
                       "the Mac was not used again after it woke")
        finally:
            _signal_all(mac_pids, signal.SIGCONT)
            stop.set()
            for t in threads:
                t.join(120)
        assert opened - t_stop <= 5.0, opened - t_stop  # the target: out within 5 s (probe 1 s + timeout 2 s + slack)
        assert not [r for r in results if r["error"]], [r for r in results if r["error"]][:3]  # none failed
        assert any(r["arm"] == "primary" and t_stop < r["t1"] < t_cont for r in results)  # the Mac's users failed over
    finally:
        serve.delete(APP)


def _ok(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
