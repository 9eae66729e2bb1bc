"""Benchmark: multi-LoRA decode in the engine against the same load on the base alone.

    python -m bench.multi_lora [--model PATH] [--concurrency 16] [--adapters 4] [--max-tokens 64]
                                [--repeats 3] [--server-repeats 1] [--server-backlog 128] [--quick] [--json out.json]

One engine in this process (``max_loras`` = ``--adapters``, ``max_num_seqs`` = ``--concurrency``),
random LoRA adapters of the model written beside it on the cache (``mlx_ray/bench/adapters.py``:
mlx-lm's format, rank ``--rank`` on every linear layer of every block). Each round sends
``--concurrency`` requests at once, every one ``--max-tokens`` tokens (``ignore_eos``), the prompts of
``mlx_ray.bench.sides.PROMPTS``:

* **base**: no request names an adapter;
* **lora**: request i names adapter i mod ``--adapters`` (every batch mixes them all).

Then the same rounds on **mlx_lm.server** (its own process, ``--decode-concurrency`` = ``--concurrency``),
over HTTP with the official ``openai`` client: request i names adapter i's directory in the ``adapters``
field (mlx-lm's server holds one adapter per load: a request for another drains the batch and reloads the
model with it; the loads are counted and timed), and the base alone for reference. It has no
``ignore_eos``: its EOS tokens get a ``logit_bias`` of -1e9 instead, so its requests run to ``--max-tokens``
too (its tokens/s counts the tokens it returned). No retries, a 600 s timeout: a request that fails is
counted and reported with its reason, its round's tokens/s counts the requests that completed.
It listens with a backlog of ``--server-backlog`` (128): with the 5 that ``python -m mlx_lm.server``
listens with (socketserver's default), 16 connections opened at once overflow its accept queue, those over
it wait for a SYN retransmit (1 s), and while its accept loop is held up by a model reload (which holds the
GIL) some are reset (``openai.APIConnectionError``), which is not what this measures.

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
from collections import Counter
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


def _reason(e: BaseException) -> str:
    """``e`` and what it was raised from, e.g. ``APIConnectionError: Connection error. <- ReadError <- ...``."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)


