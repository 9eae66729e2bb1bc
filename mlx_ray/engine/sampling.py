"""Per-request sampling: validation, a sampler with its own PRNG key, penalties.

mlx-lm's ``make_sampler`` draws from the *global* PRNG, so a request's output
would depend on what else is in the batch. Here every request owns a key
(``mx.random.key(seed)``) that is split once per generated token, so the same
seed and prompt give the same tokens alone or batched. The filters themselves
(top-k, top-p, min-p) are mlx-lm's.

Penalties follow the OpenAI / vLLM meaning, which mlx-lm's 20-token-window
processors do not: presence and frequency penalties count the *generated*
tokens, the repetition penalty (HF style) covers prompt and output.
"""

from __future__ import annotations

import random
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

from ..errors import BadRequest
from .protocol import SamplingParams

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def validate(p: SamplingParams, vocab_size: int) -> None:
    """Raise BadRequest (naming the parameter) for values the engine cannot honour."""

    def bad(param: str, msg: str):
        raise BadRequest(f"{param} {msg}", param=param)

    if p.max_tokens < 1:
        bad("max_tokens", f"must be at least 1, got {p.max_tokens}")
    if p.temperature < 0:
        bad("temperature", f"must be >= 0 (0 is greedy), got {p.temperature}")
    if not 0 < p.top_p <= 1:
        bad("top_p", f"must be in (0, 1], got {p.top_p}")
    if p.top_k < 0 or p.top_k >= vocab_size:
        bad("top_k", f"must be in [0, {vocab_size}) (0 disables it), got {p.top_k}")
    if not 0 <= p.min_p <= 1:
        bad("min_p", f"must be in [0, 1], got {p.min_p}")
    if p.repetition_penalty <= 0:
        bad("repetition_penalty", f"must be > 0 (1 disables it), got {p.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(p, name) <= 2:
            bad(name, f"must be in [-2, 2], got {getattr(p, name)}")
    if not 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS:
        bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {p.top_logprobs}")
    if len(p.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in p.stop):
        bad("stop", f"must be at most {MAX_STOP_STRINGS} non-empty strings")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in p.stop_token_ids):
        bad("stop_token_ids", f"must be token ids in [0, {vocab_size})")


class KeyedSampler:
    """Temperature sampling with top-k/top-p/min-p filters and a private PRNG key."""

    def __init__(self, p: SamplingParams, seed: int):
        self.key = mx.random.key(seed & 0xFFFFFFFFFFFFFFFF)
        self.inv_temp = 1.0 / p.temperature
        self.filters: list[Callable[[mx.array], mx.array]] = []
        if 0 < p.top_p < 1.0:
            self.filters.append(lambda x: apply_top_p(x, p.top_p))
        if p.min_p > 0.0:
            self.filters.append(lambda x: apply_min_p(x, p.min_p))
        if p.top_k > 0:
            self.filters.append(lambda x: apply_top_k(x, p.top_k))

    def __call__(self, logprobs: mx.array) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        for f in self.filters:
            logprobs = f(logprobs)
        return mx.random.categorical(logprobs * self.inv_temp, key=sub)


def make_sampler(p: SamplingParams, default_seed: Optional[int] = None) -> Sampler:
    """Greedy (one shared function, so an all-greedy batch samples in one call) or keyed."""
    if p.temperature == 0:
        return greedy_sampler
    seed = p.seed if p.seed is not None else default_seed
    return KeyedSampler(p, seed if seed is not None else random.getrandbits(63))


def make_logits_processors(p: SamplingParams, prompt_len: int) -> list[LogitsProcessor]:
    """Processors see (context tokens = prompt + generated so far, logits of shape (1, V))."""
    procs: list[LogitsProcessor] = []
    if p.repetition_penalty != 1.0:
        rp = p.repetition_penalty

        def repetition(tokens: mx.array, logits: mx.array) -> mx.array:
            if tokens.size == 0:
                return logits
            sel = logits[:, tokens]
            logits[:, tokens] = mx.where(sel < 0, sel * rp, sel / rp)
            return logits

        procs.append(repetition)
    if p.presence_penalty or p.frequency_penalty:
        pres, freq = p.presence_penalty, p.frequency_penalty

        def presence_frequency(tokens: mx.array, logits: mx.array) -> mx.array:
            if tokens.size <= prompt_len:
                return logits
            counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[tokens[prompt_len:]].add(1)
            return logits - (freq * counts + pres * (counts > 0))[None]

        procs.append(presence_frequency)
    return procs


def top_logprobs(logprobs: mx.array, n: int) -> tuple[mx.array, mx.array]:
    """(ids, values) of the ``n`` most likely tokens of a 1-D logprob vector, best first (lazy)."""
    idx = mx.argpartition(-logprobs, kth=n - 1)[:n]
    vals = logprobs[idx]
    order = mx.argsort(-vals)
    return idx[order], vals[order]
