"""The speculative step of the paged batch: plan, draft, verify every drafting row in one forward, read back.

A verify step is one forward of the target over *virtual rows*: a row that drafted k tokens
contributes k + 1 of them (its last token, then each drafted token, at consecutive positions), a row
that does not draft contributes one, as in a plain decode step. Each virtual row is a decode query
(L = 1) with its own position, RoPE offset and context length, reading the row's own block table: a
layer writes the K/V of every virtual row before any of them attends, so the query at draft
position j sees the drafted tokens before it, causally, through the same paged-attention kernels a
decode step uses (no padding, no new kernel).

Each position is then sampled as decoding would sample it: the row's logits processors (logit_bias,
penalties, its grammar) applied on the context the position has (its tokens plus the drafted tokens
before it), the row's sampler (greedy: argmax; keyed: its own uniform a position). The host accepts
the longest prefix of the draft that equals those samples and emits it plus the sample after it (a
correction, or the bonus token when all k were accepted): greedy rows give exactly plain decoding's
tokens, sampled rows the target's distribution (rejection sampling with a point-mass draft, see
``spec/__init__.py``).

KV of rejected positions is rolled back: the row's length (``n_kv``) counts only accepted tokens, and
blocks that held only rejected positions go back to the pool (and to the row's reservation, so
admission's accounting is unchanged). The prefix cache only ever sees ``tokens[:n_kv]``.

A verify step needs the previous step's tokens on the host (the drafts continue them), so it is built
after reading them; plain steps keep the pipelined path of ``paged.py``.
"""

from __future__ import annotations

import time
from typing import Optional

import mlx.core as mx

from ..sampling import for_positions, sample_rows
from .controller import Controller, DraftCost, calibrate


