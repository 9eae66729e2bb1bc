"""Microbenchmark: the batched sampler (C++ CPU primitive) against the per-row mlx-lm path the engine used.

    python bench/kernel_sampler.py [--b 1,16,32] [--v 49152,151936] [--reps 10] [--twin] [--json PATH]

For each batch size B, vocabulary V and filter set (temperature 0.7 with top_p
0.9; with top_k 40 + min_p 0.05; temperature only), median ms of one call:

* ``kernel``: ``kernels.sampler.sample(..., impl="cpu")`` over the whole batch
  (the uniform draws prepared beforehand, as the engine prepares them);
* ``per-row``: what the engine did before: one ``KeyedSampler`` per row (a key
  split, mlx-lm's ``apply_top_p`` / ``apply_min_p`` / ``apply_top_k``, then
  ``mx.random.categorical``), the rows concatenated;
* ``twin`` (with ``--twin``): the pure-MLX reference (sorts every row).

Logits are synthetic and LM-like: normal(0, 2) with 1% of the tokens raised by
up to 8, then log-softmaxed (the engine passes log-probabilities). The
mean number of tokens the kernel keeps is printed per filter. The machine may
be shared: medians, and the load average before and after is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kernel_micro import machine, timeit

from mlx_ray.blas import reexec_with_fast_blas

OUT = Path(__file__).parent / "out" / "kernel_sampler.json"
FILTERS = {  # name: (temperature, top_k, top_p, min_p)
    "top_p 0.9": (0.7, 0, 0.9, 0.0),
    "top_k 40 + min_p 0.05": (0.7, 40, 1.0, 0.05),
    "temperature only": (0.7, 0, 1.0, 0.0),
}


def old_keyed_sampler(mx, temperature, top_k, top_p, min_p, seed):
    """The engine's per-request sampler before the batched one (mlx_ray/engine/sampling.py, as of issue 11)."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    key = [mx.random.key(seed)]
    filters = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0.0:
        filters.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))

    def call(logprobs):
        key[0], sub = mx.random.split(key[0])
        for f in filters:
            logprobs = f(logprobs)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=sub)

    return call


def logprobs(mx, np, B: int, V: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, V)).astype(np.float32) * 2.0
    hot = rng.random((B, V)) < 0.01
    x[hot] += rng.random(int(hot.sum())).astype(np.float32) * 8.0
    lp = mx.array(x)
    return lp - mx.logsumexp(lp, axis=-1, keepdims=True)


def bench(B: int, V: int, name: str, args, mx, np, sampler) -> dict:
    t, k, tp, mp = FILTERS[name]
    lp = logprobs(mx, np, B, V, seed=B * 7 + V)
    rows = sampler.as_rows(lp, mx.full((B,), t), mx.full((B,), k, dtype=mx.int32), mx.full((B,), tp),
                           mx.full((B,), mp), mx.array(np.random.default_rng(1).random(B).astype(np.float32)))
    mx.eval(rows)
    kept = sampler.twin_parts(*rows)["kept"].sum(axis=-1).astype(mx.float32).mean().item()
    row = {"B": B, "V": V, "filters": name, "kept_mean": kept}

    def kernel():
        mx.eval(sampler.sample(*rows, impl="cpu"))

    olds = [old_keyed_sampler(mx, t, k, tp, mp, seed=i) for i in range(B)]

    def per_row():
        mx.eval(mx.concatenate([s(lp[e:e + 1]) for e, s in enumerate(olds)], axis=0))

    todo = [("kernel", kernel, args.reps), ("per_row", per_row, max(3, args.reps // 3))]
    if args.twin:
        todo.append(("twin", lambda: mx.eval(sampler.twin(*rows)), max(3, args.reps // 3)))
    for label, fn, reps in todo:
        med, best, cpu = timeit(fn, reps)
        row[label] = {"ms": med * 1e3, "min_ms": best * 1e3, "cpu_ms": cpu * 1e3}
    row["speedup"] = row["per_row"]["ms"] / row["kernel"]["ms"]
    return row


def main(argv=None) -> int:
    reexec_with_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--b", default="1,16,32", help="comma list of batch sizes")
    p.add_argument("--v", default="49152,151936", help="comma list of vocabulary sizes")
    p.add_argument("--filters", default=",".join(FILTERS), help="comma list of: " + ", ".join(FILTERS))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--twin", action="store_true", help="also time the pure-MLX twin")
    p.add_argument("--json", nargs="?", const=str(OUT), help=f"write the rows as JSON (default path {OUT})")
    args = p.parse_args(argv)

    import mlx.core as mx
    import numpy as np

    from mlx_ray.kernels import sampler

    mx.set_default_device(mx.cpu)
    st = sampler.status()
    if not st["active"]:
        print(f"sampler_cpu inactive: {st['reason']}", file=sys.stderr)
        return 1
    load0 = os.getloadavg()
    rows = []
    for V in (int(v) for v in args.v.split(",")):
        for B in (int(b) for b in args.b.split(",")):
            for name in args.filters.split(","):
                rows.append(bench(B, V, name, args, mx, np, sampler))
                r = rows[-1]
                print(f"  B={B:<3d} V={V:<7d} {name:<22s} kernel {r['kernel']['ms']:8.2f} ms   "
                      f"per-row {r['per_row']['ms']:9.2f} ms   x{r['speedup']:.0f}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    print(f"\nsampler micro ({st['reason']}; {machine()['cpu']}, {os.cpu_count()} CPUs; "
          f"load {load0[0]:.1f} -> {load1[0]:.1f}); median ms of one call over the batch\n")
    head = "| V | B | filters | kept (mean) | kernel ms | per-row mlx-lm ms | speed-up |" + (" twin ms |" if args.twin else "")
    print(head)
    print("|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|")
    for r in rows:
        line = (f"| {r['V']} | {r['B']} | {r['filters']} | {r['kept_mean']:.0f} | {r['kernel']['ms']:.2f} | "
                f"{r['per_row']['ms']:.1f} | {r['speedup']:.0f}x |")
        if args.twin:
            line += f" {r['twin']['ms']:.1f} |"
        print(line)
    worst = min(r["speedup"] for r in rows)
    print(f"\nslowest speed-up: {worst:.1f}x (target >= 10x)")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), "status": st, "load": [load0, load1], "rows": rows}, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
