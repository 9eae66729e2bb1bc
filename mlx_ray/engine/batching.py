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

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch
from mlx_lm.models.cache import TokenBuffer

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
