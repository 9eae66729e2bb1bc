"""mlx-ray as a router's arm: the load report (GET /v1/load) and vLLM's gauges (GET /metrics).

The real engine on the float32 fixture behind the real ingress, served by uvicorn in a
thread (a real HTTP server, so a stream is really open while the load is read), without
Ray Serve: the ingress reaches the model's LLMServer through ``LocalHandle``, as the
one-model app's replica does (``serve/local.py``). The router's own parsers
(``mlx_ray/router/loads.py``) read what it serves.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from mlx_ray.engine.protocol import EngineConfig
from mlx_ray.engine.scheduler import RATE_ALPHA, Scheduler
from mlx_ray.router.loads import parse_mlx_ray_report, parse_prometheus
from mlx_ray.serve import ingress as ingress_mod
from mlx_ray.serve.config import ServeConfig
from mlx_ray.serve.ingress import OpenAIIngress, create_app
from mlx_ray.serve.local import LocalHandle
from mlx_ray.serve.metrics import ray_metric_name, vllm_gauges
from mlx_ray.serve.server import LLMServer

pytestmark = pytest.mark.ray  # the serve layer, as test_serve_api.py

KEY = "arm-load-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENGINE = {"max_num_seqs": 4, "max_queue": 8, "max_model_len": 1024, "kv_budget_bytes": 128 << 20,
          "prefix_cache_bytes": 16 << 20}


class _Http:
    """uvicorn serving an app in a thread of its own; ``client`` talks to it over TCP."""

    def __init__(self, app):
        import uvicorn
        from fixtures_ray import free_ports

        port = free_ports(1)[0]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="arm-load-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def close(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def arm(mlx_f32):
    """(HTTP server, engine, the load report read right after the engine's start and warm-up)."""
    from fixtures_engine import run_async, start_engine

    engine = start_engine(mlx_f32, **ENGINE)  # warm-up on (the default): 3 requests, then a counter reset
    after_start = dict(engine.stats())
    cfg = ServeConfig.from_args({"api_key": KEY, "models": [{"model": str(mlx_f32), "name": "smol", "engine": ENGINE}]})
    server = LLMServer(cfg.models[0], stream_batching_interval_ms=5, engine=engine)
    http = _Http(create_app(OpenAIIngress({"smol": LocalHandle(server)}, cfg)))
    yield http, engine, after_start
    http.close()
    run_async(engine.shutdown())


def _chat(http, text: str, max_tokens: int = 8) -> tuple[dict, float, float, float]:
    """One streamed chat request: (usage, sent at, first content chunk at, last chunk at)."""
    body = {"model": "smol", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0, first, usage = time.monotonic(), None, None
    with http.client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.monotonic()
    return usage, t0, first, time.monotonic()


def _load(http, **params) -> httpx.Response:
    return http.client.get("/v1/load", params=params, headers=AUTH)


def test_the_report_shows_measured_rates_after_real_requests(arm):
    http, engine, after_start = arm
    # The warm-up's rates are dropped with its counters (they carry one-time costs): not measured yet.
    assert after_start["prefill_tokens_per_s"] == 0.0 and after_start["decode_tokens_per_s"] == 0.0
    lows_prefill, lows_decode = [], []
    for i, text in enumerate(["Name three colours.", "What is two plus two?", "Say hello in French."]):
        usage, t0, first, end = _chat(http, f"{text} ({i})", max_tokens=8)
        assert usage["completion_tokens"] == 8
        uncached = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
        assert uncached > 0
        # The engine's intervals lie inside the client's: each sample is at least the client's rate.
        lows_prefill.append(uncached / (first - t0))
        lows_decode.append((usage["completion_tokens"] - 1) / (end - t0))
    r = _load(http)
    assert r.status_code == 200, r.text
    report = r.json()
    assert set(report) == {"model", "waiting", "running", "free_kv_blocks", "kv_blocks_total",
                           "prefill_tokens_per_s", "decode_tokens_per_s", "max_num_seqs"}
    assert report["model"] == "smol" and report["max_num_seqs"] == ENGINE["max_num_seqs"]
    assert report["waiting"] == 0 and report["running"] == 0
    assert report["prefill_tokens_per_s"] >= min(lows_prefill) > 0, (report, lows_prefill)
    assert report["decode_tokens_per_s"] >= min(lows_decode) > 0, (report, lows_decode)
    assert report["decode_tokens_per_s"] < 1e5 and report["prefill_tokens_per_s"] < 1e6  # seconds, not ms
    stats = engine.stats()
    if stats.get("kv_cache") == "paged":  # the engine's blocks, as the router reads them
        assert report["kv_blocks_total"] == stats["kv_blocks_total"] > 0
        assert 0 < report["free_kv_blocks"] <= report["kv_blocks_total"]
    load = parse_mlx_ray_report(report)
    assert load.source == "mlx_ray" and load.waiting == 0 and load.running == 0
    assert load.prefill_tokens_per_s == report["prefill_tokens_per_s"]
    assert load.decode_tokens_per_s == report["decode_tokens_per_s"]


def test_load_and_metrics_follow_an_open_stream(arm):
    http, engine, _ = arm
    body = {"model": "smol", "messages": [{"role": "user", "content": "Count to one thousand."}],
            "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with http.client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while '"content"' not in next(lines):  # its first token came: it is running
            pass
        report = _load(http, model="smol").json()
        assert report["running"] >= 1 and report["waiting"] == 0, report
        m = http.client.get("/metrics")  # open: no API key
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        load = parse_prometheus(m.text, model_name="smol")
        assert load.source == "prometheus" and load.running >= 1 and load.waiting == 0
        usage = [ln for ln in m.text.splitlines() if ln.startswith('vllm:kv_cache_usage_perc{model_name="smol"}')]
        assert len(usage) == 1 and 0 < float(usage[0].split()[-1]) <= 1, m.text
    # the client went away: the engine cancels the request, and the report says so
    deadline = time.monotonic() + 30
    while (report := _load(http).json())["running"] or report["waiting"]:
        assert time.monotonic() < deadline, report
        time.sleep(0.05)
    assert parse_prometheus(http.client.get("/metrics").text, model_name="smol").running == 0


def test_load_refusals(arm):
    http, _, _ = arm
    r = _load(http, model="nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert http.client.get("/v1/load").status_code == 401  # under the API key, as the other /v1 paths


class _Replica:
    """What the ingress calls on a model's replica for its load: ``stats()``, answering ``answer``
    (None: never)."""

    def __init__(self, answer):
        self.answer = answer

    async def stats(self):
        if self.answer is None:
            await asyncio.sleep(3600)
        return self.answer


def test_several_models_need_a_name_and_a_silent_replica_is_a_503(monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setattr(ingress_mod, "LOAD_TIMEOUT_S", 0.2)
    cfg = ServeConfig.from_args({"models": [{"model": "x", "name": "a", "engine": {"max_num_seqs": 3}},
                                            {"model": "x", "name": "b"}]})
    replicas = {"a": LocalHandle(_Replica({"running": 0, "waiting": 0})), "b": LocalHandle(_Replica(None))}
    client = TestClient(create_app(OpenAIIngress(replicas, cfg)))
    r = client.get("/v1/load")
    assert r.status_code == 400 and "a, b" in r.json()["error"]["message"]
    r = client.get("/v1/load", params={"model": "a"})
    assert r.status_code == 200 and r.json()["max_num_seqs"] == 3  # its stats lack it: the config's
    r = client.get("/v1/load", params={"model": "b"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    assert r.headers["Retry-After"] == "5"
    m = client.get("/metrics")  # the silent replica is left out, the other one is there
    assert m.status_code == 200
    assert parse_prometheus(m.text, model_name="a").running == 0
    assert 'model_name="b"' not in m.text


def test_rates_are_an_ewma_of_request_samples_and_reset_with_the_counters():
    class Backend:  # what the scheduler asks of a backend outside its loop
        def stats(self):
            return {}

        def reset_counters(self):
            pass

    sched = Scheduler(Backend(), EngineConfig(max_num_seqs=5), kv_budget=0)
    assert sched.published["decode_tokens_per_s"] == 0.0 and sched.published["max_num_seqs"] == 5
    sched._rate("decode_tokens_per_s", 50, 2.0)  # the first sample as it is
    assert sched.rates["decode_tokens_per_s"] == 25.0
    sched._rate("decode_tokens_per_s", 75, 1.0)
    assert sched.rates["decode_tokens_per_s"] == pytest.approx(25.0 + RATE_ALPHA * 50.0)
    sched._rate("decode_tokens_per_s", 0, 1.0)  # nothing measured: no sample
    sched._rate("decode_tokens_per_s", 5, 0.0)
    assert sched.rates["decode_tokens_per_s"] == pytest.approx(25.0 + RATE_ALPHA * 50.0)
    sched._rate("prefill_tokens_per_s", 300, 0.5)
    sched._publish()
    assert sched.published["prefill_tokens_per_s"] == 600.0
    done = threading.Event()
    sched._reset_counters(done)
    assert done.is_set() and sched.published["prefill_tokens_per_s"] == sched.published["decode_tokens_per_s"] == 0.0


def test_vllm_gauges_for_ray_have_no_colon_and_usage_is_vllms():
    assert ray_metric_name("vllm:num_requests_waiting") == "vllm_num_requests_waiting"  # ray_vllm_... on Ray's port
    paged = {"kv_cache": "paged", "kv_blocks_total": 200, "kv_blocks_free": 150, "running": 2, "waiting": 1,
             "inflight": 3}
    assert vllm_gauges(paged) == {"vllm:num_requests_waiting": 1, "vllm:num_requests_running": 2,
                                  "vllm:kv_cache_usage_perc": 0.25}
    # accepted by the engine, not yet taken in by the loop: waiting
    assert vllm_gauges({**paged, "inflight": 5})["vllm:num_requests_waiting"] == 3
    batch = {"kv_cache": "batch", "kv_bytes_used": 30, "kv_budget_bytes": 120}
    assert vllm_gauges(batch)["vllm:kv_cache_usage_perc"] == 0.25
