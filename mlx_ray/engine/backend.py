"""Which KV cache the engine runs: the paged cache (``paged.py``) where it is verified, else mlx-lm's batch cache.

``kv_cache="auto"`` (the default) takes the paged cache when every layer's
mlx-lm cache is a plain ``KVCache`` (no sliding window, no recurrent state),
the paged-attention kernel for this device has passed its self-test
(``kernels.paged_attention.kernel_verified``: the C++ primitive on the CPU, the
Metal kernel's on-device verdict on a Mac) and supports the model's head size,
and a short prompt gives the same logits through the paged step as through
mlx-lm's own cache. Otherwise it keeps ``batching.RectBatch``: on a device
where the kernel is not verified, decode is then exactly as fast as before
(the twin, a gather of the whole context per layer and step, would be slower).
``"paged"`` insists (a model that cannot be paged fails to load, in one line);
``"batch"`` never pages. ``kv_bits`` (8 or 4) quantizes the paged cache and
needs it.
"""

from __future__ import annotations

import logging

from ..errors import BadRequest
from ..kernels import paged_attention as pa
from . import paged
from .batching import RectBatch
from .protocol import EngineConfig

log = logging.getLogger(__name__)


def build(model, cfg: EngineConfig, *, kv_budget: int, kv_bytes_per_token: int, prefix_bytes: int):
    """The backend for this model, device and config (a ``PagedBatch`` or a ``RectBatch``)."""
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
            backend = paged.build(model, shapes, dtype, kv_budget=kv_budget, block_size=cfg.kv_block_size,
                                  bits=cfg.kv_bits, group_size=cfg.kv_group_size, prefix_bytes=prefix_bytes,
                                  prefill_chunk=cfg.prefill_chunk, max_rows=cfg.max_num_seqs)
            log.info("paged KV cache: %d blocks of %d tokens (%.1f KiB each)%s", backend.pool.num_blocks,
                     cfg.kv_block_size, backend.pool.block_bytes / 1024,
                     f", {cfg.kv_bits}-bit" if cfg.kv_bits else "")
            return backend
    if cfg.kv_cache == "paged" or cfg.kv_bits:
        what = f"kv_bits={cfg.kv_bits}" if cfg.kv_bits else "kv_cache=paged"
        raise BadRequest(f"{what} needs the paged KV cache, which this model cannot use here: {why}; "
                         f"use kv_cache=batch without kv_bits")
    log.info("KV cache: mlx-lm's batch cache (%s)", why)
    return RectBatch(model, kv_budget=kv_budget, kv_bytes_per_token=kv_bytes_per_token, prefix_bytes=prefix_bytes,
                     prefill_chunk=cfg.prefill_chunk, max_rows=cfg.max_num_seqs)


def _paged_refusal(model, cfg: EngineConfig):
    if cfg.kv_cache == "batch":
        return "kv_cache=batch"
    why = paged.unsupported(model)
    if why:
        return why
    if cfg.kv_cache == "auto" and not cfg.kv_bits:
        ok, reason = pa.kernel_verified()
        if not ok:
            return f"no verified paged-attention kernel on this device ({reason})"
    return None
