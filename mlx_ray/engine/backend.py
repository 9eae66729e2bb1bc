"""Which KV cache the engine runs: the paged cache (``paged.py``) where the model allows it, else mlx-lm's batch cache.

``kv_cache="auto"`` (the default) takes the paged cache when every layer's
mlx-lm cache is a plain ``KVCache`` (no sliding window, no recurrent state),
a paged-attention kernel exists for the model's head size, and a short prompt
gives the same logits through the paged step as through mlx-lm's own cache.
Whether the kernel *runs* is the dispatch's business
(``kernels.paged_attention``): the C++ primitive on the CPU, the Metal kernel
where its on-device verdict enables it (for decode and prefill separately),
else the twin, inside the paged engine. A rejected or failed kernel therefore
costs speed, never the paged cache. ``"paged"`` insists (a model that cannot be
paged fails to load, in one line); ``"batch"`` never pages. ``kv_bits`` (8 or
4) quantizes the paged cache and needs it.

On a Metal device :func:`build` first has the gate check the Metal kernels on
exactly the variants this engine will dispatch (``kernels.production``: the
model's heads, head size, dtype and vocabulary, the config's block size, KV
bits and group, prefill chunk and batch width), each measured in a child
process. The backend it returns is guarded: a step that fails names the
kernel it blames (``gate.blame``), which is then off for good, and its
``stats()`` carry ``kernels_failed`` (name -> why) for the stats and health.
"""

from __future__ import annotations

import logging

from ..errors import BadRequest
from ..kernels import gate, production
from ..kernels import paged_attention as pa
from . import paged
from .batching import RectBatch
from .protocol import EngineConfig

log = logging.getLogger(__name__)


def build(model, cfg: EngineConfig, *, kv_budget: int, kv_bytes_per_token: int, prefix_bytes: int,
          extra_block_bytes: int = 0):
    """The backend for this model, device and config (a ``PagedBatch`` or a ``RectBatch``); ``extra_block_bytes``:
    a draft model's KV a block, beside the target's (``spec/draft.py``)."""
    why = _paged_refusal(model, cfg)
    if why is None:
        shapes, dtype = paged.layer_shapes(model)
        # The probe checks that the architecture goes through the paged step, at the cache's float
        # precision (exact); what quantized KV costs is a parity question (mlx-ray parity --kv-bits).
        why = paged.check(model, shapes, dtype, None, cfg.kv_group_size)
        if why is None:
            bad_dim = sorted({s.head_dim for s in shapes} - set(pa.HEAD_DIMS))
            if bad_dim and cfg.kv_cache == "auto":
                why = f"head size {bad_dim[0]} has no paged-attention kernel (only {list(pa.HEAD_DIMS)})"
        if why is None:
            production.check(model, cfg, shapes, dtype)
            backend = paged.build(model, shapes, dtype, kv_budget=kv_budget, block_size=cfg.kv_block_size,
                                  bits=cfg.kv_bits, group_size=cfg.kv_group_size, prefix_bytes=prefix_bytes,
                                  prefill_chunk=cfg.prefill_chunk, max_rows=cfg.max_num_seqs,
                                  extra_block_bytes=extra_block_bytes)
            ok, reason = pa.kernel_verified()
            log.info("paged KV cache: %d blocks of %d tokens (%.1f KiB each)%s; attention: %s", backend.pool.num_blocks,
                     cfg.kv_block_size, backend.pool.block_bytes / 1024,
                     f", {cfg.kv_bits}-bit" if cfg.kv_bits else "", reason if ok else f"the twin ({reason})")
            return guard(backend)
    if cfg.kv_cache == "paged" or cfg.kv_bits:
        what = f"kv_bits={cfg.kv_bits}" if cfg.kv_bits else "kv_cache=paged"
        raise BadRequest(f"{what} needs the paged KV cache, which this model cannot use here: {why}; "
                         f"use kv_cache=batch without kv_bits")
    log.info("KV cache: mlx-lm's batch cache (%s)", why)
    production.check(model, cfg, None, None)  # the sampler serves this cache too
    return guard(RectBatch(model, kv_budget=kv_budget, kv_bytes_per_token=kv_bytes_per_token,
                           prefix_bytes=prefix_bytes, prefill_chunk=cfg.prefill_chunk, max_rows=cfg.max_num_seqs))


def guard(backend):
    """``backend`` with its ``step`` blaming the Metal kernels a failure names (``gate.blame``: off from then on;
    the step still fails, and the scheduler fails that batch) and its ``stats`` listing ``kernels_failed``."""
    step, stats = backend.step, backend.stats

    def guarded_step():
        try:
            return step()
        except Exception as e:
            gate.blame(e)
            raise

    def guarded_stats() -> dict:
        return {**stats(), "kernels_failed": gate.failed()}

    backend.step, backend.stats = guarded_step, guarded_stats  # instance attributes over the class's methods
    return backend


def _paged_refusal(model, cfg: EngineConfig):
    if cfg.kv_cache == "batch":
        return "kv_cache=batch"
    return paged.unsupported(model)
