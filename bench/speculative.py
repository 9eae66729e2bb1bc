"""Benchmark: speculative decoding in the paged engine (issue 33) against the same engine without it.

    python -m bench.speculative [--model PATH] [--concurrency 1,4,16] [--max-tokens 160] [--repeats 2]
                                [--sides off,ngram,mlx_lm] [--quick] [--json out.json]

Every side is an engine in this process (the same load generator, ``round_``: n requests at once, engine-level
as ``bench/multi_lora.py``), all loaded at start; each (workload, sampling, concurrency) runs on every side
back to back, the order rotated every repeat, and each side's tokens per second is its median over the repeats.

* **workloads**: *copy-heavy*: rewrite a given JSON object or code block with one change (``COPY_PROMPTS``,
  as completions: see there); *free text*: the existing chat prompts (``mlx_ray.bench.sides.PROMPTS``).
* **sampling**: greedy, and sampled at temperature 0.7, top_p 0.9 (seeded per request).
* **sides**: ``off`` (no speculation), ``ngram`` (``speculative: {method: ngram}``, the controller on),
  ``draft`` (``method: draft`` with ``--draft``, when the engine has it), and ``mlx_lm`` (``mlx_lm.generate``'s
  speculative loop with the draft model, one request at a time: its only mode; concurrency 1 only), its target
  and draft on the same CPU matmul kernels as the engines' (``patch_cpu_kernels``).

Tokens per second = completion tokens of the round over its wall time (requests end at EOS or
``--max-tokens``). The draft model is the fixture quantized to 4 bits (``mlx-ray convert``) unless
``--draft`` names another. Without ``--model`` the float32 fixture is the target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.multi_lora import round_ as lora_round
from mlx_ray.bench.sides import PROMPTS, fixture_model
from mlx_ray.bench.table import markdown_table
from mlx_ray.blas import loaded_blas, reexec_with_fast_blas

MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.7, "top_p": 0.9}}

_DOCS = [
    ('{"id": 4821, "name": "Ada Lovelace", "born": 1815, "field": "mathematics", "city": "London", '
     '"known_for": ["Analytical Engine notes", "first published algorithm"], "active": false}', "change the city to Paris"),
    ('{"order": 77, "customer": "Grace Hopper", "items": [{"sku": "A-100", "qty": 2, "price": 9.5}, '
     '{"sku": "B-220", "qty": 1, "price": 24.0}], "shipping": "express", "paid": true}', "set qty of B-220 to 3"),
    ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n\n\n"
     "def variance(values):\n    m = mean(values)\n    return sum((v - m) ** 2 for v in values) / len(values)\n",
     "rename values to xs"),
    ("class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def increment(self):\n"
     "        self.count += 1\n        return self.count\n\n    def reset(self):\n        self.count = 0\n",
     "rename count to total"),
]
# Completions, not chat: the 135M fixture asked in a chat to rewrite a document describes it instead (tried); as a
# completion it writes the document out again, which is the workload (an editor, a RAG answer, a tool call
# copying its input). A larger model does this in a chat turn.
COPY_PROMPTS = [f"Original:\n{doc}\n\nThe same, rewritten with one change ({change}):\n" for doc, change in _DOCS]
WORKLOADS = {"copy-heavy": COPY_PROMPTS, "free text": PROMPTS}


def encode(engine, workload: str) -> list[list[int]]:
    """The workload's prompts as token ids: copy-heavy as completions, free text through the chat template."""
    if workload == "copy-heavy":
        return [engine.encode(p) for p in COPY_PROMPTS]
    return [engine.encode_chat([{"role": "user", "content": p}]) for p in WORKLOADS[workload]]


async def round_(engine, prompts, n: int, max_tokens: int, sampling: dict, tag: str) -> dict:
    """``n`` concurrent requests over ``prompts`` (ending at EOS or ``max_tokens``): completion tokens, wall seconds."""
    return await lora_round(engine, prompts, [], n, max_tokens, sampling, tag, ignore_eos=False)


