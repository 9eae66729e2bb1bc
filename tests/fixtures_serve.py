"""The session's served application on the two-node cluster, shared by every test that needs a real server.

One application (``APP``), deployed once per session by ``mlx-ray serve``'s own
``deploy``/``wait_ready``:

* ``smol``: the fixture (float32) on MLXEngine with a tiny admission limit
  (2 running + 1 waiting) so overload is reachable with a handful of requests;
* ``smol-faulty``: the same model behind ``mlx_ray.serve.testing.FaultInjectingEngine``,
  the test hook that makes its engine fail like a dead generation loop on demand.

After every test that used it, ``no_leaked_slots`` waits for every engine to
report 0 in flight (slots never leak).
"""

from __future__ import annotations

import time

import pytest

from mlx_ray.serve.config import ServeConfig

APP = "mlx-ray-test"
MODELS = ("smol", "smol-faulty")
MSG = [{"role": "user", "content": "What is the capital of France?"}]
LIMIT = {"max_num_seqs": 2, "max_queue": 1, "max_model_len": 512}


@pytest.fixture(scope="session")
def served(ray_cluster, mlx_f32):
    """(base URL, ServeConfig) of the session's application."""
    from fixtures_ray import free_ports
    from mlx_ray.serve.cli import deploy, wait_ready

    # A quarter of the Mac's gpu_apple_mps each: half stays free for a fine-tune job in the same session
    # (tests/test_finetune.py), as on a Mac that serves and trains.
    cfg = ServeConfig.from_args({
        "port": free_ports(1)[0],
        "models": [
            {"model": str(mlx_f32), "name": "smol", "engine": LIMIT,
             "placement": {"resource_amount": 0.25, "max_queued_requests": 1}},
            {"model": str(mlx_f32), "name": "smol-faulty", "engine": LIMIT,
             "engine_class": "mlx_ray.serve.testing:FaultInjectingEngine",
             "placement": {"resource_amount": 0.25}},
        ],
    })
    url = deploy(cfg, app_name=APP, proxy_location="HeadOnly")
    wait_ready(cfg, url, app_name=APP, timeout=300)
    return url, cfg


@pytest.fixture(autouse=True)
def no_leaked_slots(request):
    """After every test that used the app: every engine reports 0 in flight (slots never leak)."""
    yield
    if "served" not in request.fixturenames:
        return
    for name in MODELS:
        deadline = time.monotonic() + 120
        while True:
            try:
                s = engine_stats(name)
            except Exception:  # noqa: BLE001 - a replica being replaced (the fault tests) answers later
                s = None
            if s and s["inflight"] == 0 and s["running"] == 0 and not s.get("wedged"):
                break
            assert time.monotonic() < deadline, f"{name}: slots still held after the test: {s}"
            time.sleep(0.3)


def serve_handle(name: str):
    """The Serve handle of model ``name``'s deployment in the session's application."""
    from ray import serve

    return serve.get_deployment_handle(ServeConfig.from_args({"models": [{"model": "x", "name": name}]})
                                       .models[0].deployment_name, app_name=APP)


def engine_stats(name: str = "smol") -> dict:
    return serve_handle(name).stats.remote().result(timeout_s=30)


def wait_idle(name: str = "smol", timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine_stats(name)
        if s["inflight"] == 0 and s["running"] == 0:
            return s
        time.sleep(0.2)
    raise AssertionError(f"engine still busy: {engine_stats(name)}")
