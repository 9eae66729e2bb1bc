"""Per-request sampling: validation, a sampler with its own PRNG key, penalties.

mlx-lm's ``make_sampler`` draws from the *global* PRNG, so a request's output
would depend on what else is in the batch. Here every request owns a key
(``mx.random.key(seed)``) that is split once per generated token, and the
sub-key gives that token's uniform draw, so the same seed and prompt give the
same tokens alone or batched.

The filters (top-k, top-p, min-p: mlx-lm's semantics and order, see
``mlx_ray/kernels/sampler.py``) and the draw are one batched call per step
(:func:`sample_rows`, the kernels' ``sampler.sample``): the engine's generation
batch hands it every sampled row at once (``batching.py``), greedy rows are
one argmax. Token i is the inverse CDF of the kept, renormalized distribution
at the row's uniform, in token-id order.

Penalties follow the OpenAI / vLLM meaning, which mlx-lm's 20-token-window
processors do not: presence and frequency penalties count the *generated*
tokens, the repetition penalty (HF style) covers prompt and output.
"""

from __future__ import annotations

import copy
import random
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import greedy_sampler

from ..errors import BadRequest
from ..kernels import sampler as batch_sampler
from .protocol import LIMITS, MAX_LOGIT_BIAS, MAX_STOP_STRINGS, SamplingParams

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

# Temperatures below this sample greedily, as vLLM's do (its _SAMPLING_EPS): dividing
# logprobs by a denormal or zero float32 temperature gives inf - inf = NaN, and the
# filters then keep tokens they must not (top_k 3 picked a token at -20.9 nats).
GREEDY_BELOW_TEMPERATURE = 1e-5
_F32_TINY, _F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def validate(p: SamplingParams, vocab_size: int) -> None:
    """Raise BadRequest (naming the parameter) for values the engine cannot honour."""

    def bad(param: str, msg: str):
        raise BadRequest(f"{param} {msg}", param=param)

    for name, allowed in LIMITS.items():
        if getattr(p, name) not in allowed:
            bad(name, f"must be {allowed}, got {getattr(p, name)}")
    if p.top_k >= vocab_size:
        bad("top_k", f"must be below the vocabulary size {vocab_size} (0 disables it), got {p.top_k}")
    if len(p.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in p.stop):
        bad("stop", f"must be at most {MAX_STOP_STRINGS} non-empty strings")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in p.stop_token_ids):
        bad("stop_token_ids", f"must be token ids in [0, {vocab_size})")
    if len(p.logit_bias) > MAX_LOGIT_BIAS:
        bad("logit_bias", f"must have at most {MAX_LOGIT_BIAS} entries, got {len(p.logit_bias)}")
    for t, b in p.logit_bias.items():
        if not isinstance(t, int) or not 0 <= t < vocab_size:
            bad("logit_bias", f"keys must be token ids in [0, {vocab_size}), got {t!r}")
        if not -100 <= b <= 100:
            bad("logit_bias", f"values must be in [-100, 100], got {b} for token {t}")


class KeyedSampler:
    """One request's sampling parameters and private PRNG key (split once per token)."""

    def __init__(self, p: SamplingParams, seed: int):
        self.key = mx.random.key(seed & 0xFFFFFFFFFFFFFFFF)
        self.temperature = float(p.temperature)
        self.top_k = int(p.top_k)
        self.top_p = float(p.top_p)
        self.min_p = float(p.min_p)

    def __call__(self, logprobs: mx.array) -> mx.array:
        """Sample one row (the batch path is :func:`sample_rows`; this is the same for a batch of one)."""
        return sample_rows(logprobs, [self])


def _split_keys(keys: mx.array) -> tuple[mx.array, mx.array]:
    """(next keys, uniforms) of a stack of keys: ``mx.random.split`` then ``uniform(key=sub)`` per row."""
    pairs = _vsplit(keys)
    return pairs[:, 0], _vuniform(pairs[:, 1])


_vsplit = mx.vmap(lambda k: mx.random.split(k))
_vuniform = mx.vmap(lambda k: mx.random.uniform(key=k))