def mlx_lm_round(model, draft, tokenizer, prompts, max_tokens: int, sampling: dict) -> dict:
    """``mlx_lm.generate``'s speculative loop (``stream_generate`` with ``draft_model``), one request: its only mode."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    temp = sampling.get("temperature", 0.0)
    sampler = make_sampler(temp=temp, top_p=sampling.get("top_p", 0.0))
    t0, n = time.perf_counter(), 0
    for r in stream_generate(model, tokenizer, prompt=prompts[0], max_tokens=max_tokens, draft_model=draft,
                             sampler=sampler, num_draft_tokens=4):
        n += 1
    return {"tokens": n, "seconds": time.perf_counter() - t0}


def draft_fixture() -> Path:
    """The fixture quantized to 4 bits by ``mlx-ray convert`` (the test draft), in the bench cache."""
    return fixture_model(True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="the target: a cached model name or directory (default: the fixture, float32)")
    ap.add_argument("--draft", help="the draft model (default: the fixture at q4-g64)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sides", default="off,ngram,mlx_lm")
    ap.add_argument("--workloads", default="copy-heavy,free text")
    ap.add_argument("--modes", default="greedy,sampled")
    ap.add_argument("--quick", action="store_true", help="a smoke run: concurrency 1 and 4, 24 tokens, once")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_tokens, args.repeats = "1,4", 24, 1
    reexec_with_fast_blas()

    from mlx_ray.engine.engine import MLXEngine
    from mlx_ray.engine.loader import resolve_path
    from mlx_ray.engine.protocol import EngineConfig

    levels = [int(c) for c in args.concurrency.split(",")]
    sides = args.sides.split(",")
    model_dir = resolve_path(args.model) if args.model else fixture_model(False)
    draft_dir = (resolve_path(args.draft) if args.draft else draft_fixture()) if {"draft", "mlx_lm"} & set(sides) else None
    spec = {"ngram": {"method": "ngram", "num_speculative_tokens": 4},
            "draft": {"method": "draft", "draft_model": str(draft_dir), "num_speculative_tokens": 4}}
    engines = {}
    for side in sides:
        if side == "mlx_lm":
            continue
        cfg = EngineConfig(max_num_seqs=max(levels), max_queue=max(levels), max_model_len=2048,
                           speculative=spec.get(side))
        engines[side] = MLXEngine(model_dir, cfg)
        asyncio.run(engines[side].start())  # its warm-up runs through the real loop
    ref = next(iter(engines.values()))
    lm = None
    if "mlx_lm" in sides:
        from mlx_lm import load

        from mlx_ray.engine.loader import patch_cpu_kernels

        target, tok = load(str(model_dir))
        draft, _ = load(str(draft_dir))
        # the same matmul kernels as the engines' models (on this CPU MLX's own quantized matmul is ~20x
        # slower): the comparison is of the speculative loops, not of the kernels under them
        for m in (target, draft):
            patch_cpu_kernels(m)
        lm = (target, draft, tok)
    results: dict = {}
    try:
        for wl in args.workloads.split(","):
            prompts = encode(ref, wl)
            for mode in args.modes.split(","):
                sampling = MODES[mode]
                for n in levels:
                    runs = {s: [] for s in sides if s != "mlx_lm" or n == 1}
                    for e in engines.values():  # a short warm round per level (first calls at this batch size)
                        asyncio.run(round_(e, prompts, n, 8, sampling, "warm"))
                    if "mlx_lm" in runs:  # warmed the same way
                        mlx_lm_round(*lm[:2], lm[2], prompts, 8, sampling)
                    for r in range(args.repeats):
                        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
                        for side in order:
                            if side == "mlx_lm":
                                got = mlx_lm_round(*lm[:2], lm[2], prompts, args.max_tokens, sampling)
                            else:
                                got = asyncio.run(round_(engines[side], prompts, n, args.max_tokens, sampling, side))
                            runs[side].append(got["tokens"] / got["seconds"])
                    med = {s: statistics.median(v) for s, v in runs.items()}
                    # also each repeat's side against the off run beside it (same repeat, adjacent in time): drift
                    # between repeats (this 2-vCPU machine moves 10-15% at 16 concurrent) cancels out of the pairs
                    paired = {s: statistics.median(a / b for a, b in zip(runs[s], runs["off"]))
                              for s in runs if "off" in runs}
                    results[f"{wl}|{mode}|{n}"] = {"tok_s": med, "runs": runs, "paired": paired,
                                                   "ratio": {s: med[s] / med["off"] for s in med if "off" in med}}
                    print(wl, mode, n, {s: round(v, 1) for s, v in med.items()}, file=sys.stderr, flush=True)
        stats = {s: {k: v for k, v in e.stats().items() if k.startswith("spec_")} for s, e in engines.items()}
    finally:
        for e in engines.values():
            asyncio.run(e.shutdown())
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1]
    out = {"model": str(model_dir), "draft": str(draft_dir) if draft_dir else None, "max_tokens": args.max_tokens,
           "repeats": args.repeats, "results": results, "spec_stats": stats,
           "machine": {"cpu": cpu.strip(), "platform": platform.platform(), "blas": loaded_blas()}}
    others = [s for s in sides if s != "off"]
    rows = []
    for key, r in results.items():
        wl, mode, n = key.split("|")
        rows.append((wl, mode, n, f"{r['tok_s'].get('off', 0):.1f}",
                     *(f"{r['tok_s'][s]:.1f} ({r['ratio'].get(s, 0):.2f}x; paired {r['paired'][s]:.2f}x)"
                       if s in r.get("paired", {}) else f"{r['tok_s'][s]:.1f}" if s in r["tok_s"] else "-"
                       for s in others)))
    print(f"{model_dir.parent.name}/{model_dir.name}, up to {args.max_tokens} tokens a request, medians of "
          f"{args.repeats} (paired: the median of each repeat's side / off ratio); {out['machine']['cpu']}")
    print(markdown_table(["workload", "sampling", "concurrent", "off tok/s", *(f"{s} tok/s" for s in others)], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
