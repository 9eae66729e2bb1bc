"""Paged attention on Metal: K/V read in place from the block pool through the block table.

The contract (queries ``[B, Hq, L, D]``, the pool's K/V float ``[S, Hkv, D]`` or
8/4-bit affine tuples, ``block_tables [B, MB]``, ``context_lens [B]`` counting
the L new tokens, causal per query, GQA) and the pure-MLX twin (gather + mask
+ sdpa) are ``mlx_ray/kernels/paged_attention.py``'s; this module is the Metal path:

* :func:`metal` (the name and signature the dispatch in ``paged_attention.py``
  calls) launches ``paged_attention.metal``: one threadgroup per (row, KV
  head, query pass, context partition), each K/V vector read once per pass
  for all of the GQA group's queries, online softmax in float32 (see the
  .metal file's header for the layout of the work).
* Long contexts with few threadgroups are split into partitions of
  :data:`PART_TOKENS` tokens (vLLM's v2 idea): each writes its unnormalized
  float32 output and (max, sum); MLX ops merge them.
* :data:`SPEC` registers it with the kernel framework: the gate measures it
  against the twin on the device matrix below and enables it only if every
  case matches and is faster; ``mlx-ray kernels check`` runs the emulate
  cases under ``mlx_ray/kernels/metal_emu``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional

import mlx.core as mx

from . import paged_attention as _pa
from . import production
from ._common import Case, KernelSpec, MetalKernel

NAME = _pa.NAME  # "paged_attention": the gate's and the dispatch's name for this kernel
HEAD_DIMS = (64, 128)
BITS = (None, 4, 8)
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
QMAX = 8  # query vectors a pass at most (their q and output accumulators live in registers)
NSG = 4  # SIMD groups a threadgroup
PART_TOKENS = 256  # context tokens a partition, when partitioning
MIN_GROUPS = 64  # fewer (row, KV head, pass) threadgroups than this: split long contexts into partitions
LOG2E = 1.4426950408889634

KERNEL = MetalKernel(
    name="mlx_ray_paged_attention",
    input_names=["queries", "k_data", "k_scales", "k_biases", "v_data", "v_scales", "v_biases",
                 "block_tables", "context_lens", "params", "qscale"],
    output_names=["out", "part_o", "part_ms"],
    source_file=Path(__file__).with_name("paged_attention.metal"),
)


@functools.lru_cache(maxsize=16)
def _dummy(dtype: mx.Dtype) -> mx.array:
    return mx.zeros((1,), dtype)


def supports(queries: mx.array, k_cache, v_cache, block_tables: mx.array, context_lens: mx.array, *,
             block_size: int, bits: Optional[int] = None, group_size: int = 64) -> str | None:
    """Why the kernel cannot take this call, or None when it can (the dispatch falls back to the twin)."""
    if queries.ndim != 4 or queries.dtype not in DTYPES:
        return f"queries must be [B, Hq, L, D] float32/float16/bfloat16, got {queries.shape} {queries.dtype}"
    D = queries.shape[3]
    if D not in HEAD_DIMS:
        return f"head dim {D} not in {HEAD_DIMS}"
    if bits not in BITS:
        return f"bits {bits} not in {BITS}"
    if block_size < 1:
        return f"block size {block_size}"
    if bits is None:
        if not isinstance(k_cache, mx.array) or k_cache.ndim != 3 or k_cache.shape[2] != D:
            return "a float cache must be [S, Hkv, D]"
        if k_cache.dtype != queries.dtype or v_cache.dtype != queries.dtype or v_cache.shape != k_cache.shape:
            return "K and V must be [S, Hkv, D] in the queries' dtype"
        hkv = k_cache.shape[1]
    else:
        if group_size < 8 or D % group_size:
            return f"group size {group_size} for head dim {D}"
        for c in (k_cache, v_cache):
            if not isinstance(c, (tuple, list)) or len(c) != 3:
                return "a quantized cache is a (packed, scales, biases) tuple"
            p, s, bb = c
            if p.dtype != mx.uint32 or p.ndim != 3 or p.shape[2] != D * bits // 32:
                return f"packed must be [S, Hkv, {D * bits // 32}] uint32"
            if s.shape != (p.shape[0], p.shape[1], D // group_size) or bb.shape != s.shape:
                return "scales / biases must be [S, Hkv, D / group_size]"
        hkv = k_cache[0].shape[1]
    if queries.shape[1] % hkv:
        return f"Hq {queries.shape[1]} is not a multiple of Hkv {hkv}"
    if block_tables.ndim != 2 or block_tables.shape[0] != queries.shape[0] or context_lens.shape != (queries.shape[0],):
        return "block_tables must be [B, MB] and context_lens [B]"
    return None


def layout(B: int, hq: int, hkv: int, L: int, MB: int, block_size: int) -> dict:
    """How a call is split: query passes, context partitions, blocks a partition, query vectors a pass."""
    G = hq // hkv
    qmax = min(G * L, QMAX)
    n_pass = -(-G * L // qmax)
    n_part, part_blocks = 1, MB
    if B * hkv * n_pass < MIN_GROUPS:
        part_blocks = max(1, PART_TOKENS // block_size)
        n_part = max(1, -(-MB // part_blocks))
        if n_part == 1:
            part_blocks = MB
    return {"G": G, "qmax": qmax, "passes": n_pass, "parts": n_part, "part_blocks": part_blocks}


def metal(queries: mx.array, k_cache, v_cache, block_tables: mx.array, context_lens: mx.array, *, scale: float,
          block_size: int, bits: Optional[int] = None, group_size: int = 64) -> mx.array:
    """The Metal kernel under ``paged_attention.py``'s contract: out ``[B, Hq, L, D]`` in the queries' dtype."""
    return _launch(queries, k_cache, v_cache, block_tables, context_lens, scale=scale, block_size=block_size,
                   bits=bits, group_size=group_size)


def _launch(queries, k_cache, v_cache, block_tables, context_lens, *, scale, block_size, bits=None, group_size=64,
            parts: Optional[int] = None) -> mx.array:
    """:func:`metal`, with ``parts`` (context partitions) forcible for tests."""
    why = supports(queries, k_cache, v_cache, block_tables, context_lens, block_size=block_size, bits=bits,
                   group_size=group_size)
    if why:
        raise ValueError(f"paged_attention (Metal): {why}")
    B, hq, L, D = queries.shape
    dtype = queries.dtype
    if bits is None:
        kd, ks, kb = k_cache, _dummy(dtype), _dummy(dtype)
        vd, vs, vb = v_cache, _dummy(dtype), _dummy(dtype)
        gs, nbits = 8, 0
    else:
        (kd, ks, kb), (vd, vs, vb) = k_cache, v_cache
        gs, nbits = group_size, bits
    hkv = kd.shape[1]
    MB = block_tables.shape[1]
    lay = layout(B, hq, hkv, L, MB, block_size)
    if parts is not None:
        lay["part_blocks"] = max(1, -(-MB // parts))
        lay["parts"] = -(-MB // lay["part_blocks"])
    n_part = lay["parts"]
    split = n_part > 1
    params = mx.array([hkv, lay["G"], L, MB, lay["passes"], n_part, lay["part_blocks"]], dtype=mx.int32)
    nq = B * hq * L
    out, part_o, part_ms = KERNEL(
        inputs=[queries, kd, ks, kb, vd, vs, vb, block_tables.astype(mx.int32), context_lens.astype(mx.int32),
                params, mx.array(scale * LOG2E, dtype=mx.float32)],
        template=[("T", dtype), ("D", D), ("BS", block_size), ("BITS", nbits), ("GS", gs), ("QMAX", lay["qmax"]),
                  ("NSG", NSG), ("PARTS", split)],
        grid=(32 * NSG, hkv, B * lay["passes"] * n_part),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=[(B, hq, L, D) if not split else (1,), (nq, n_part, D) if split else (1,),
                       (nq, n_part, 2) if split else (1,)],
        output_dtypes=[dtype, mx.float32, mx.float32],
    )
    if not split:
        return out
    return merge(part_o, part_ms).reshape(B, hq, L, D).astype(dtype)


def merge(part_o: mx.array, part_ms: mx.array) -> mx.array:
    """Combine partitions: ``part_o [N, P, D]`` unnormalized outputs, ``part_ms [N, P, 2]`` (max in log2 units, sum)."""
    m, s = part_ms[..., 0], part_ms[..., 1]
    top = m.max(axis=1, keepdims=True)
    w = mx.exp((m - top) * math.log(2.0))  # an empty partition: m = -inf, weight 0
    total = (s * w).sum(axis=1, keepdims=True)
    return (part_o * w[..., None]).sum(axis=1) / mx.maximum(total, 1e-30)


# ---------------------------------------------------------------- tolerance

_ABS = {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}
# Relative size of one unit in the last place of the output type.
_ULP = {mx.float32: 0.0, mx.float16: 2.0 ** -10, mx.bfloat16: 2.0 ** -7}

TOLERANCE = ("per element |out - twin| <= A * max(1, max|twin|) + 1 ulp of the output type at that element, "
             "A = 1e-4 (float32), 2e-3 (float16), 1.6e-2 (bfloat16): float32 softmax and accumulation in another "
             "order than the twin's sdpa, which rounds the gathered / dequantized K and V (and its scores on "
             "some paths) to the queries' dtype")


def check(outputs, reference) -> str | None:
    y = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    ref = reference[0] if isinstance(reference, (list, tuple)) else reference
    if y.shape != ref.shape or y.dtype != ref.dtype:
        return f"shape/dtype {y.shape} {y.dtype} != {ref.shape} {ref.dtype}"
    a, b = y.astype(mx.float32), ref.astype(mx.float32)
    if not mx.isfinite(a).all().item():
        return "non-finite output"
    top = max(1.0, mx.abs(b).max().item())
    bound = _ABS[y.dtype] * top + _ULP[y.dtype] * mx.maximum(mx.abs(a), mx.abs(b))
    err = mx.abs(a - b)
    excess = (err - bound).max().item()
    if excess > 0:
        worst = mx.argmax((err - bound).reshape(-1)).item()
        return (f"error {err.reshape(-1)[worst].item():.3g} at element {worst} over the bound "
                f"{bound.reshape(-1)[worst].item():.3g} (max|twin| {top:.3g})")
    return None


# --------------------------------------------------------------------- cases

def _quantize(x: mx.array, bits: int, group_size: int) -> tuple:
    S, H, D = x.shape
    q, s, b = mx.quantize(x.reshape(S * H, D), group_size=group_size, bits=bits)
    return q.reshape(S, H, -1), s.reshape(S, H, -1), b.reshape(S, H, -1)


def _pool(slots: int, hkv: int, D: int, dtype: mx.Dtype, bits: Optional[int], group_size: int, seed: int,
          pools: Optional[dict] = None):
    """A K and a V pool of ``slots`` slots, unevaluated; ``pools`` shares them between the cases of one shape
    (the gate's matrix holds each pool once, and frees it with the case list)."""
    key = (slots, hkv, D, str(dtype), bits, group_size, seed)
    if pools is not None and key in pools:
        return pools[key]
    kk, kv = mx.random.split(mx.random.key(seed))
    k = mx.random.normal((slots, hkv, D), key=kk).astype(dtype)
    v = mx.random.normal((slots, hkv, D), key=kv).astype(dtype)
    made = (k, v) if bits is None else (_quantize(k, bits, group_size), _quantize(v, bits, group_size))
    if pools is not None:
        pools[key] = made
    return made


def make_case(B: int, hq: int, hkv: int, D: int, ctx: list[int], *, L: int = 1, block_size: int = 16,
              dtype=mx.float16, bits: Optional[int] = None, group_size: int = 64, seed: int = 0,
              pool_blocks: Optional[int] = None, label: str = "", pools: Optional[dict] = None) -> Case:
    """Rows of the given context lengths, their blocks scattered (shuffled) over a pool; random queries."""
    MB = max(-(-c // block_size) for c in ctx)
    need = sum(-(-c // block_size) for c in ctx)
    nblocks = max(need, pool_blocks or 0)
    k_cache, v_cache = _pool(nblocks * block_size, hkv, D, dtype, bits, group_size, seed, pools)
    key = mx.random.key(seed * 1009 + B * 31 + hq + D + L + sum(ctx))
    kq, kp = mx.random.split(key)
    perm = mx.random.permutation(nblocks, key=kp).tolist()
    rows, used = [], 0
    for c in ctx:
        n = -(-c // block_size)
        blocks = perm[used:used + n]
        used += n
        rows.append(blocks + [perm[0]] * (MB - n))  # past a row's last block: any block in range
    tables = mx.array(rows, dtype=mx.int32)
    lens = mx.array(ctx, dtype=mx.int32)
    q = mx.random.normal((B, hq, L, D), key=kq).astype(dtype)
    name = label or (f"B={B} Hq={hq}/Hkv={hkv} D={D} L={L} bs={block_size} ctx={min(ctx)}..{max(ctx)} "
                     f"{'q%d' % bits if bits else 'float'} {str(dtype).removeprefix('mlx.core.')}")
    kw = {"scale": 1.0 / math.sqrt(D), "block_size": block_size, "bits": bits, "group_size": group_size}
    return Case(name, (q, k_cache, v_cache, tables, lens), kw)


def _ragged(B: int, ctx: int, seed: int) -> list[int]:
    """B context lengths in [3/4 ctx, ctx], the longest exactly ctx."""
    if B == 1:
        return [ctx]
    lens = mx.random.randint(ctx * 3 // 4, ctx + 1, (B,), key=mx.random.key(seed)).tolist()
    lens[0] = ctx
    return lens


def cases(kind: str) -> list[Case]:
    if kind == "emulate":  # tiny: dtypes, bits, both head dims, GQA, ragged lengths, block edges, L > 1
        return [
            make_case(3, 4, 2, 64, [1, 16, 17], dtype=mx.float32, seed=1),  # 1 token; a block edge and one past
            make_case(2, 6, 2, 128, [33, 8], dtype=mx.float16, block_size=8, seed=2, pool_blocks=9),
            make_case(2, 2, 1, 64, [20, 31], dtype=mx.float16, bits=8, seed=3),
            make_case(2, 3, 3, 128, [5, 24], dtype=mx.float32, bits=4, group_size=32, block_size=8, seed=4),
            make_case(1, 9, 3, 64, [40], dtype=mx.bfloat16, bits=4, seed=5),  # SmolLM2-like heads
            make_case(2, 4, 1, 64, [7, 19], L=3, dtype=mx.float32, block_size=4, seed=6),  # prefill chunk, 2 passes
            make_case(1, 2, 1, 64, [300], dtype=mx.float16, block_size=16, seed=7),  # 2 partitions
            make_case(1, 2, 2, 128, [29], L=5, dtype=mx.float16, bits=8, block_size=32, seed=8),  # L=5 in one block
        ]
    if kind == "device":  # the gate / selftest matrix on a Mac
        out, pools = [], {}
        models = [(9, 3, 64, "SmolLM2-like"), (40, 8, 128, "Qwen2.5-32B-like")]
        for hq, hkv, D, tag in models:
            for B in (1, 8, 16, 32):
                for ctx in (256, 1024, 4096):
                    # One pool per model shape, big enough for the largest case (32 rows x 4096).
                    out.append(make_case(B, hq, hkv, D, _ragged(B, ctx, B + ctx), dtype=mx.float16, seed=hq,
                                         pool_blocks=32 * 4096 // 16, pools=pools, label=f"{tag} B={B} ctx<={ctx} f16"))
            for bits in (8, 4):
                for B, ctx in ((8, 1024), (32, 4096)):
                    out.append(make_case(B, hq, hkv, D, _ragged(B, ctx, B + ctx), dtype=mx.float16, bits=bits,
                                         seed=hq, pool_blocks=32 * 4096 // 16, pools=pools,
                                         label=f"{tag} B={B} ctx<={ctx} q{bits} f16"))
            out.append(make_case(1, hq, hkv, D, [1024], L=4, dtype=mx.float16, seed=hq, pool_blocks=32 * 4096 // 16,
                                 pools=pools, label=f"{tag} B=1 L=4 ctx=1024 f16"))
        for c in out:  # the gate decides per family (the engine's production variants: production.paged_cases)
            c.family = _pa.family(c.args[0])
        return out
    raise ValueError(f"unknown case kind {kind!r} (emulate, device)")


# cpu_fn None: the C++ primitive has its own selftest entry (``kernels_cli._paged_spec`` in
# ``mlx-ray kernels selftest``) on CPU-sized cases; the device matrix here is the Mac's (gathers of ~0.5 GB).
SPEC = KernelSpec(name=NAME, metal=KERNEL, metal_fn=metal, twin=_pa.twin, cpu_fn=None, cases=cases,
                  tolerance=TOLERANCE, check=check, model_cases=production.paged_cases)
