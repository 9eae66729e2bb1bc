"""mlx-lm's ``BatchGenerator`` with one change: new rows join the decode batch without a forward of their own.

In mlx-lm, a prompt that finishes prefill becomes a ``GenerationBatch`` whose
constructor immediately runs a forward pass over the last prompt token of the
new rows alone, before they are merged into the running batch. On a CPU that
pass costs about as much as a decode step of the whole batch (reading the
weights dominates), and it happens at every admission. Here the new rows are
merged with their last prompt token still pending, so it is computed inside
the running batch's next decode step, at no extra weight read. A request whose
prompt is fully covered by the prefix cache thus joins without any extra pass.

The price: the running batch's step returns that last prompt token once for
each new row, as if generated; ``first_is_prompt`` tells the scheduler to drop
it, and max_tokens is raised by one to match. Stop tokens are matched by the
scheduler (an mlx-lm stop matcher would see the prompt token first).

Sampling: mlx-lm calls one sampler per row unless every row shares one. Here a
step with sampled (keyed) rows hands all rows to one ``BatchSampler``: every
sampled row in one batched call, greedy rows in one argmax
(``sampling.sample_rows``); logits processors still run first, in mlx-lm's step.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch, StopSequences
from mlx_lm.models.cache import TokenBuffer

from .memory import batch_kv_bound
from .prefix_cache import PrefixCache
from .sampling import BatchSampler, KeyedSampler


class EngineGenerationBatch(GenerationBatch):
    """mlx-lm's generation batch whose step samples every row in one call when any row is keyed."""

    def _step(self):
        rows = self.samplers
        if rows and any(isinstance(s, KeyedSampler) for s in rows) and not all(s is rows[0] for s in rows):
            self.samplers = [BatchSampler(rows)] * len(rows)  # mlx-lm then makes one call over the batch
            try:
                return super()._step()
            finally:
                self.samplers = rows
        return super()._step()


class _PromptBatch(PromptProcessingBatch):
    def generate(self, tokens):
        """Like the parent, but the returned batch has not run its first step."""
        if any(len(t) > 1 for t in tokens):
            self.prompt([t[:-1] for t in tokens])
        n = len(self.uids)
        gen = EngineGenerationBatch.empty(self.model, self.fallback_sampler)  # no uids: no forward pass
        gen.uids = self.uids
        gen.prompt_cache = self.prompt_cache
        gen.tokens = self.tokens
        gen.samplers = self.samplers
        gen.logits_processors = self.logits_processors
        gen.stop_sequences = self.stop_sequences
        gen.max_tokens = [m + 1 for m in self.max_tokens]  # + the pending prompt token
        gen._next_tokens = mx.array([t[-1] for t in tokens], dtype=mx.uint32)
        gen._next_logprobs = [mx.array(0.0)] * n  # placeholders: never read for the prompt token
        gen._token_context = [TokenBuffer(t) for t in self.tokens]
        gen._num_tokens = [0] * n
        gen._matchers = [ss.matcher() for ss in self.stop_sequences]
        self.uids, self.prompt_cache, self.tokens = [], [], []
        self.samplers, self.logits_processors, self.max_tokens = [], [], []
        return gen


class EngineBatchGenerator(BatchGenerator):
    first_is_prompt = True  # each row's first response is its last prompt token

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self._prompt_batch = _PromptBatch.empty(self.model, self.sampler, prefill_step_size=self.prefill_step_size)
        self._generation_batch = EngineGenerationBatch.empty(self.model, self.sampler)


class RectBatch:
    """The scheduler's backend for mlx-lm's rectangular batch cache (models the paged cache cannot take).

    Admission bounds the batch by ``memory.batch_kv_bound`` (every row as long as
    the longest); prefixes come from ``prefix_cache.PrefixCache`` (copies of
    finished rows' KV).
    """

    kind = "batch"
    first_is_prompt = EngineBatchGenerator.first_is_prompt

    def __init__(self, model, *, kv_budget: int, kv_bytes_per_token: int, prefix_bytes: int, prefill_chunk: int,
                 max_rows: int):
        self.model, self.kv_budget, self.bpt = model, kv_budget, kv_bytes_per_token
        self.prefill_chunk, self.max_rows = prefill_chunk, max_rows
        self.prefix = PrefixCache(prefix_bytes)
        self.reserves: dict[int, int] = {}
        self.gen = self._new_generator()

    def _new_generator(self) -> EngineBatchGenerator:
        return EngineBatchGenerator(self.model, completion_batch_size=self.max_rows,
                                    prefill_batch_size=min(8, self.max_rows), prefill_step_size=self.prefill_chunk)

    def fits_alone(self, tokens: int) -> bool:
        return batch_kv_bound([tokens], self.bpt) <= self.kv_budget

    def try_insert(self, prompt: list[int], max_tokens: int, sampler, processors) -> Optional[tuple[int, int]]:
        reserve = len(prompt) + max_tokens
        if self.reserves and batch_kv_bound(list(self.reserves.values()) + [reserve], self.bpt) > self.kv_budget:
            return None
        cache, n = self.prefix.fetch(prompt) if len(prompt) > 1 else (None, 0)
        (uid,) = self.gen.insert(
            [prompt[n:]],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[list(prompt[:n])],
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[StopSequences()],  # stop tokens are matched by the scheduler
        )
        self.reserves[uid] = reserve
        return uid, n

    def remove(self, uids: list[int], keep_cache: bool = False) -> None:
        for uid in uids:
            self.reserves.pop(uid, None)
        caches = self.gen.remove(uids, return_prompt_caches=keep_cache)
        for cache, tokens in caches.values():
            self.prefix.insert(tokens, cache)

    def step(self) -> list:
        _, responses = self.gen.next()
        for r in responses:
            if r.finish_reason is not None:  # the generator removed the row itself
                self.reserves.pop(r.uid, None)
                if r.prompt_cache is not None:
                    self.prefix.insert(r.all_tokens, r.prompt_cache)
        return responses

    def reset(self) -> None:
        """After a failed step: a fresh batch (the prefix cache's entries are private copies: kept)."""
        old, self.gen = self.gen, None
        old.close()
        del old
        self.reserves.clear()
        self.gen = self._new_generator()

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()

    def reset_counters(self) -> None:
        """The prefix cache's hit counters back to zero (its entries kept)."""
        self.prefix.reset_counters()

    @property
    def prefix_enabled(self) -> bool:
        return self.prefix.enabled

    def stats(self) -> dict:
        p = self.prefix
        return dict(kv_cache="batch", kv_bits=None, kv_bytes_used=self.gen.prompt_cache_nbytes if self.gen else 0,
                    kv_copy_bytes_total=None, prefix_hits=p.hits, prefix_misses=p.misses,
                    prefix_hit_tokens=p.hit_tokens, prefix_cache_bytes=p.nbytes,
                    prefix_cache_budget_bytes=p.max_bytes, prefix_cache_entries=len(p))
