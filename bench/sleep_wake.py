"""Benchmark: what a replica's sleep gives back, and how fast waking serves again (issue 32's targets).

    python -m bench.sleep_wake [--model PATH] [--q4] [--cycles 3] [--max-model-len N] [--json out.json]

One engine in this process, as a replica holds it (the default engine config unless flags say
otherwise: memory plan, KV pool, prefix cache, warm-up). Measured with MLX's own counters
(``mx.get_active_memory()`` + ``mx.get_cache_memory()``, ``engine.memory.mlx_memory``) against the
process before the engine existed:

* **cold start**: ``MLXEngine(...).start()`` (load, tokenizer, grammar vocabulary, KV pool, warm-up);
* then a burst of ``--concurrency`` requests, so the memory is a serving replica's;
* per cycle: **sleep** (``engine.sleep``: stop admitting, release KV pool and weights, ``mx.clear_cache``),
  the memory held asleep, **wake** (``engine.wake_up``: reload from the cache, KV pool, warm-up), and
  **serves again**: wake plus the first greedy answer after it, which must equal the one before sleep.

Targets: released >= 90% of what the engine held; serves again within 2x the cold start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from mlx_ray.bench.sides import PROMPTS, fixture_model
from mlx_ray.bench.table import markdown_table
from mlx_ray.blas import loaded_blas, reexec_with_fast_blas

MiB = 2**20


async def greedy(engine, ids, tag: str, max_tokens: int = 16) -> list[int]:
    from mlx_ray.engine.protocol import FinishEvent, GenerationRequest, SamplingParams, TokenEvent

    out = []
    async for ev in engine.generate(GenerationRequest(f"{tag}-{time.monotonic_ns()}", ids,
                                                      SamplingParams(max_tokens=max_tokens, temperature=0.0))):
        if isinstance(ev, TokenEvent):
            out += ev.token_ids
        elif isinstance(ev, FinishEvent) and ev.error is not None:
            raise RuntimeError(f"{tag} failed: {ev.error}")
    return out


async def run(engine, args) -> dict:
    from mlx_ray.engine.memory import mlx_memory

    t0 = time.perf_counter()
    await engine.start()
    cold = time.perf_counter() - t0
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    reference = await greedy(engine, prompts[0], "reference")
    await asyncio.gather(*(greedy(engine, prompts[i % len(prompts)], f"burst{i}", args.max_tokens)
                           for i in range(args.concurrency)))
    cycles = []
    for c in range(args.cycles):
        before = mlx_memory()
        t = time.perf_counter()
        state = await engine.sleep(grace_s=0)
        slept = time.perf_counter() - t
        asleep = mlx_memory()
        t = time.perf_counter()
        await engine.wake_up()
        woke = time.perf_counter() - t
        again = await greedy(engine, prompts[0], f"again{c}")
        serves = time.perf_counter() - t
        if again != reference:
            raise RuntimeError(f"cycle {c}: the greedy answer after waking differs from the one before sleep")
        cycles.append({"held_bytes": before - args.baseline, "asleep_bytes": asleep - args.baseline,
                       "released_bytes": before - asleep, "released_frac": (before - asleep) / (before - args.baseline),
                       "sleep_s": slept, "wake_s": woke, "serves_again_s": serves,
                       "cancelled": state.get("cancelled", 0)})
    return {"cold_start_s": cold, "cycles": cycles}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a cached model name or directory (default: the fixture, float32)")
    ap.add_argument("--q4", action="store_true", help="the fixture at q4-g64 instead of float32")
    ap.add_argument("--cycles", type=int, default=3, help="sleep/wake cycles (medians reported)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests of the burst before the first sleep")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per burst request")
    ap.add_argument("--max-model-len", type=int, help="the engine's max_model_len (default: the model's)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    reexec_with_fast_blas()

    import mlx.core as mx

    from mlx_ray.engine.engine import MLXEngine
    from mlx_ray.engine.loader import resolve_path
    from mlx_ray.engine.memory import mlx_memory
    from mlx_ray.engine.protocol import EngineConfig

    model_dir = resolve_path(args.model) if args.model else fixture_model(args.q4)
    mx.clear_cache()
    args.baseline = mlx_memory()
    engine = MLXEngine(model_dir, EngineConfig(max_model_len=args.max_model_len))
    try:
        got = asyncio.run(run(engine, args))
        plan = {"kv_budget_bytes": engine.kv_budget_bytes, "weights_bytes": engine.info.weights_bytes}
    finally:
        asyncio.run(engine.shutdown())
    cyc = got["cycles"]
    med = {k: statistics.median(c[k] for c in cyc) for k in cyc[0]}
    cold = got["cold_start_s"]
    out = {"model": str(model_dir), "cold_start_s": cold, "median": med, "cycles": cyc, **plan,
           "released_min_frac": min(c["released_frac"] for c in cyc),
           "serves_again_over_cold_max": max(c["serves_again_s"] for c in cyc) / cold,
           "machine": {"platform": platform.platform(), "processor": platform.processor(), "blas": loaded_blas()}}
    rows = [("MLX memory held awake (weights + KV pool + cache)", f"{med['held_bytes'] / MiB:.0f} MiB"),
            ("held asleep", f"{med['asleep_bytes'] / MiB:.1f} MiB"),
            ("released by sleep (worst cycle)", f"{100 * out['released_min_frac']:.1f}%  (target >= 90%)"),
            ("sleep", f"{med['sleep_s']:.2f} s"),
            ("cold start (load, KV pool, warm-up)", f"{cold:.2f} s"),
            ("wake (reload, KV pool, warm-up)", f"{med['wake_s']:.2f} s"),
            ("wake + first greedy answer (worst / cold start)",
             f"{med['serves_again_s']:.2f} s  ({out['serves_again_over_cold_max']:.2f}x, target <= 2x)")]
    print(f"{model_dir.parent.name}/{model_dir.name}: weights {plan['weights_bytes'] / MiB:.0f} MiB, KV budget "
          f"{plan['kv_budget_bytes'] / MiB:.0f} MiB; medians of {args.cycles} sleep/wake cycles")
    print(markdown_table(["", "value"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
