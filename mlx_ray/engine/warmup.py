"""Warm-up: a few short chat requests through the real path before the engine says it is ready.

A fresh engine's first burst is slower than later ones. Measured here in
process (f32 fixture, AMD EPYC 2 vCPU, 16 fresh chat prompts at once, TTFT
p50): 3.49 s right after start against 2.18 s for the next burst; with the
prefix cache off, 3.46 s then 3.40 s. So most of the gap is the prefix cache
being empty: every chat request without a system message of its own begins
with the chat template's preamble (SmolLM2's and Qwen2.5's carry a default
system prompt), a warm server has it cached, and a cold burst prefills it 16
times. The rest is one-time costs of first calls: the template's Jinja
compile, the tool-format detection, MLX's first allocations, each kernel's and
sampler path's first call (on Metal, pipeline-state compiles). vLLM likewise
runs a profile pass (and CUDA-graph captures) before it serves.

So the warm-up sends chat requests (greedy with logprobs, and both sampled
filter paths, together: the batched decode and the batched sampler run too)
and leaves their prompts in the prefix cache, the state a server is in after
its first request. Then the loop's counters go back to zero, so a user's
metrics count only users.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..errors import EngineFault
from .protocol import FinishEvent, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

WARMUP_TOKENS = 4
# (prompt text, sampling): distinct prompts, so no warm-up request hits another's prefix
WARMUP_REQUESTS = [
    ("warm-up: greedy", dict(temperature=0.0, logprobs=True, top_logprobs=2)),
    ("warm-up: nucleus sampling", dict(temperature=0.7, top_p=0.9, seed=0)),
    ("warm-up: top-k and min-p sampling", dict(temperature=0.7, top_k=40, min_p=0.05, seed=1)),
]


def _prompt(engine, text: str) -> list[int]:
    if engine.tokenizer.has_chat_template:
        engine.chat_format(None)  # the cached detection the server runs per request
        return engine.encode_chat([{"role": "user", "content": text}])
    return engine.encode(text)


async def _one(engine, i: int, text: str, sampling: dict) -> None:
    ids = await asyncio.to_thread(_prompt, engine, text)
    params = SamplingParams(max_tokens=WARMUP_TOKENS, ignore_eos=True, **sampling)
    async for ev in engine.generate(GenerationRequest(f"mlx-ray-warmup-{i}", ids, params)):
        if isinstance(ev, FinishEvent) and ev.error is not None:
            raise EngineFault(f"the warm-up request failed, so the engine cannot serve: {ev.error}")


async def warm_up(engine) -> float:
    """Run the warm-up requests together, then zero the loop's counters; seconds taken."""
    t0 = time.perf_counter()
    todo = list(enumerate(WARMUP_REQUESTS))
    width = max(1, engine.config.max_num_seqs)  # never more at once than the engine admits
    for k in range(0, len(todo), width):
        await asyncio.gather(*(_one(engine, i, text, s) for i, (text, s) in todo[k:k + width]))
    await engine.reset_counters()
    took = time.perf_counter() - t0
    log.info("engine warmed up in %.2f s (%d requests of %d tokens; their prompts stay in the prefix cache)",
             took, len(WARMUP_REQUESTS), WARMUP_TOKENS)
    return took