async def server_round(url: str, model: str, prompts: list[str], adapters: list[Path], n: int, max_tokens: int,
                       sampling: dict, no_eos: dict) -> dict:
    """``n`` concurrent chat requests to ``mlx_lm.server`` (request i names adapters[i % len] in its ``adapters``
    field, as mlx-lm's server takes one; ``no_eos``: the ``logit_bias`` that keeps it from stopping early).
    Every request either completes or is counted as failed with its reason (no retries, a 600 s timeout):
    completion tokens of those that completed (their ``usage``), wall seconds, ``ok``, ``failed``, ``errors``."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0) as client:
        async def one(i):
            extra = {"adapters": str(adapters[i % len(adapters)])} if adapters else {}
            try:
                r = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                    max_tokens=max_tokens, logit_bias=no_eos, extra_body=extra, **sampling)
            except Exception as e:  # noqa: BLE001 - counted and reported, the round goes on
                return 0, _reason(e)
            return r.usage.completion_tokens, None

        t0 = time.perf_counter()
        got = await asyncio.gather(*(one(i) for i in range(n)))
        seconds = time.perf_counter() - t0
    errors = Counter(reason for _, reason in got if reason is not None)
    failed = sum(errors.values())
    return {"tokens": sum(t for t, _ in got), "seconds": seconds, "ok": n - failed, "failed": failed,
            "errors": dict(errors)}


def mlx_lm_server_side(model_dir: Path, adapters: list[Path], eos_ids: list[int], args) -> dict:
    """``mlx_lm.server`` on the same model: one adapter per load, so a request naming another adapter than the
    loaded one drains the batch and reloads the model with it (counted: ``MlxLmServer.loads``). The same rounds as
    the engine's (its sampler is not seeded: a seed would take it off its batched path; the EOS tokens get a
    ``logit_bias`` of -1e9, its stand-in for ``ignore_eos``), adapters first warmed the same way; also the base
    alone (after an untimed one-token request, so that its switch back to the base model is not timed).
    Started with ``--server-backlog`` as its listen backlog (see ``MlxLmServer``)."""
    from mlx_ray.bench.sides import MlxLmServer

    server = MlxLmServer(model_dir, args.concurrency, listen_backlog=args.server_backlog)
    no_eos = {str(t): -1e9 for t in eos_ids}
    out: dict = {}

    def timed(adapters_: list[Path], max_tokens: int, sampling: dict) -> dict:
        prime = {"failed": 0, "errors": {}}
        if not adapters_:  # the base model back first (untimed): a base round times no reload
            prime = asyncio.run(server_round(server.url, server.model, PROMPTS, [], 1, 1, sampling, no_eos))
        before = len(server.loads())
        got = asyncio.run(server_round(server.url, server.model, PROMPTS, adapters_, args.concurrency, max_tokens,
                                       sampling, no_eos))
        got["prime_failed"] = prime["failed"]
        got["errors"].update({f"(untimed base request) {why}": k for why, k in prime["errors"].items()})
        if server.proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited ({server.proc.returncode}): {server.log_tail()}")
        loads = server.loads()[before:]
        got.update(tok_s=got["tokens"] / got["seconds"], loads=len(loads), load_s=sum(s for s, _ in loads))
        if got["errors"]:
            print(f"mlx_lm.server: {got['failed']} of {args.concurrency} requests failed "
                  f"(+{got['prime_failed']} untimed): {got['errors']}", file=sys.stderr)
        return got

    try:
        server.wait_ready()
        warm = {mode: {"lora": timed(adapters, 4, sampling), "base": timed([], 4, sampling)}
                for mode, sampling in MODES.items()}
        for mode, sampling in MODES.items():
            runs = {"base": [], "lora": []}
            for r in range(args.server_repeats):
                for side in (("base", "lora") if r % 2 == 0 else ("lora", "base")):
                    runs[side].append(timed(adapters if side == "lora" else [], args.max_tokens, sampling))
            out[mode] = {"base_tok_s": statistics.median(g["tok_s"] for g in runs["base"]),
                         "lora_tok_s": statistics.median(g["tok_s"] for g in runs["lora"]),
                         "failed": {side: sum(g["failed"] for g in runs[side]) for side in runs},
                         "lora_loads_per_round": statistics.median(g["loads"] for g in runs["lora"]),
                         "lora_load_s_per_round": statistics.median(g["load_s"] for g in runs["lora"]),
                         "warmup_failed": {side: g["failed"] for side, g in warm[mode].items()},
                         "warmup_errors": {side: g["errors"] for side, g in warm[mode].items() if g["errors"]},
                         "runs": runs}
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
    ap.add_argument("--server-backlog", type=int, default=128,
                    help="listen backlog mlx_lm.server is started with (5: socketserver's, as `python -m "
                         "mlx_lm.server` listens; connections over it wait a SYN retransmit or are reset)")
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
        eos_ids = sorted(engine.tokenizer.eos_token_ids)
        asyncio.run(engine.shutdown())
        engine = None
        if not args.no_server:
            try:
                server = mlx_lm_server_side(model_dir, [adapters_root(model_dir) / n for n in names], eos_ids, args)
            except Exception as e:  # noqa: BLE001 - the engine's figures stand; the failure is reported
                print(f"mlx_lm.server side failed: {type(e).__name__}: {e}", file=sys.stderr)
                results["server_error"] = f"{type(e).__name__}: {e}"
                server = {}
            for mode, r in server.items():
                results[mode].update({f"server_{k}": v for k, v in r.items()})
                if r["lora_tok_s"] > 0:
                    results[mode]["vs_server"] = results[mode]["lora_tok_s"] / r["lora_tok_s"]
    finally:
        if engine is not None:
            asyncio.run(engine.shutdown())
        if fresh:
            shutil.rmtree(adapters_root(model_dir), ignore_errors=True)
        else:
            for name in names:
                shutil.rmtree(adapters_root(model_dir) / name, ignore_errors=True)
    out = {"model": str(model_dir), "concurrency": args.concurrency, "adapters": args.adapters, "rank": args.rank,
           "max_tokens": args.max_tokens, "repeats": args.repeats, "server_repeats": args.server_repeats,
           "server_backlog": args.server_backlog, "results": results,
           "lora_loads_total": stats.get("lora_loads_total"), "lora_evictions_total": stats.get("lora_evictions_total"),
           "machine": {"platform": platform.platform(), "processor": platform.processor(), "blas": loaded_blas()}}

    def server_cell(r: dict, side: str):
        if f"server_{side}_tok_s" not in r:
            return "-"
        failed = r["server_failed"][side]
        return r[f"server_{side}_tok_s"] if not failed else f"{r[f'server_{side}_tok_s']:.1f} ({failed} failed)"

    rows = [(mode, r["base_tok_s"], r["lora_tok_s"], f"{r['ratio']:.2f}x", server_cell(r, "base"),
             server_cell(r, "lora"), f"{r['vs_server']:.1f}x" if "vs_server" in r else "-")
            for mode, r in results.items() if mode in MODES]
    print(f"{args.concurrency} concurrent requests x {args.max_tokens} tokens, {args.adapters} adapters of rank "
          f"{args.rank}, {model_dir.parent.name}/{model_dir.name} (engine: medians of {args.repeats}; "
          f"mlx_lm.server: of {args.server_repeats})")
    print(markdown_table(["sampling", "engine base tok/s", f"engine {args.adapters} adapters tok/s", "lora / base",
                          "mlx_lm.server base tok/s", f"mlx_lm.server {args.adapters} adapters tok/s",
                          "engine lora / server lora"], rows))
    for mode, r in results.items():
        if mode in MODES and "server_runs" in r:
            lora = r["server_runs"]["lora"]
            wall = statistics.median(g["seconds"] for g in lora)
            errors = Counter()
            for g in r["server_runs"]["base"] + lora:
                errors.update(g["errors"])
            print(f"mlx_lm.server {mode}: {r['server_lora_loads_per_round']:g} model loads per adapter round "
                  f"({r['server_lora_load_s_per_round']:.1f} s of its {wall:.1f} s); requests failed: base "
                  f"{r['server_failed']['base']}, lora {r['server_failed']['lora']} (warm-up: "
                  f"{r['server_warmup_failed']['base']}, {r['server_warmup_failed']['lora']})"
                  + "".join(f"; {n}x {why}" for why, n in errors.items()))
    if "server_error" in results:
        print(f"mlx_lm.server side failed: {results['server_error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
