"""The engine's speculator from its config: the proposer, the controller and its calibrated cost prior."""

from __future__ import annotations

import logging

from dataclasses import dataclass
from typing import Any, Optional

from ...errors import BadRequest
from .config import SpeculativeConfig
from .controller import Controller
from .ngram import NgramProposer
from .verify import Speculator, calibrated


@dataclass
class Draft:
    """A loaded draft model and what its KV costs a block."""

    model: Any
    shapes: list
    dtype: Any
    vocab_size: int
    bits: Optional[int]
    group_size: int
    block_size: int
    block_bytes: int


def load_draft(cfg: SpeculativeConfig, target_tokenizer, bits: Optional[int], group_size: int,
               block_size: int) -> Draft:
    """Load ``cfg.draft_model``; BadRequest in one line when its tokenizer is not the target's or it cannot be paged."""
    from .. import loader, paged
    from ..kv_pool import KVPool
    from .draft import check_tokenizers, refuse

    model, tokenizer, info = loader.load(cfg.draft_model)
    why = check_tokenizers(target_tokenizer, tokenizer, cfg.draft_model)
    if why is None:
        why = paged.unsupported(model)
    if why is not None:
        raise refuse(cfg.draft_model, why)
    shapes, dtype = paged.layer_shapes(model)
    block_bytes = KVPool(shapes, dtype, 1, block_size, bits, group_size).block_bytes
    log.info("draft model %s: %d layers, %.1f KiB of KV a block beside the target's", cfg.draft_model, len(shapes),
             block_bytes / 1024)
    return Draft(model, shapes, dtype, info.vocab_size, bits, group_size, block_size, block_bytes)

log = logging.getLogger(__name__)


def build(batch, cfg: SpeculativeConfig, draft: Optional[Draft] = None):
    """A :class:`Speculator` for ``batch`` (a ``PagedBatch``); ``draft``: the loaded draft model (method draft),
    given a pool of its own that mirrors ``batch``'s block ids."""
    if getattr(batch, "kind", None) != "paged":
        raise BadRequest("speculative decoding needs the paged KV cache, which this model does not use here; "
                         "remove speculative or use kv_cache=paged", param="speculative")
    if cfg.method == "ngram":
        proposer = NgramProposer(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
    else:
        from .. import paged
        from ..kv_pool import KVPool
        from .draft import DraftProposer

        paged.patch_attention()  # the draft's model modules too
        pool = KVPool(draft.shapes, draft.dtype, batch.pool.num_blocks, batch.pool.block_size, draft.bits,
                      draft.group_size)
        proposer = DraftProposer(draft.model, pool, draft.vocab_size, batch.prefill_chunk)
        proposer.batch = batch
    controller = Controller(cfg.num_speculative_tokens, auto=cfg.auto)
    if cfg.auto:
        calibrated(batch, controller, proposer)
        a, b = controller.cost.a, controller.cost.b
        log.info("speculative decoding (%s, K <= %d, auto): a step costs %.1f ms + %.2f ms a query token here%s",
                 cfg.method, cfg.num_speculative_tokens, a * 1e3, b * 1e3,
                 f"; a draft forward {controller.draft.forward(1) * 1e3:.1f} ms" if controller.draft.a else "")
    return Speculator(proposer, controller)