class Speculator:
    """Proposer + controller, and the verify step on a ``PagedBatch``."""

    def __init__(self, proposer, controller: Controller):
        self.proposer, self.controller = proposer, controller
        self._seq = 0  # steps handed out (plain and verify), for the cost samples
        self._last_read: Optional[tuple[int, float]] = None  # (seq, time) of the last step read
        self.prefilled = 0  # the seq of the last step that shared its iteration with a prefill chunk
        self._interval: Optional[tuple[int, float]] = None  # (seq, seconds) of the last clean cost sample

    # -- the batch's hooks ----------------------------------------------------------------------
    def stamp(self, step, sync: bool, prefilled: bool) -> None:
        """Give a queued step its sequence number and cost features."""
        self._seq += 1
        step.seq, step.sync = self._seq, sync
        step.n_tokens = len(step.tokens) if step.tokens.ndim else 1
        if prefilled:
            self.prefilled = self._seq

    def read_time(self, step) -> None:
        """A step's results are on the host: one cost sample (time since the previous step's results), when clean."""
        now = time.perf_counter()
        last, self._last_read = self._last_read, (step.seq, now)
        if last is None or step.seq != last[0] + 1 or self.prefilled >= step.seq - 1:
            return  # an idle gap, or a prefill chunk shared the time
        self._interval = (step.seq, now - last[1])
        self.controller.step_cost(step.n_tokens, step.sync, now - last[1] - step.draft_s)

    def emitted(self, step, n: int) -> None:
        """A planned verify step's ``n`` tokens are read: what it delivered against what the plan promised."""
        got = self._interval
        if step.predicted and got is not None and got[0] == step.seq and got[1] > 0:
            self.controller.realized(len(step.rows), step.predicted, n / got[1])

    def forget(self, uid: int) -> None:
        self.proposer.forget(uid)
        self.controller.forget(uid)

    def copy_block(self, src: int, dst: int, n: int) -> None:
        """The batch copied a cached block's first ``n`` slots (copy-on-write): a proposer with its own KV too."""
        hook = getattr(self.proposer, "copy_block", None)
        if hook is not None:
            hook(src, dst, n)

    def reset(self) -> None:
        """After a failed step: every row is gone (the cost model stays: the device did not change)."""
        for uid in list(self.controller.rows):
            self.forget(uid)
        self._last_read = None

    def step(self, batch, prev, prefilled: bool):
        """The step when it speculates (or must read a verify step first): (in-flight step or None, responses);
        None: no row speculates, the batch takes its plain pipelined path."""
        rows = batch.decodable()
        forced = prev is not None and prev.drafts is not None
        likely = self.proposer.likely  # on the tokens the host has: asking a row without a likely draft would cost
        behind = getattr(self.proposer, "behind", None)  # a read of the previous step for nothing
        plan = self.controller.plan([(r.uid, r.max_tokens - r.generated - 1 if likely(r.uid, r.tokens) else 0,
                                      behind(r.uid, r.tokens) if behind else 0) for r in rows], forced)
        if not plan and not forced:
            return None
        out = batch._read(prev) if prev is not None else []
        rows = batch.decodable()  # reading may have finished rows
        if not rows:
            mx.async_eval(batch.pool.arrays())
            return None, out
        asks = []
        for r in rows:
            k = min(plan.get(r.uid, 0), r.max_tokens - r.generated - 1)
            if k > 0:
                asks.append((r.uid, r.tokens, k))
        t0 = time.perf_counter()
        drafts = self.proposer.propose(asks) if asks else {}
        drafted_s = time.perf_counter() - t0
        if asks:
            self.controller.draft_cost(getattr(self.proposer, "widths", []), len(asks), drafted_s)
        for uid, _, _ in asks:
            self.controller.asked(uid, bool(drafts.get(uid)))
        for r in rows:  # a grammar's row drafts only what its grammar allows
            d = drafts.get(r.uid)
            if d:
                for p in r.processors:
                    if hasattr(p, "valid_draft"):
                        d = d[:p.valid_draft(r.tokens, d)]
                if d:
                    drafts[r.uid] = d
                else:
                    del drafts[r.uid]
        if not drafts:
            step, _ = batch._queue(rows, None)
        else:
            step = self._queue(batch, rows, drafts)
        self.stamp(step, True, prefilled)
        step.draft_s = drafted_s  # measured on its own: kept out of this step's cost sample
        if step.drafts is not None:
            step.predicted = self.controller.promised
        return step, out

    # -- the verify step -------------------------------------------------------------------------
    def _queue(self, batch, rows, drafts: dict[int, list[int]]):
        from ..paged import _InFlight  # the batch's own record of a queued step

        bs = batch.pool.block_size
        inputs, slots, tables, lens, offsets, loras, index = [], [], [], [], [], [], {}
        for r in rows:
            d = drafts.get(r.uid, [])
            batch._ensure_blocks(r, r.n_kv + len(d) + 1)
            index[r.uid] = len(inputs)
            for j, t in enumerate([r.tokens[-1]] + d):
                p = r.n_kv + j
                inputs.append(t)
                slots.append(r.blocks[p // bs] * bs + p % bs)
                tables.append(r.blocks)
                lens.append(p + 1)
                offsets.append(p)
                loras.append(r.lora)
        logits = batch._forward(mx.array(inputs, dtype=mx.uint32)[:, None], slots, tables, lens,
                                mx.array(offsets, dtype=mx.int32), loras)[:, -1, :]
        tokens, logprobs = sample_positions(logits, rows, drafts, index)
        mx.async_eval(tokens, logprobs, *batch.pool.arrays())
        for r in rows:
            r.n_kv += 1  # its last token's K/V is written whatever is accepted
            r.generated += 1
            r.final = r.generated >= r.max_tokens  # never for a drafting row (k <= max_tokens - generated - 1)
        return _InFlight(rows, tokens, logprobs, index, [r.final for r in rows],
                         drafts={u: d for u, d in drafts.items()})

    def accept(self, batch, step, i: int, row, toks: list[int]) -> list[int]:
        """The tokens row ``i`` of a verify step emits, its KV rolled back to them; the row's accounting updated."""
        o, d = step.index[row.uid], step.drafts.get(row.uid, ())
        a = accepted(toks, o, d)
        if d:
            self.controller.verified(row.uid, len(d), a)
            row.n_kv += a
            row.generated += a
            row.final = row.generated >= row.max_tokens
            batch._release_blocks_after(row, row.n_kv + 1)
        return toks[o:o + a + 1]

    def stats(self) -> dict:
        return {**self.controller.stats(), **self.proposer.stats()}

    def reset_counters(self) -> None:
        self.controller.reset_counters()


def sample_positions(logits: mx.array, rows, drafts: dict[int, list[int]], index: dict[int, int]):
    """(tokens [N], logprobs [N, V]) of a verify step's positions, lazily: ``logits`` [N, V] are the raw logits of
    every position (row r's at ``index[r.uid]`` onwards, ``len(drafts[r.uid]) + 1`` of them); each position gets
    its row's processors on its own context (the row's tokens and the drafted tokens before it) and its own
    draw of the row's sampler: what plain decoding would compute there."""
    if any(r.processors for r in rows):
        parts = []
        for r in rows:
            o, d = index[r.uid], drafts.get(r.uid, [])
            for j in range(len(d) + 1):
                x = logits[o + j:o + j + 1]
                if r.processors:
                    ctx = mx.array(r.tokens + d[:j], dtype=mx.int32)
                    for p in r.processors:
                        x = p(ctx, x)
                parts.append(x)
        logits = mx.concatenate(parts, axis=0)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    samplers = []
    for r in rows:
        samplers += for_positions(r.sampler, len(drafts.get(r.uid, [])) + 1)
    return sample_rows(logprobs, samplers), logprobs


def accepted(toks: list[int], o: int, draft) -> int:
    """How many drafted tokens the samples at ``toks[o:]`` accept: the longest prefix of ``draft`` they equal."""
    a = 0
    while a < len(draft) and toks[o + a] == draft[a]:
        a += 1
    return a


def calibrated(batch, controller: Controller, proposer=None) -> None:
    """Fit ``controller``'s cost priors on this device: forwards of n decode queries on the trash block, of the
    target and of ``proposer``'s draft model when it has one."""
    bs, trash = batch.pool.block_size, batch.trash

    def run(n: int) -> float:
        t0 = time.perf_counter()
        logits = batch._forward(mx.zeros((n, 1), dtype=mx.uint32), [trash * bs + (j % bs) for j in range(n)],
                                [[trash]] * n, [1 + j % bs for j in range(n)],
                                mx.array([j % bs for j in range(n)], dtype=mx.int32), [0] * n)[:, -1, :]
        mx.eval(mx.argmax(logits, axis=-1), *batch.pool.arrays())
        return time.perf_counter() - t0

    controller.cost = calibrate(run)
    draft_run = getattr(proposer, "timed_forward", None) if proposer is not None else None
    if draft_run is not None:  # a draft model: its forward's line too (``DraftCost``)
        line = calibrate(lambda n: draft_run(batch, n))
        controller.draft = DraftCost(line.a, line.b)
