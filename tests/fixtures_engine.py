"""Engine test fixtures: one started engine on the float32 fixture, and mlx-lm references.

The engine is shared by the session; each test drives it from its own event
loop (``asyncio.run``), which the engine supports (events go to the loop that
called ``generate``).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest


def run_async(coro):
    return asyncio.run(coro)


async def collect(engine, request):
    """Run one request to its end: (token ids, text, text deltas, logprobs, finish event)."""
    from mlx_ray.engine.protocol import TokenEvent

    ids, deltas, lps = [], [], []
    async for ev in engine.generate(request):
        if isinstance(ev, TokenEvent):
            ids += ev.token_ids
            deltas.append(ev.text)
            lps += ev.logprobs or []
        else:
            return ids, "".join(deltas), deltas, lps, ev
    raise AssertionError("the stream ended without a FinishEvent")


def make_request(rid, ids, **sampling):
    from mlx_ray.engine.protocol import GenerationRequest, SamplingParams

    sampling.setdefault("temperature", 0.0)
    deadline = sampling.pop("deadline", None)
    return GenerationRequest(rid, list(ids), SamplingParams(**sampling), deadline=deadline)


def start_engine(model_path, **cfg):
    from mlx_ray.engine.engine import MLXEngine
    from mlx_ray.engine.protocol import EngineConfig

    engine = MLXEngine(model_path, EngineConfig(**cfg))
    run_async(engine.start())
    return engine


@pytest.fixture(scope="session")
def engine_f32(mlx_f32):
    """A started MLXEngine on the float32 fixture (8 rows, 512 MiB KV, 64 MiB prefix cache)."""
    engine = start_engine(mlx_f32, max_num_seqs=8, max_queue=16, kv_budget_bytes=512 << 20,
                          prefix_cache_bytes=64 << 20, max_model_len=2048)
    yield engine
    run_async(engine.shutdown())


@pytest.fixture(scope="session")
def mlxlm_f32(mlx_f32):
    """(model, tokenizer) loaded by plain mlx-lm, for reference outputs."""
    from mlx_lm import load

    return load(str(mlx_f32))


@pytest.fixture(scope="session")
def mlxlm_greedy(mlxlm_f32):
    """tokens = mlxlm_greedy(prompt_ids, max_tokens): mlx-lm's own greedy generation (stream_generate,
    the loop under mlx_lm.generate), EOS included like the engine reports it. Memoized."""
    from mlx_lm import stream_generate

    model, tokenizer = mlxlm_f32
    memo: dict = {}

    def run(ids, max_tokens):
        key = (tuple(ids), max_tokens)
        if key not in memo:
            memo[key] = [r.token for r in stream_generate(model, tokenizer, prompt=list(ids), max_tokens=max_tokens)]
        return memo[key]

    return run


@pytest.fixture(scope="session")
def mlx_f32_no_template(mlx_f32, tmp_path_factory) -> Path:
    """The float32 fixture with its chat template removed (weights symlinked)."""
    import json

    out = tmp_path_factory.mktemp("no_template")
    for f in Path(mlx_f32).iterdir():
        if f.name == "chat_template.jinja":
            continue
        if f.suffix == ".safetensors":
            (out / f.name).symlink_to(f)
        else:
            shutil.copy(f, out / f.name)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    return out