def sample_rows(logprobs: mx.array, samplers: list) -> mx.array:
    """Tokens (uint32, one per row) for a step: greedy rows argmax, keyed rows in one batched call.

    ``samplers[i]`` is row i's sampler: ``greedy_sampler``, a :class:`KeyedSampler`
    (each advances its key by one split), or any other callable (called on its row).
    """
    n = len(samplers)
    keyed = [i for i, s in enumerate(samplers) if isinstance(s, KeyedSampler)]
    if not keyed:
        if all(s is greedy_sampler for s in samplers):
            return greedy_sampler(logprobs)
        return mx.concatenate([s(logprobs[i:i + 1]) for i, s in enumerate(samplers)], axis=0)
    rows = [samplers[i] for i in keyed]
    keys = mx.stack([s.key for s in rows])
    new_keys, uniforms = _split_keys(keys)
    for j, s in enumerate(rows):
        s.key = new_keys[j]
    sub = logprobs if len(keyed) == n else logprobs[mx.array(keyed)]
    toks = batch_sampler.sample(
        sub,
        mx.array([s.temperature for s in rows], dtype=mx.float32),
        mx.array([s.top_k for s in rows], dtype=mx.int32),
        mx.array([s.top_p for s in rows], dtype=mx.float32),
        mx.array([s.min_p for s in rows], dtype=mx.float32),
        uniforms,
    ).astype(mx.uint32)
    if len(keyed) == n:
        return toks
    others = [i for i, s in enumerate(samplers) if not isinstance(s, KeyedSampler)]
    if all(samplers[i] is greedy_sampler for i in others):  # the greedy rows: one argmax
        greedy = mx.argmax(logprobs, axis=-1).astype(mx.uint32)
        return mx.where(_mask(n, keyed), _scatter(n, keyed, toks), greedy)
    pos = {i: j for j, i in enumerate(keyed)}
    return mx.concatenate([toks[pos[i]:pos[i] + 1] if i in pos else samplers[i](logprobs[i:i + 1]).astype(mx.uint32)
                           for i in range(n)], axis=0)


def _mask(n: int, rows: list[int]) -> mx.array:
    m = [False] * n
    for i in rows:
        m[i] = True
    return mx.array(m)


def _scatter(n: int, rows: list[int], values: mx.array) -> mx.array:
    """A length-n vector with ``values`` at ``rows`` (0 elsewhere)."""
    return mx.zeros((n,), dtype=values.dtype).at[mx.array(rows)].add(values)


def for_positions(sampler, m: int) -> list:
    """``m`` samplers for ``m`` positions of one row sampled in one step (a speculative verify): a keyed sampler's
    key is split into m fresh keys (its own advances once), so every position draws its own uniform; other
    samplers (greedy) are shared. ``m == 1`` is the sampler itself: its stream is the one of plain decoding."""
    if m == 1 or not isinstance(sampler, KeyedSampler):
        return [sampler] * m
    keys = mx.random.split(sampler.key, m + 1)
    sampler.key = keys[0]
    out = []
    for j in range(m):
        c = copy.copy(sampler)
        c.key = keys[j + 1]
        out.append(c)
    return out


class BatchSampler:
    """The callable the generation batch uses for a step with keyed rows: every row in one call."""

    def __init__(self, samplers: list):
        self.samplers = samplers

    def __call__(self, logprobs: mx.array) -> mx.array:
        return sample_rows(logprobs, self.samplers)


def make_sampler(p: SamplingParams, default_seed: Optional[int] = None) -> Sampler:
    """Greedy (one shared function, so an all-greedy batch samples in one call) or keyed."""
    if p.temperature < GREEDY_BELOW_TEMPERATURE:
        return greedy_sampler
    seed = p.seed if p.seed is not None else default_seed
    return KeyedSampler(p, seed if seed is not None else random.getrandbits(63))


def make_logits_processors(p: SamplingParams, prompt_len: int) -> list[LogitsProcessor]:
    """Processors see (context tokens = prompt + generated so far, logits of shape (1, V)).

    The grammar's processor (``constrain.py``) is appended after these by the engine: it runs last."""
    procs: list[LogitsProcessor] = []
    if p.logit_bias:  # first, as OpenAI adds it to the model's logits
        ids = mx.array(list(p.logit_bias), dtype=mx.int32)
        bias = mx.array(list(p.logit_bias.values()), dtype=mx.float32)

        def logit_bias(tokens: mx.array, logits: mx.array) -> mx.array:
            return logits.at[:, ids].add(bias.astype(logits.dtype))

        procs.append(logit_bias)
    if p.repetition_penalty != 1.0:
        # Any penalty > 0 is valid (vLLM, HF), but 5e-324 is 0 in float32 and 0/0 is NaN: keep
        # the penalty a normal float32 and the penalized logits finite in the logits' dtype.
        rp = min(max(p.repetition_penalty, _F32_TINY), _F32_MAX)

        def repetition(tokens: mx.array, logits: mx.array) -> mx.array:
            if tokens.size == 0:
                return logits
            sel = logits[:, tokens].astype(mx.float32)
            big = float(mx.finfo(logits.dtype).max)
            pen = mx.clip(mx.where(sel < 0, sel * rp, sel / rp), -big, big)
            logits[:, tokens] = pen.astype(logits.dtype)
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
