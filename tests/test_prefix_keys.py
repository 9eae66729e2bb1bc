"""Prefix-cache keys: no colliding key shares KV computed for another prefix, and a waiting prompt is hashed once.

Collisions are forced by replacing ``BlockPrefixCache.key`` (a SHA-256 collision cannot be
crafted); every block's KV is recorded as the token prefix it was computed for, and every hit
must be computed for exactly the prompt's own prefix.
"""

from __future__ import annotations

import random

import mlx.core as mx
import pytest

from mlx_ray.engine import block_prefix
from mlx_ray.engine.block_prefix import BlockPrefixCache
from mlx_ray.engine.kv_pool import KVPool, LayerShape
from mlx_ray.engine.paged import PagedBatch
from mlx_ray.engine.protocol import EngineConfig, GenerationRequest, SamplingParams
from mlx_ray.engine.scheduler import Scheduler, Seq

BS = 4
REAL_KEY = BlockPrefixCache.key


def _pool(blocks=64):
    return KVPool([LayerShape(2, 64)], mx.float32, blocks, BS)


class _Kept:
    """A prefix cache and, for each block inserted, the tokens its KV was computed for (positions 0..end)."""

    def __init__(self, blocks=64):
        self.pool = _pool(blocks)
        self.cache = BlockPrefixCache(self.pool, max_blocks=blocks)
        self.computed_for: dict[int, list[int]] = {}

    def finish(self, tokens: list[int]) -> list[int]:
        """A sequence over ``tokens`` finishes: its blocks go to the cache; the sequence lets go of them."""
        blocks = [self.pool.allocate() for _ in range(-(-len(tokens) // BS))]
        for i, b in enumerate(blocks):
            self.computed_for[b] = tokens[:(i + 1) * BS]
        self.cache.insert(tokens, blocks)
        for b in blocks:
            if not self.pool.decref(b):
                self.cache.release(b)
        return blocks

    def assert_sound(self, prompt: list[int]) -> tuple[list[int], object]:
        full, tail = self.cache.match(prompt)
        for i, b in enumerate(full):  # a shared block holds KV of exactly the prompt's prefix
            assert self.computed_for[b] == prompt[:(i + 1) * BS], f"block {b} holds another prefix's KV"
        if tail is not None:  # the copied tail's tokens were computed after the same prefix
            b, n = tail
            end = len(full) * BS + n
            assert self.computed_for[b][:end] == prompt[:end], f"tail block {b} holds another prefix's KV"
        return full, tail


A0, B0 = [1, 2, 3, 4], [5, 6, 7, 8]


def _b0_collides_with_a0(parent, tokens):
    return REAL_KEY(parent, tuple(A0) if list(tokens) == B0 else tokens)


@pytest.mark.parametrize("rest", [[30, 31, 32, 33, 40, 41], [40, 41]], ids=["full-block", "partial-block"])
def test_a_colliding_key_never_hands_a_prompt_another_prefixs_blocks(monkeypatch, rest):
    """B's first block gets the key of A's first block (a crafted collision): B's later blocks must
    not be kept under A's, where A's next turn with B's tokens would find KV computed after B0."""
    monkeypatch.setattr(BlockPrefixCache, "key", staticmethod(_b0_collides_with_a0))
    kept = _Kept()
    a = kept.finish(A0 + [10, 11, 12, 13, 20, 21])
    b = kept.finish(B0 + rest)
    full, tail = kept.assert_sound(A0 + rest + [99])  # A's next turn, with B's later tokens
    assert full == [a[0]] and tail is None
    assert not set(b) & set(kept.cache.by_block)  # nothing of B's is kept
    # A's chain is intact.
    full, tail = kept.assert_sound(A0 + [10, 11, 12, 13, 20, 21, 99])
    assert full == a[:2] and tail == (a[2], 2)


@pytest.mark.parametrize("key", [lambda parent, tokens: b"\1" * 32, lambda parent, tokens: b"\0" * 32,
                                 lambda parent, tokens: REAL_KEY(parent, tokens[:1])],
                         ids=["every-key-the-same", "every-key-the-root", "keyed-by-first-token"])
def test_no_hit_is_computed_for_another_prefix_whatever_the_keys_collide(monkeypatch, key):
    monkeypatch.setattr(BlockPrefixCache, "key", staticmethod(key))
    rng = random.Random(0)
    kept = _Kept(blocks=512)
    seqs = [[rng.randrange(3) for _ in range(rng.randrange(1, 14))] for _ in range(60)]
    for s in seqs:
        kept.finish(s)
    hits = 0
    for s in seqs + [[rng.randrange(3) for _ in range(rng.randrange(2, 14))] for _ in range(200)]:
        full, tail = kept.assert_sound(s + [rng.randrange(3)])
        hits += bool(full or tail)
    assert hits  # the cache still serves the prefixes it was given


def test_keys_are_sha256_over_the_chain_and_differ_where_python_hash_collides():
    k = BlockPrefixCache.key(block_prefix._ROOT, (1, 2, 3, 4))
    assert isinstance(k, bytes) and len(k) == 32
    assert BlockPrefixCache.key(k, (1, 2, 3, 4)) != k  # the parent is part of the key
    assert hash(-1) == hash(-2)  # CPython: so hash((parent, tokens)) collides for these blocks
    assert BlockPrefixCache.key(k, (1, 2, 3, -1)) != BlockPrefixCache.key(k, (1, 2, 3, -2))


# ------------------------------------------------------------------ the scheduler under backlog
def _seq(i: int, prompt: list[int], max_tokens: int) -> Seq:
    req = GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return Seq(req, loop=None, deliver=lambda ev: None, text=None, sampler=None, processors=[], stop_ids=set(),
               reserve=len(prompt) + max_tokens)


def test_a_waiting_prompt_is_hashed_once_however_many_admission_passes_it_waits(monkeypatch):
    calls = []

    def counting(parent, tokens):
        calls.append(tuple(tokens))
        return REAL_KEY(parent, tokens)

    monkeypatch.setattr(BlockPrefixCache, "key", staticmethod(counting))
    pool = _pool(blocks=16)  # 15 usable (one is the trash block)
    backend = PagedBatch(None, pool, prefix_blocks=8, prefill_chunk=16, max_rows=8)
    sched = Scheduler(backend, EngineConfig(max_num_seqs=8), kv_budget=0)
    hog = _seq(0, list(range(100, 140)), 8)  # 12 blocks: the rest of the queue waits for them
    backlog = [_seq(i, [1000 * i + t for t in range(20)], 4) for i in range(1, 11)]  # 6 blocks each
    sched.waiting.extend([hog] + backlog)

    per_pass = []
    for _ in range(4):
        before = len(calls)
        sched._admit()  # the head waits; every waiting prompt is looked at for backfilling
        per_pass.append(len(calls) - before)
    assert list(sched.active.values()) == [hog] and list(sched.waiting) == backlog
    assert per_pass[0] > 0 and per_pass[1:] == [0, 0, 0], per_pass
    # Each prompt's blocks were hashed once in all: the full blocks before its last token.
    assert len(calls) == sum((len(s.req.prompt_token_ids) - 1) // BS for s in [hog] + backlog)
