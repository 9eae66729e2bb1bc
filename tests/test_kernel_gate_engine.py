"""The gate inside the engine: faulty Metal kernels cost speed, never the replica.

The device is the one mocked part (``gate.current_device`` returns
``Device("fake-metal", metal=True, mx_device=mx.cpu)``); the kernels are toys
registered under the engine's kernel names (``tests/gate_toys.py``) whose
"Metal path" segfaults or hangs in the gate's child process, or (for the
run-time path) a seeded verdict whose kernel raises when called. The engine,
its paged cache, the scheduler and the twins are the real ones.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import gate_toys as toys
from fixtures_engine import collect, make_request, run_async, start_engine
from mlx_ray.kernels import _common, gate, gate_child
from mlx_ray.kernels import sampler as batch_sampler

FAKE = gate.Device("fake-metal", metal=True, mx_device=mx.cpu)


pytestmark = pytest.mark.usefixtures("clean_gate")  # tests/fixtures_kernels.py


def test_faulting_kernels_are_measured_once_and_the_engine_serves_on_twins(mlx_f32, monkeypatch):
    _common.kernels()
    monkeypatch.setitem(_common.KERNELS, "paged_attention", toys.PAGED_SEGV)
    monkeypatch.setitem(_common.KERNELS, "sampler", toys.SAMPLER_HANG)
    monkeypatch.setattr(gate, "current_device", lambda: FAKE)
    # The CPU primitives off too, so the twins (not the C++ kernels) serve inside the paged engine.
    monkeypatch.setenv("MLX_RAY_KERNELS_DISABLE", "paged_attention_cpu,sampler_cpu")
    monkeypatch.setenv("MLX_RAY_GATE_CASE_TIMEOUT_S", "3")
    cfg = dict(max_num_seqs=2, kv_budget_bytes=64 << 20, prefix_cache_bytes=0, max_model_len=512)
    n = len(gate_child.LAUNCHES)

    engine = start_engine(mlx_f32, **cfg)  # one start, with the warm-up: it must come up healthy
    try:
        assert gate_child.LAUNCHES[n:] == ["gate_toys:PAGED_SEGV", "gate_toys:SAMPLER_HANG"]
        assert gate.latest("paged_attention").reason == "crashed during measurement (SIGSEGV, case tiny)"
        assert gate.latest("sampler").reason.startswith("timed out after 3 s")
        assert engine._sched.backend.kind == "paged"  # the paged cache with the twin, not the rectangular one
        ids, _, _, _, fin = run_async(collect(engine, make_request("a", [1, 2, 3, 4], temperature=0.7, seed=1,
                                                                   max_tokens=4)))
        assert fin.finish_reason == "length" and len(ids) == 4
        engine.check_health()
        assert engine.stats().get("batch_failures", 0) == 0  # the faults cost the gate's child, never a batch
    finally:
        run_async(engine.shutdown())

    gate.reset()  # a restart of the replica: the verdicts come from the cache, nothing is measured again
    engine = start_engine(mlx_f32, **cfg)
    try:
        assert len(gate_child.LAUNCHES) == n + 2
        assert gate.latest("paged_attention").cached and gate.latest("sampler").cached
        assert engine._sched.backend.kind == "paged"
    finally:
        run_async(engine.shutdown())


def test_a_kernel_failing_at_run_time_fails_that_request_then_the_twin_serves(engine_f32, mlx_f32, monkeypatch):
    key = gate.cache_key(batch_sampler.SPEC, FAKE)
    gate._write_cache(key, gate.Verdict("sampler", True, "seeded: measured faster earlier", device=FAKE.name))
    assert gate.verdict("sampler", device=FAKE).enabled  # this process's verdict: on (from the cache)
    monkeypatch.setattr(_common, "metal_available", lambda: True)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("[metal_kernel] Unable to load kernel mlx_ray_sampler")
    monkeypatch.setattr(batch_sampler, "metal_sample", broken)

    failures = engine_f32.stats().get("batch_failures", 0)
    _, _, _, _, fin = run_async(collect(engine_f32, make_request("hit", [1, 2, 3], temperature=0.8, seed=3,
                                                                 max_tokens=3)))
    assert fin.finish_reason == "error" and "kernel sampler failed" in str(fin.error), fin
    assert len(calls) == 1 and not gate.enabled("sampler")
    ids, _, _, _, fin = run_async(collect(engine_f32, make_request("next", [1, 2, 3], temperature=0.8, seed=3,
                                                                   max_tokens=3)))
    assert fin.finish_reason == "length" and len(ids) == 3 and len(calls) == 1  # the twin (or CPU kernel) served
    engine_f32.check_health()  # healthy: the engine serves; the failed kernel is reported
    stats = engine_f32.stats()
    assert "Unable to load kernel" in stats["kernels_failed"]["sampler"]
    assert stats["batch_failures"] == failures + 1
    r = run_async(_http_health(engine_f32, mlx_f32))  # the replica's GET /health: 200, and it says so
    assert r.status_code == 200, r.text
    assert "Unable to load kernel" in r.json()["kernels_failed"]["smol"]["sampler"], r.text
    gate.reset()
    v = gate.verdict("sampler", device=FAKE)  # the next process: off, from the cache
    assert v.cached and not v.enabled and v.failed_at_runtime



async def _http_health(engine, model):
    """GET /health of a replica's own app (direct ingress: the real routes over this engine), over ASGI."""
    import httpx

    from mlx_ray.serve.config import ServeConfig
    from mlx_ray.serve.ingress import OpenAIIngress, create_app
    from mlx_ray.serve.local import LocalHandle
    from mlx_ray.serve.server import LLMServer

    cfg = ServeConfig.from_args({"models": [{"model": str(model), "name": "smol"}]})
    app = create_app(OpenAIIngress({"smol": LocalHandle(LLMServer(cfg.models[0], engine=engine))}, cfg))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica") as c:
        return await c.get("/health")
