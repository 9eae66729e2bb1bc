"""Constrained-decoding throughput at 16 concurrent requests against unconstrained, side by side (issue 14).

One engine on the fixture (float32), 16 requests at once, four rounds alternating
the two modes (so load on a shared machine hits both alike): unconstrained
sampled chat answers (EOS ignored), and the same prompts under a JSON schema (a list of
strings long enough to keep every row decoding for ``--max-tokens``). Prints
generated tokens per second of each mode (median of its rounds) and the ratio.

    python bench/constrained.py [--model DIR] [--concurrency 16] [--max-tokens 64] [--rounds 4]

Wall-clock figures: on a shared machine say so when quoting them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from mlx_ray.blas import loaded_blas, reexec_with_fast_blas
from mlx_ray.engine.engine import MLXEngine
from mlx_ray.engine.protocol import EngineConfig, FinishEvent, GenerationRequest, Grammar, SamplingParams

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 40},
                                                     "minItems": 60}}, "required": ["items"]}
PROMPTS = ["List things you find in a kitchen.", "List animals of the forest.", "List famous rivers.",
           "List kinds of weather.", "List musical instruments.", "List colors of the rainbow and more.",
           "List fruits and vegetables.", "List sports played with a ball."]


async def one(engine, rid, prompt, grammar, max_tokens, seed) -> int:
    ids = engine.encode_chat([{"role": "user", "content": prompt}])
    # unconstrained rows ignore EOS so both modes keep all rows decoding for max_tokens (same batch size)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed, grammar=grammar, ignore_eos=grammar is None)
    async for ev in engine.generate(GenerationRequest(rid, ids, sp)):
        if isinstance(ev, FinishEvent):
            return ev.completion_tokens
    return 0


async def round_(engine, n, grammar, max_tokens, tag) -> float:
    t0 = time.perf_counter()
    toks = await asyncio.gather(*(one(engine, f"{tag}-{i}", PROMPTS[i % len(PROMPTS)], grammar, max_tokens, i)
                                  for i in range(n)))
    return sum(toks) / (time.perf_counter() - t0)


async def main_async(args) -> None:
    engine = MLXEngine(args.model, EngineConfig(max_num_seqs=args.concurrency, max_queue=args.concurrency,
                                                prefix_cache_bytes=0))
    await engine.start()
    await round_(engine, args.concurrency, None, 8, "warm")
    free, constrained = [], []
    for r in range(args.rounds):
        for mode in ((None, free), (Grammar("json_schema", SCHEMA), constrained))[:: 1 if r % 2 == 0 else -1]:
            mode[1].append(await round_(engine, args.concurrency, mode[0], args.max_tokens, f"r{r}{len(mode[1])}"))
    await engine.shutdown()
    f, c = statistics.median(free), statistics.median(constrained)
    print("mode | tok/s (median of rounds) | rounds")
    print("--- | --- | ---")
    print(f"unconstrained | {f:.1f} | {', '.join(f'{x:.1f}' for x in free)}")
    print(f"json_schema | {c:.1f} | {', '.join(f'{x:.1f}' for x in constrained)}")
    print(f"ratio constrained / unconstrained: {c / f:.2f} at {args.concurrency} concurrent")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="an MLX model directory; default: the fixture converted to f32")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    reexec_with_fast_blas()  # MLX's CPU matmul with OpenBLAS, as the engine serves (mlx_ray/blas.py)
    if args.model is None:
        from engine_vs_mlxlm import fixture_model  # the f32 fixture, converted once into the bench cache

        args.model = str(fixture_model(False))
    print(f"BLAS {loaded_blas()}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}")
    asyncio.run(main_async(args))
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
