"""Microbenchmark: paged attention on the CPU, the C++ kernel against the twin and today's rectangular cache.

    python bench/kernel_paged.py [--quick] [--reps 7] [--json PATH]

Decode (L = 1): SmolLM2-135M heads (Hq=9, Hkv=3, D=64; 30 layers per step) at
B = 1, 16, 32 and context 256 / 1000 / 2000, and a Qwen2.5-32B-like head shape
(Hq=40, Hkv=8, D=128) at B = 1, 4; float32 and 8-bit (group 64) caches, block
size 32 (the engine's), block tables shuffled. Columns, median ms per call:

* ``kernel``: ``ext.paged_attention`` (K/V read in place through the block table);
* ``twin``: gather every row's blocks (dequantizing) + mask + ``mx.fast.scaled_dot_product_attention``;
* ``rect``: today's path, ``mx.fast.scaled_dot_product_attention`` (8-bit: mlx-lm's
  ``quantized_scaled_dot_product_attention``) on a dense ``[B, Hkv, T, D]`` cache
  padded to the longest row rounded up to 256 (no gather: the cost of attending
  the padding);

plus the kernel's effective GB/s of KV read (the bytes of the K and V rows it
must read, over its time) and, for SmolLM2, the cost of a 30-layer step.

Prefill (B = 1, L = 128 / 256 / 512 against a context of 500 / 1000 / 2000,
float32, both head shapes): kernel vs twin; the last table gives the largest L
at which the kernel still wins, which sets ``DEFAULT_MAX_L`` in
mlx_ray/kernels/paged_attention.py.

The machine may be shared: the load average before and after is printed, and
figures taken while something else runs are "loaded" (treat differences under
~15% as noise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from kernel_micro import timeit  # noqa: E402

from mlx_ray.blas import reexec_with_fast_blas  # noqa: E402

OUT = Path(__file__).parent / "out" / "kernel_paged.json"
BLOCK = 32
SMOL = ("smollm2-135m", 9, 3, 64, 30)
QWEN = ("qwen2.5-32b", 40, 8, 128, 64)


def make(mx, np, B, Hq, Hkv, D, L, ctx, bits, seed=0):
    rng = np.random.default_rng(seed)
    mb = (ctx + BLOCK - 1) // BLOCK
    nblocks = B * mb + 1
    S = nblocks * BLOCK
    k = mx.array(rng.standard_normal((S, Hkv, D), dtype=np.float32))
    v = mx.array(rng.standard_normal((S, Hkv, D), dtype=np.float32))
    bt = mx.array(rng.permutation(nblocks)[: B * mb].reshape(B, mb).astype(np.int32))
    cl = mx.array(np.full(B, ctx, np.int32))
    q = mx.array(rng.standard_normal((B, Hq, L, D), dtype=np.float32))
    if bits:
        def qz(x):
            w, s, b = mx.quantize(x.reshape(-1, D), group_size=64, bits=bits)
            return w.reshape(S, Hkv, -1), s.reshape(S, Hkv, -1), b.reshape(S, Hkv, -1)
        k, v = qz(k), qz(v)
    mx.eval(q, k, v, bt, cl)
    return q, k, v, bt, cl


def rect_cache(mx, B, Hkv, D, ctx, bits):
    T = -(-ctx // 256) * 256
    k = mx.random.normal((B, Hkv, T, D), key=mx.random.key(1))
    v = mx.random.normal((B, Hkv, T, D), key=mx.random.key(2))
    if bits:
        k = mx.quantize(k, group_size=64, bits=bits)
        v = mx.quantize(v, group_size=64, bits=bits)
    mask = mx.arange(T)[None, None, None, :] < ctx  # [1, 1, 1, T]: the padding is masked, still read
    mx.eval(k, v, mask)
    return k, v, mask


def kv_bytes(B, Hkv, D, ctx, bits):
    row = D * 4 if not bits else D * bits // 8 + 2 * (D // 64) * 4
    return 2 * B * ctx * Hkv * row


def bench_decode(mx, np, pa, ext, shape, B, ctx, bits, reps):
    name, Hq, Hkv, D, layers = shape
    q, k, v, bt, cl = make(mx, np, B, Hq, Hkv, D, 1, ctx, bits)
    scale = D ** -0.5
    kw = dict(scale=scale, block_size=BLOCK, bits=bits, group_size=64)
    row = {"model": name, "B": B, "ctx": ctx, "cache": f"{bits}-bit" if bits else "f32"}
    fns = {
        "kernel": lambda: mx.eval(pa.paged_attention(q, k, v, bt, cl, impl="cpu", **kw)),
        "twin": lambda: mx.eval(pa.twin(q, k, v, bt, cl, **kw)),
    }
    rk, rv, mask = rect_cache(mx, B, Hkv, D, ctx, bits)
    if bits:
        from mlx_lm.models.base import quantized_scaled_dot_product_attention as qsdpa

        fns["rect"] = lambda: mx.eval(qsdpa(q, rk, rv, scale=scale, mask=mask, group_size=64, bits=bits))
    else:
        fns["rect"] = lambda: mx.eval(mx.fast.scaled_dot_product_attention(q, rk, rv, scale=scale, mask=mask))
    for key, fn in fns.items():
        med, best, _ = timeit(fn, reps)
        row[key] = med * 1e3
    row["kernel_gb_s"] = kv_bytes(B, Hkv, D, ctx, bits) / (row["kernel"] / 1e3) / 1e9
    row["step_ms"] = {k: row[k] * layers for k in ("kernel", "twin", "rect")}
    row["layers"] = layers
    return row


def bench_prefill(mx, np, pa, shape, L, ctx, reps):
    name, Hq, Hkv, D, _ = shape
    q, k, v, bt, cl = make(mx, np, 1, Hq, Hkv, D, L, ctx, None)
    kw = dict(scale=D ** -0.5, block_size=BLOCK)
    row = {"model": name, "L": L, "ctx": ctx}
    for key, fn in (("kernel", lambda: mx.eval(pa.paged_attention(q, k, v, bt, cl, impl="cpu", **kw))),
                    ("twin", lambda: mx.eval(pa.twin(q, k, v, bt, cl, **kw)))):
        med, _, _ = timeit(fn, reps)
        row[key] = med * 1e3
    row["speedup"] = row["twin"] / row["kernel"]
    return row


def main(argv=None) -> int:
    reexec_with_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    p.add_argument("--json", type=Path, default=None, help=f"write the rows here (default {OUT} with --json '')")
    args = p.parse_args(argv)

    import mlx.core as mx
    import numpy as np

    from mlx_ray.kernels import paged_attention as pa

    mx.set_default_device(mx.cpu)
    active, reason, ext = pa.cpu_state()
    if not active:
        print(f"paged_attention_cpu inactive: {reason}", file=sys.stderr)
        return 1
    load0 = os.getloadavg()
    print(f"paged_attention_cpu: {reason}")
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {os.cpu_count()} CPUs "
          f"(figures are 'loaded' when this is near or above the CPU count)")

    decode = []
    Bs, ctxs = ((1, 32), (256, 2000)) if args.quick else ((1, 16, 32), (256, 1000, 2000))
    for bits in (None, 8):
        for B in Bs:
            for ctx in ctxs:
                decode.append(bench_decode(mx, np, pa, ext, SMOL, B, ctx, bits, args.reps))
        for B in ((1,) if args.quick else (1, 4)):
            for ctx in ((2000,) if args.quick else (1000, 2000)):
                decode.append(bench_decode(mx, np, pa, ext, QWEN, B, ctx, bits, args.reps))
    print("\ndecode (L=1), median ms per call; step = x layers (SmolLM2: 30)")
    head = f"{'model':14} {'cache':6} {'B':>3} {'ctx':>5} {'kernel':>8} {'twin':>8} {'rect':>8} " \
           f"{'vs twin':>8} {'vs rect':>8} {'KV GB/s':>8} {'step kern':>10} {'step rect':>10}"
    print(head)
    for r in decode:
        print(f"{r['model']:14} {r['cache']:6} {r['B']:>3} {r['ctx']:>5} {r['kernel']:8.3f} {r['twin']:8.3f} "
              f"{r['rect']:8.3f} {r['twin'] / r['kernel']:7.2f}x {r['rect'] / r['kernel']:7.2f}x "
              f"{r['kernel_gb_s']:8.1f} {r['step_ms']['kernel']:10.2f} {r['step_ms']['rect']:10.2f}")

    prefill = []
    for shape in (SMOL, QWEN):
        for ctx in ((2000,) if args.quick else (500, 1000, 2000)):
            for L in ((128, 512) if args.quick else (128, 256, 512)):
                if L <= ctx:
                    prefill.append(bench_prefill(mx, np, pa, shape, L, ctx, max(3, args.reps // 2)))
    print("\nprefill chunk (B=1, float32), median ms per call")
    print(f"{'model':14} {'L':>4} {'ctx':>5} {'kernel':>9} {'twin':>9} {'kernel vs twin':>15}")
    for r in prefill:
        print(f"{r['model']:14} {r['L']:>4} {r['ctx']:>5} {r['kernel']:9.3f} {r['twin']:9.3f} {r['speedup']:14.2f}x")
    wins = {}
    for r in prefill:
        wins.setdefault(r["model"], 0)
        if r["speedup"] > 1.0:
            wins[r["model"]] = max(wins[r["model"]], r["L"])
    print("largest L at which the kernel still wins: " + ", ".join(f"{m} {v or 'never'}" for m, v in wins.items()))
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if args.json is not None:
        path = args.json if str(args.json) else OUT
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"status": reason, "load_before": load0, "load_after": load1,
                                    "decode": decode, "prefill": prefill, "prefill_wins_up_to_L": wins}, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
