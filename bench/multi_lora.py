"""Benchmark: multi-LoRA decode in the engine against the same load on the base alone.

    python -m bench.multi_lora [--model PATH] [--concurrency 16] [--adapters 4] [--max-tokens 64]
                                [--repeats 3] [--quick] [--json out.json]

One engine in this process (``max_loras`` = ``--adapters``, ``max_num_seqs`` = ``--concurrency``),
random LoRA adapters of the model written beside it on the cache (``mlx_ray/bench/adapters.py``:
mlx-lm's format, rank ``--rank`` on every linear layer of every block). Each round sends
``--concurrency`` requests at once, every one ``--max-tokens`` tokens (``ignore_eos``), the prompts of
``mlx_ray.bench.sides.PROMPTS``:

* **base**: no request names an adapter;
* **lora**: request i names adapter i mod ``--adapters`` (every batch mixes them all).

Then the same rounds on **mlx_lm.server** (its own process, ``--decode-concurrency`` = ``--concurrency``),
over HTTP with the official ``openai`` client: request i names adapter i's directory in the ``adapters``
field (mlx-lm's server holds one adapter per load: a request for another drains the batch and reloads),
and the base alone for reference. It has no ``ignore_eos``: its tokens/s counts the tokens it returned.

Greedy, and sampled (temperature 0.7, top_p 0.9, seeded per request). Output tokens per second over
the round's wall time; the two loads alternate per repeat, medians reported, with the ratio lora/base
(issue 32's targets: >= 0.8, and >= 3x mlx_lm.server's tokens/s with the adapters). The adapters are
loaded by a warm-up round first, so no load is timed in the engine.
Without ``--model`` the fixture is converted to float32 (``--q4``: q4-g64) in a temporary cache.
``--quick``: 4 requests over 2 adapters, 8 tokens, one repeat (a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from mlx_ray.bench.adapters import write_random_adapter
from mlx_ray.bench.sides import PROMPTS, fixture_model
from mlx_ray.bench.table import markdown_table
from mlx_ray.blas import loaded_blas, reexec_with_fast_blas

MODES = {"greedy": {"temperature": 0.0}, "top_p": {"temperature": 0.7, "top_p": 0.9}}


async def round_(engine, prompts, adapters: list[str], n: int, max_tokens: int, sampling: dict, tag: str,
                 ignore_eos: bool = True) -> dict:
    """``n`` concurrent requests (request i on adapters[i % len] when ``adapters``); tokens and wall seconds."""
    from mlx_ray.engine.protocol import FinishEvent, GenerationRequest, SamplingParams

    async def one(i):
        req = GenerationRequest(f"{tag}-{i}-{time.monotonic_ns()}", prompts[i % len(prompts)],
                                SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, seed=i, **sampling),
                                adapter=adapters[i % len(adapters)] if adapters else None)
        async for ev in engine.generate(req):
            if isinstance(ev, FinishEvent):
                if ev.error is not None:
                    raise RuntimeError(f"request {i} failed: {ev.error}")
                return ev.completion_tokens
        return 0

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(n))))
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


async def server_round(url: str, model: str, prompts: list[str], adapters: list[Path], n: int, max_tokens: int,
                       sampling: dict) -> dict:
    """``n`` concurrent chat requests to ``mlx_lm.server`` (request i names adapters[i % len] in its ``adapters``
    field, as mlx-lm's server takes one); completion tokens (its ``usage``) and wall seconds."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0) as client:
        async def one(i):
            extra = {"adapters": str(adapters[i % len(adapters)])} if adapters else {}
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                max_tokens=max_tokens, extra_body=extra, **sampling)
            return r.usage.completion_tokens

        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(n))))
        return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def mlx_lm_server_side(model_dir: Path, adapters: list[Path], args) -> dict:
    """``mlx_lm.server`` on the same model: one adapter per load, so a request naming another adapter than the
    loaded one drains the batch and reloads. The same rounds as the engine's (its sampler is not seeded: a seed
    would take it off its batched path), adapters first warmed the same way; also the base alone."""
    from mlx_ray.bench.sides import MlxLmServer

    server = MlxLmServer(model_dir, args.concurrency)
    out: dict = {}
    try:
        server.wait_ready()
        n, mt = args.concurrency, args.max_tokens
        for mode, sampling in MODES.items():
            asyncio.run(server_round(server.url, server.model, PROMPTS, adapters, n, 4, sampling))
            asyncio.run(server_round(server.url, server.model, PROMPTS, [], n, 4, sampling))
        for mode, sampling in MODES.items():
            runs = {"base": [], "lora": []}
            for r in range(args.server_repeats):
                for side in (("base", "lora") if r % 2 == 0 else ("lora", "base")):
                    got = asyncio.run(server_round(server.url, server.model, PROMPTS,
                                                   adapters if side == "lora" else [], n, mt, sampling))
                    runs[side].append(got["tokens"] / got["seconds"])
            out[mode] = {"base_tok_s": statistics.median(runs["base"]),
                         "lora_tok_s": statistics.median(runs["lora"]), "runs": runs}
    finally:
        server.stop()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a cached model name or directory (default: the fixture, float32)")
    ap.add_argument("--q4", action="store_true", help="the fixture at q4-g64 instead of float32")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-repeats", type=int, default=1, help="rounds per load on mlx_lm.server")
    ap.add_argument("--no-server", action="store_true", help="leave out the mlx_lm.server side")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4 requests, 2 adapters, 8 tokens, once")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.adapters, args.max_tokens, args.repeats = 4, 2, 8, 1
    reexec_with_fast_blas()

    from mlx_ray.adapters import adapters_root
    from mlx_ray.engine.engine import MLXEngine
    from mlx_ray.engine.loader import resolve_path
    from mlx_ray.engine.protocol import EngineConfig

    model_dir = resolve_path(args.model) if args.model else fixture_model(args.q4)
    names = [f"bench-lora-{i}" for i in range(args.adapters)]
    fresh = not adapters_root(model_dir).exists()
    for i, name in enumerate(names):
        write_random_adapter(model_dir, name, rank=args.rank, num_layers=-1, seed=100 + i)
    engine = MLXEngine(model_dir, EngineConfig(max_num_seqs=args.concurrency, max_queue=args.concurrency,
                                               max_loras=args.adapters, warmup=False))
    results: dict = {}
    try:
        asyncio.run(engine.start())
        prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
        n, mt = args.concurrency, args.max_tokens
        for mode, sampling in MODES.items():  # warm-up: every path once, every adapter loaded
            asyncio.run(round_(engine, prompts, names, n, 4, sampling, "warm"))
            asyncio.run(round_(engine, prompts, [], n, 4, sampling, "warm"))
        for mode, sampling in MODES.items():
            runs = {"base": [], "lora": []}
            for r in range(args.repeats):
                order = ("base", "lora") if r % 2 == 0 else ("lora", "base")
                for side in order:
                    got = asyncio.run(round_(engine, prompts, names if side == "lora" else [], n, mt, sampling, side))
                    runs[side].append(got["tokens"] / got["seconds"])
            base, lora = statistics.median(runs["base"]), statistics.median(runs["lora"])
            results[mode] = {"base_tok_s": base, "lora_tok_s": lora, "ratio": lora / base, "runs": runs}
        stats = engine.stats()
        asyncio.run(engine.shutdown())
        engine = None
        if not args.no_server:
            try:
                server = mlx_lm_server_side(model_dir, [adapters_root(model_dir) / n for n in names], args)
            except Exception as e:  # noqa: BLE001 - the engine's figures stand; the failure is reported
                print(f"mlx_lm.server side failed: {type(e).__name__}: {e}", file=sys.stderr)
                results["server_error"] = f"{type(e).__name__}: {e}"
                server = {}
            for mode, r in server.items():
                results[mode].update(server_base_tok_s=r["base_tok_s"], server_lora_tok_s=r["lora_tok_s"],
                                     vs_server=results[mode]["lora_tok_s"] / r["lora_tok_s"], server_runs=r["runs"])
    finally:
        if engine is not None:
            asyncio.run(engine.shutdown())
        if fresh:
            shutil.rmtree(adapters_root(model_dir), ignore_errors=True)
        else:
            for name in names:
                shutil.rmtree(adapters_root(model_dir) / name, ignore_errors=True)
    out = {"model": str(model_dir), "concurrency": args.concurrency, "adapters": args.adapters, "rank": args.rank,
           "max_tokens": args.max_tokens, "repeats": args.repeats, "results": results,
           "lora_loads_total": stats.get("lora_loads_total"), "lora_evictions_total": stats.get("lora_evictions_total"),
           "machine": {"platform": platform.platform(), "processor": platform.processor(), "blas": loaded_blas()}}
    rows = [(mode, r["base_tok_s"], r["lora_tok_s"], f"{r['ratio']:.2f}x", r.get("server_base_tok_s", "-"),
             r.get("server_lora_tok_s", "-"), f"{r['vs_server']:.1f}x" if "vs_server" in r else "-")
            for mode, r in results.items() if mode in MODES]
    print(f"{args.concurrency} concurrent requests x {args.max_tokens} tokens, {args.adapters} adapters of rank "
          f"{args.rank}, {model_dir.parent.name}/{model_dir.name} (engine: medians of {args.repeats}; "
          f"mlx_lm.server: of {args.server_repeats})")
    print(markdown_table(["sampling", "engine base tok/s", f"engine {args.adapters} adapters tok/s", "lora / base",
                          "mlx_lm.server base tok/s", f"mlx_lm.server {args.adapters} adapters tok/s",
                          "engine lora / server lora"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
