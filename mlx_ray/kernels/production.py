"""The variants production dispatches, from the loaded model and the engine's config, as the gate's cases.

The gate must check what the engine will actually run, not a generic matrix:
the model's own head counts, head size, dtype and vocabulary, and the
engine's KV block size, KV bits and group size, prefill chunk and batch
width. :func:`paged_shapes` and :func:`sampler_shapes` turn a model and an
``EngineConfig`` into the ``model_shapes`` that ``gate.verdict`` takes (they
join the verdict's cache key); :func:`paged_cases` and :func:`sampler_cases`
(the specs' ``model_cases``) turn those back into cases, in families the gate
decides on separately:

* paged attention: ``decode`` (L = 1: 1 row, a mid-size batch and
  ``max_num_seqs`` rows at contexts up to 4096) and ``prefill`` (one
  ``prefill_chunk``-token chunk alone and after a 2k prefix, and the packed
  form the engine builds: several rows whose chunks add up to 1.5 chunks);
* sampler: one family, the engine's batch widths at the model's vocabulary
  and logits dtype;
* skinny_qmm's (the model's quantized layers, by row bucket) are in
  ``skinny_qmm.model_cases``.

:func:`check` asks the gate for both at engine start (on a Metal device; a
no-op elsewhere), so a replica knows its kernels before its first request.
"""

from __future__ import annotations

import logging
from typing import Optional

import mlx.core as mx

from ._common import Case

log = logging.getLogger("mlx_ray.kernels.gate")

DECODE_CONTEXTS = (256, 1024, 4096)
PREFILL_PREFIX = 2048  # a chunk after a prefix this long (a long prompt's later chunks)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def query_heads(model) -> Optional[int]:
    """The model's query heads (its attention modules' ``n_heads``, else ``args.num_attention_heads``)."""
    for _, mod in model.named_modules():
        n = getattr(mod, "n_heads", None) or getattr(mod, "num_heads", None)
        if isinstance(n, int) and n > 0:
            return n
    args = getattr(model, "args", None)
    n = getattr(args, "num_attention_heads", None)
    return n if isinstance(n, int) else None


def logits_info(model) -> tuple[int, str]:
    """(vocabulary width of the logits, their dtype name), from a 1-token forward: what the sampler is fed."""
    from mlx_lm.models.cache import make_prompt_cache  # noqa: PLC0415

    logits = model(mx.array([[0]]), cache=make_prompt_cache(model))
    return int(logits.shape[-1]), _dtype_name(logits.dtype)


def paged_shapes(model, cfg, layer_shapes, dtype) -> set[tuple]:
    """(Hq, Hkv, D, dtype, block size, KV bits (0: float), group size, prefill chunk, max rows, max context)
    for each distinct layer shape."""
    hq = query_heads(model)
    bits = cfg.kv_bits if cfg.kv_bits in (4, 8) else 0
    ctx = cfg.max_model_len or max(DECODE_CONTEXTS) + cfg.prefill_chunk
    out = set()
    for s in layer_shapes:
        out.add((hq or s.n_kv_heads, s.n_kv_heads, s.head_dim, _dtype_name(dtype), cfg.kv_block_size, bits,
                 cfg.kv_group_size, cfg.prefill_chunk, cfg.max_num_seqs, ctx))
    return out


def sampler_shapes(model, cfg) -> set[tuple]:
    """(vocabulary, logits dtype, max rows)."""
    vocab, dtype = logits_info(model)
    return {(vocab, dtype, cfg.max_num_seqs)}


def paged_cases(model_shapes) -> list[Case]:
    from . import paged_attention_metal as pm  # noqa: PLC0415

    out, pools = [], {}
    for hq, hkv, D, dtype, bs, bits, gs, chunk, rows, max_ctx in sorted(model_shapes):
        dt = getattr(mx, dtype)
        qb = bits or None
        tag = f"Hq={hq}/Hkv={hkv} D={D} bs={bs} {'q%d g%d' % (bits, gs) if bits else 'float'} {dtype}"
        contexts = sorted({min(c, max_ctx) for c in DECODE_CONTEXTS})
        widths = sorted({1, max(1, rows // 2), rows})
        prefill = [(1, chunk, chunk), (1, chunk, min(max_ctx, PREFILL_PREFIX + chunk))]
        packed = 3 if chunk >= 48 else 2  # the engine packs rows while rows x longest chunk <= 1.5 chunks
        prefill.append((packed, (3 * chunk) // (2 * packed), (3 * chunk) // (2 * packed)))
        need = max(rows * max(contexts), max(b * c for b, _, c in prefill))
        pool_blocks = -(-need // bs) + 1
        common = dict(dtype=dt, bits=qb, group_size=gs, block_size=bs, seed=hq + D, pool_blocks=pool_blocks,
                      pools=pools)
        for B in widths:
            for c in contexts:
                case = pm.make_case(B, hq, hkv, D, _ragged(B, c), label=f"decode B={B} ctx<={c} {tag}", **common)
                out.append(_family(case, "decode"))
        for B, L, c in prefill:
            case = pm.make_case(B, hq, hkv, D, [c] * B, L=L, label=f"prefill B={B} L={L} ctx={c} {tag}", **common)
            out.append(_family(case, "prefill"))
    return out


def sampler_cases(model_shapes) -> list[Case]:
    from . import sampler  # noqa: PLC0415

    out = []
    for vocab, dtype, rows in sorted(model_shapes):
        for B in sorted({1, max(1, rows // 2), rows}):
            out.append(_family(sampler.make_case(B, vocab, seed=B + vocab, dtype=getattr(mx, dtype)), "sample"))
    return out


def _ragged(B: int, ctx: int) -> list[int]:
    """B context lengths in [3/4 ctx, ctx], the longest exactly ctx (deterministic)."""
    return [ctx - (i * ctx // 4) // max(1, B - 1) if B > 1 else ctx for i in range(B)]


def _family(case: Case, family: str) -> Case:
    case.family = family
    return case


def check(model, cfg, layer_shapes, dtype, device=None) -> dict:
    """Ask the gate for paged attention (when ``layer_shapes`` are given: the paged cache) and the sampler on the
    production variants (Metal devices only).

    Returns {name: Verdict} ({} without Metal). Never raises: a kernel the
    gate cannot measure is off, and the twin serves.
    """
    from . import gate  # noqa: PLC0415

    device = device or gate.current_device()
    if not device.metal:
        return {}
    out = {}
    asks = [("sampler", lambda: sampler_shapes(model, cfg))]
    if layer_shapes is not None:  # the paged cache (None: mlx-lm's batch cache, no paged attention)
        asks.insert(0, ("paged_attention", lambda: paged_shapes(model, cfg, layer_shapes, dtype)))
    for name, shapes in asks:
        try:
            out[name] = gate.verdict(name, model_shapes=shapes(), device=device)
        except Exception as e:  # noqa: BLE001 - an unregistered kernel, a shape the probe cannot get: off
            why = f"not checked on the production variants ({type(e).__name__}: {e})"
            log.warning("kernel %s %s", name, why)
            out[name] = gate.off(name, why)
    return out
