"""The seed's model at its real shapes, end to end on this machine: convert, plan, start on the Mac's profile, serve.

The checkpoint (``fixtures_seed.py``) is Qwen2.5-32B-Instruct-AWQ's real config
with 2 of its 64 layers, random AWQ weights: every matrix, group size and the
vocabulary are the real ones. The engine plans on the M4 Pro 48 GB *profile*
(a stand-in for what Metal reports on the Mac; the arithmetic runs here, the
Mac does not) and serves a 1,000-token prompt on this CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fixtures_engine import make_request, run_async

CTX = 4096


@pytest.fixture(scope="module")
def seed_converted(seed_awq, seed_cache):
    from mlx_ray.conversion.convert import convert

    return convert(str(seed_awq), cache_dir=seed_cache, progress=False)


@pytest.fixture(scope="module")
def seed_engine(seed_converted):
    import os

    from fixtures_engine import start_engine

    os.environ["MLX_RAY_DEVICE_PROFILE"] = "m4-pro-48gb"
    try:
        engine = start_engine(seed_converted, max_model_len=CTX, warmup=False)
    finally:
        del os.environ["MLX_RAY_DEVICE_PROFILE"]
    yield engine
    run_async(engine.shutdown())


def test_the_converted_seed_keeps_its_real_shapes_and_the_plan_counts_it_exactly(seed_awq, seed_converted):
    from mlx_ray.engine import memory

    cfg = json.loads((seed_converted / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == (5120, 27648, 152064)
    assert cfg["quantization"]["group_size"] == 128
    mapped, embed = memory.mapped_bytes(seed_converted)
    # The plan's config arithmetic on the *source* AWQ config is the converted model's size to the byte.
    assert memory.estimate_weights(json.loads((seed_awq / "config.json").read_text())) == (mapped, embed)
    out = subprocess.run([sys.executable, "-m", "mlx_ray.cli", "plan", str(seed_converted), "--device", "m4-pro-48gb",
                          "--max-model-len", str(CTX), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["full_length_seqs"] >= 16


def test_the_engine_on_the_mac_profile_admits_16_full_context_requests(seed_engine):
    plan = seed_engine.plan
    assert plan.device["name"] == "m4-pro-48gb" and plan.max_model_len == CTX
    assert plan.full_length_seqs >= 16
    assert seed_engine._sched.backend.pool.num_blocks - 1 >= 16 * CTX // 32
    # A chat request without max_tokens reserves the whole context (the server's default): admitted, not a 400.
    ids = seed_engine.encode_chat([{"role": "user", "content": "Hello"}])
    eos = seed_engine.tokenizer.eos_token_ids
    req = make_request("no-max-tokens", ids, max_tokens=CTX - len(ids), logit_bias={min(eos): 100.0})
    events = run_async(_collect(seed_engine, req))
    assert events[-1].finish_reason == "stop" and events[-1].error is None


def test_the_engine_serves_a_1000_token_prompt_at_the_seeds_shapes(seed_engine):
    ids = [(i * 7919) % 40000 + 100 for i in range(1000)]
    events = run_async(_collect(seed_engine, make_request("long", ids, max_tokens=4)))
    fin = events[-1]
    assert fin.error is None and fin.finish_reason == "length"
    assert fin.prompt_tokens == 1000 and fin.completion_tokens == 4


async def _collect(engine, req):
    return [ev async for ev in engine.generate(req)]
