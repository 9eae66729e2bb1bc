"""The engine's own batch step over a paged KV cache (``kv_pool.py``), on mlx-lm's model files.

mlx-lm's models call ``cache.update_and_fetch(keys, values)`` and then their
module's ``scaled_dot_product_attention(q, k, v, cache=cache, ...)``. Here the
cache handed to each layer is a :class:`LayerView` of this step: its
``update_and_fetch`` writes the new K/V into the pool at the rows' slots, and
``scaled_dot_product_attention`` (rebound in the model modules by
:func:`patch_attention`; any other cache passes through to mlx-lm's own) sends
a view's layer to ``kernels.paged_attention``, which reads K/V in place
through the block tables. No architecture is copied: a model whose attention
does not go this way fails the load-time probe (``probe``) and the engine
keeps the rectangular batch cache for it (``batching.py``).

A step is: at most ``prefill_chunk`` prompt tokens of the prompts being
prefilled (up to ``MAX_PREFILL_ROWS`` of them in one padded forward; a chunk
attends to its own cached prefix through the block table), then one decode
step of every running row (B rows, L = 1). A prompt's last token is not
prefilled: it is the row's first decode input, so a new row costs no forward
of its own and a prefix-cache hit that covers all but the last token joins at
once. Joining and leaving the batch copies no KV: a row is its block table.

Steps are pipelined as mlx-lm's generators are: a step's graph is built on the
previous step's *lazy* tokens and handed to ``mx.async_eval``, and only then
are the previous step's tokens read on the host, so building step t+1 (Python,
30 layers of graph) overlaps computing step t. What the host learns late costs
one row-step: a row that sampled a stop token has already been put in the
next step, whose result for it is dropped. Rows with logits processors
(penalties, grammars) need their context on the host, but only for the
processors: the forward of every row, theirs included, is still built on the
previous step's lazy tokens and queued first; only then does the host read
the previous tokens, apply the processors and queue the sampling. So one such
row costs the batch no overlap of its forward, only the (short) sampling tail.

With LoRA adapters (``lora.py``), every forward first tells the adapted layers each row's adapter
slot (``Row.lora``, 0: none), prefill chunks and decode steps alike: rows of different adapters and
rows of none share one forward.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx

from ..kernels import paged_attention as pa
from .block_prefix import ROOT, BlockPrefixCache
from .kv_pool import KVPool, LayerShape
from .sampling import sample_rows

log = logging.getLogger(__name__)

BLOCK_SIZE = 32  # tokens a block (vLLM: 16); larger blocks cut table work in the kernels, waste <= 31 tokens a row
MAX_PREFILL_ROWS = 8  # prompts prefilled together in one forward (as mlx-lm's prefill batch)


# ------------------------------------------------------------------ the model's view
class StepState:
    """What every layer of one forward needs: the slots to write and the block tables to read."""

    def __init__(self, pool: KVPool, slots: mx.array, block_tables: mx.array, context_lens: mx.array, offset):
        self.pool, self.slots, self.block_tables, self.context_lens, self.offset = \
            pool, slots, block_tables, context_lens, offset


class LayerView:
    """The cache object a layer sees during one paged forward."""

    def __init__(self, step: StepState, layer: int):
        self.step, self.layer = step, layer

    @property
    def offset(self):  # RoPE positions: an int (one prompt chunk) or [B] (decode rows)
        return self.step.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.step.pool.write(self.layer, self.step.slots, keys, values)
        return keys, values

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        if window_size is not None:
            raise NotImplementedError("sliding-window attention is not paged")
        return None  # causality comes from the context lengths

    def attend(self, queries: mx.array, scale: float, sinks=None) -> mx.array:
        if sinks is not None:
            raise NotImplementedError("attention sinks are not paged")
        st, pool = self.step, self.step.pool
        return pa.paged_attention(queries, pool.k[self.layer], pool.v[self.layer], st.block_tables, st.context_lens,
                                  scale=scale, block_size=pool.block_size, bits=pool.bits,
                                  group_size=pool.group_size)


_ORIGINAL = "_mlx_ray_original_sdpa"


def _dispatching(original: Callable) -> Callable:
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None, **kw):
        if isinstance(cache, LayerView):
            return cache.attend(queries, scale, sinks)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks, **kw)

    setattr(scaled_dot_product_attention, _ORIGINAL, original)
    return scaled_dot_product_attention


def patch_attention() -> int:
    """Rebind ``scaled_dot_product_attention`` in every loaded mlx-lm model module (idempotent)."""
    from mlx_lm.models import base

    original = base.scaled_dot_product_attention  # base itself is never rebound
    n = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith("mlx_lm.models.") or mod is None or mod is base:
            continue
        if getattr(mod, "scaled_dot_product_attention", None) is original:
            setattr(mod, "scaled_dot_product_attention", _dispatching(original))
            n += 1
    return n


def forward(model, pool: KVPool, inputs: mx.array, slots: list[int], tables: list[list[int]], lens: list[int],
            offset) -> mx.array:
    """``model`` over ``inputs`` ([B, L]) with its K/V in ``pool``: written at ``slots``, read through ``tables``."""
    width = max(len(t) for t in tables)
    bt = mx.array([t + [0] * (width - len(t)) for t in tables], dtype=mx.int32)
    step = StepState(pool, mx.array(slots, dtype=mx.int32), bt, mx.array(lens, dtype=mx.int32), offset)
    return model(inputs, cache=[LayerView(step, i) for i in range(len(pool.shapes))])


# ------------------------------------------------------------------ rows
@dataclass
class Row:
    uid: int
    tokens: list[int]  # prompt + generated so far
    max_tokens: int
    sampler: Any
    processors: list
    unallocated: int  # blocks reserved at admission (prompt + max_tokens, less shared ones) not yet allocated
    blocks: list[int] = field(default_factory=list)
    n_kv: int = 0  # positions whose K/V is in the pool
    generated: int = 0  # tokens sampled, including one still in flight
    cached: int = 0
    final: bool = False  # its last token (max_tokens) is in flight: not decoded again
    lora: int = 0  # its LoRA adapter's slot (``lora.Slots``); 0: none
    root: bytes = ROOT  # its prefix-cache root key (an adapter's rows have their own)

    @property
    def prefilling(self) -> bool:
        return self.n_kv < len(self.tokens) - 1


@dataclass
class Response:
    """What the scheduler reads of a decoded token (the fields mlx-lm's BatchGenerator responses have)."""

    uid: int
    token: int
    logprobs: mx.array
    finish_reason: Optional[str]


@dataclass
class _InFlight:
    """A step handed to ``mx.async_eval`` whose tokens the host has not read yet."""

    rows: list[Row]
    tokens: mx.array  # [B] uint32, lazy
    logprobs: mx.array  # [B, V], lazy
    index: dict[int, int]  # uid -> row of ``tokens`` (a verify step: its first position)
    final: list[bool]  # this token is the row's last (max_tokens)
    drafts: Optional[dict[int, list[int]]] = None  # a verify step (``spec/verify.py``): uid -> its drafted tokens
    seq: int = 0  # with speculation: the step's number and cost features (``spec.verify.Speculator.stamp``)
    sync: bool = False
    n_tokens: int = 0
    draft_s: float = 0.0  # the proposer's time for this step (a verify step), kept out of its cost sample
    predicted: float = 0.0  # a planned verify step: the tokens/s the controller's model promised (0: none)


@dataclass
class Reservation:
    """When the head of the queue will fit (EASY backfilling's "shadow time"), and what is spare then.

    ``steps``: loop steps until running rows have finished enough to free the head's blocks (an
    upper bound: a row's steps left assume it runs to max_tokens); ``spare``: blocks free beyond
    the head's at that step."""

    steps: float
    spare: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------ the backend
class PagedBatch:
    """Rows, their blocks, and the step (the scheduler's backend for the paged cache)."""

    kind = "paged"
    first_is_prompt = False

    def __init__(self, model, pool: KVPool, prefix_blocks: int, prefill_chunk: int, max_rows: int):
        self.model, self.pool = model, pool
        self.prefix = BlockPrefixCache(pool, prefix_blocks)
        self.prefill_chunk, self.max_rows = prefill_chunk, max_rows
        self.rows: dict[int, Row] = {}
        self._next_uid = 0
        self.outstanding = 0  # blocks reserved by running rows but not yet allocated
        self.admit_copy_bytes = 0
        self.finish_copy_bytes = 0  # always 0: finishing drops references only
        self.trash = pool.allocate()  # never freed: where padded prefill positions write
        self._inflight: Optional[_InFlight] = None
        self.lora = None  # lora.State when the engine serves adapters: each forward's per-row slots
        self.spec = None  # spec.verify.Speculator when the engine speculates (``speculative`` in its config)

    # -- admission -----------------------------------------------------------------
    def available(self) -> int:
        return self.pool.num_free + len(self.prefix.evictable) - self.outstanding

    def fits_alone(self, tokens: int) -> bool:
        return _cdiv(tokens, self.pool.block_size) <= self.pool.num_blocks - 1  # less the trash block

    def try_insert(self, prompt: list[int], max_tokens: int, sampler, processors, lora: int = 0,
                   root: bytes = ROOT) -> Optional[tuple[int, int]]:
        """Admit a row when the blocks for its prompt plus max_tokens are free: (uid, cached tokens), else None.
        ``lora``: its adapter's slot; ``root``: its prefix-cache root (the adapter version's)."""
        row = self.insert_row(prompt, max_tokens, sampler, processors, lora, root)
        return None if row is None else (row.uid, row.cached)

    def insert_row(self, prompt: list[int], max_tokens: int, sampler, processors, lora: int = 0,
                   root: bytes = ROOT) -> Optional[Row]:
        bs = self.pool.block_size
        full, tail = self.prefix.match(prompt, root)
        need = _cdiv(len(prompt) + max_tokens, bs)
        fresh = need - len(full)
        # Shared blocks that sit in the evictable list are counted in available(): take them out.
        shared_evictable = sum(1 for b in full if b in self.prefix.evictable)
        if tail is not None and tail[0] in self.prefix.evictable:
            shared_evictable += 1  # pinned while we copy it
        if fresh > self.available() - shared_evictable:
            return None
        for b in full:
            self.pool.incref(b)
        self.prefix.touch(full)
        row = Row(self._next_uid, list(prompt), max_tokens, sampler, processors, fresh, blocks=list(full), lora=lora,
                  root=root)
        self._next_uid += 1
        row.n_kv = len(full) * bs
        self.outstanding += fresh
        if tail is not None:
            src, n = tail
            self.pool.incref(src)
            self.prefix.touch([src])
            dst = self._allocate(row)
            before = self.pool.copied_bytes
            self.pool.copy_block(src, dst, n)
            if self.spec is not None:
                self.spec.copy_block(src, dst, n)
            self.admit_copy_bytes += self.pool.copied_bytes - before
            self.pool.decref(src)
            self.prefix.release(src)
            row.n_kv += n
        row.cached = row.n_kv
        self.prefix.record(row.cached)
        self.rows[row.uid] = row
        return row

    def _need(self, prompt: list[int], max_tokens: int, root: bytes = ROOT) -> int:
        """Blocks a request would take from the pool now: prompt + max_tokens, less the cached full blocks."""
        full, _ = self.prefix.match(prompt, root)
        return _cdiv(len(prompt) + max_tokens, self.pool.block_size) - len(full)

    def _steps_left(self, row: Row) -> int:
        left = max(0, len(row.tokens) - 1 - row.n_kv)
        return _cdiv(left, self.prefill_chunk) + row.max_tokens - row.generated

    def reservation(self, prompt: list[int], max_tokens: int, root: bytes = ROOT) -> Reservation:
        """The head's reservation: the step by which the running rows will have freed its blocks."""
        need, avail = self._need(prompt, max_tokens, root), self.available()
        ends = sorted((self._steps_left(r), len(r.blocks) + r.unallocated) for r in self.rows.values())
        for steps, blocks in [(0, 0)] + ends:
            avail += blocks
            if avail >= need:
                return Reservation(steps, avail - need)
        return Reservation(0, 0)  # never, while these rows run (e.g. blocks pinned): no backfilling

    def try_backfill(self, res: Reservation, prompt: list[int], max_tokens: int, sampler,
                     processors, lora: int = 0, root: bytes = ROOT) -> Optional[tuple[int, int]]:
        """Admit a request behind the waiting head only if that cannot delay the head (EASY backfilling).

        It may start when its blocks are free now and either it will have finished by the head's
        reservation (``res.steps``; its own steps counted with its prefill sharing the chunk with
        every prompt now prefilling) or it fits in the blocks spare at that point (then taken from
        ``res.spare``). vLLM's and TGI's schedulers stop at the first request that does not fit; with
        long prompts of mixed length that leaves most of the pool idle behind one long prompt."""
        need = self._need(prompt, max_tokens, root)
        sharing = 1 + sum(r.prefilling for r in self.rows.values())
        steps = _cdiv(max(0, len(prompt) - 1), self.prefill_chunk) * sharing + max_tokens
        early = steps <= res.steps
        if not early and need > res.spare:
            return None
        got = self.try_insert(prompt, max_tokens, sampler, processors, lora, root)
        if got is not None and not early:
            res.spare -= need
        return got

    def _allocate(self, row: Row) -> int:
        while self.pool.num_free == 0 and self.prefix.evict_one():
            pass
        b = self.pool.allocate()
        row.blocks.append(b)
        if row.unallocated > 0:
            row.unallocated -= 1
            self.outstanding -= 1
        return b

    def remove(self, uids: list[int], keep_cache: bool = False) -> None:
        for uid in uids:
            row = self.rows.pop(uid, None)
            if row is None:
                continue
            if keep_cache and self.prefix.enabled and row.n_kv > 0:
                self.prefix.insert(row.tokens[:row.n_kv], row.blocks[:_cdiv(row.n_kv, self.pool.block_size)], row.root)
            self.outstanding -= row.unallocated
            for b in row.blocks:
                if not self.pool.decref(b):
                    self.prefix.release(b)
            if self.spec is not None:
                self.spec.forget(uid)

    def _release_blocks_after(self, row: Row, upto: int) -> None:
        """Give back the blocks that hold only positions ``>= upto`` (a verify step's rejected drafts): to the pool,
        and to the row's reservation. Such blocks were allocated for this row alone, never shared."""
        keep = _cdiv(upto, self.pool.block_size)
        while len(row.blocks) > keep:
            b = row.blocks.pop()
            if not self.pool.decref(b):
                self.prefix.release(b)
            row.unallocated += 1
            self.outstanding += 1

    # -- the step --------------------------------------------------------------------
    def _ensure_blocks(self, row: Row, upto: int) -> None:
        """Blocks for positions ``< upto``."""
        while len(row.blocks) * self.pool.block_size < upto:
            self._allocate(row)

    def _slots(self, row: Row, start: int, end: int) -> list[int]:
        bs, blocks = self.pool.block_size, row.blocks
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def _forward(self, inputs: mx.array, slots: list[int], tables: list[list[int]], lens: list[int], offset,
                 loras: list[int]):
        """The model over ``inputs`` ([B, L]); ``loras``: each row's adapter slot (0: none)."""
        if self.lora is None:
            return forward(self.model, self.pool, inputs, slots, tables, lens, offset)
        self.lora.set(loras)  # read by every adapted layer while the graph is built
        try:
            return forward(self.model, self.pool, inputs, slots, tables, lens, offset)
        finally:
            self.lora.clear()

    def _prefill(self) -> bool:
        """One forward over the next chunks of up to ``MAX_PREFILL_ROWS`` prompts (FIFO, ``prefill_chunk`` tokens).

        Chunks of different lengths are right-padded to the longest: a padding query only sees
        keys up to its own position, so it never touches a real query's result; its K/V lands in
        the row's own block past its real end (overwritten before any real query reads that
        position) or in the trash block. The padded area stays within 1.5x the token budget."""
        budget, chunks = self.prefill_chunk, []
        for row in self.rows.values():
            if budget <= 0 or len(chunks) >= MAX_PREFILL_ROWS:
                break
            if not row.prefilling:
                continue
            n = min(len(row.tokens) - 1 - row.n_kv, budget)
            if chunks and (len(chunks) + 1) * max(n, *(e - s for _, s, e in chunks)) > 1.5 * self.prefill_chunk:
                break
            chunks.append((row, row.n_kv, row.n_kv + n))
            budget -= n
        if not chunks:
            return False
        L, bs = max(e - s for _, s, e in chunks), self.pool.block_size
        inputs, slots, tables = [], [], []
        for row, start, end in chunks:
            self._ensure_blocks(row, end)
            table = row.blocks + [self.trash] * (_cdiv(start + L, bs) - len(row.blocks))
            inputs.append(row.tokens[start:end] + [0] * (L - (end - start)))
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + L)]
            tables.append(table)
        starts = [start for _, start, _ in chunks]
        offset = starts[0] if len(chunks) == 1 else mx.array(starts, dtype=mx.int32)
        # The logits are never needed, only the K/V writes. Queued on their own (async): in one graph with
        # the decode step that follows, MLX could not always update the pool in place and copied whole layers.
        self._forward(mx.array(inputs, dtype=mx.uint32), slots, tables, [s + L for s in starts], offset,
                      [row.lora for row, _, _ in chunks])
        mx.async_eval(self.pool.arrays())
        for row, _, end in chunks:
            row.n_kv = end
        return True

    def _decode_logits(self, rows: list[Row], inputs: Optional[mx.array] = None) -> mx.array:
        """[B, V] logits of every row's next token: its last token at position n_kv, K/V written there.

        ``inputs`` ([B] uint32, possibly lazy) are those last tokens when the host does not have them yet."""
        bs = self.pool.block_size
        for r in rows:
            self._ensure_blocks(r, r.n_kv + 1)
        slots = [r.blocks[r.n_kv // bs] * bs + r.n_kv % bs for r in rows]
        if inputs is None:
            inputs = mx.array([r.tokens[-1] for r in rows], dtype=mx.uint32)
        offsets = mx.array([r.n_kv for r in rows], dtype=mx.int32)
        return self._forward(inputs[:, None], slots, [r.blocks for r in rows], [r.n_kv + 1 for r in rows],
                             offsets, [r.lora for r in rows])[:, -1, :]

    def decodable(self) -> list[Row]:
        """The rows a step decodes: prefilled, their last token not in flight."""
        return [r for r in self.rows.values() if not r.prefilling and not r.final]

    def step(self) -> list[Response]:
        """Queue this step (prefill chunk + decode of every running row) and return the previous step's tokens."""
        prev, self._inflight = self._inflight, None
        out: list[Response] = []
        prefilled = self._prefill()
        if self.spec is not None:  # a speculative step, when the controller plans one (``spec/verify.py``)
            got = self.spec.step(self, prev, prefilled)
            if got is not None:
                self._inflight, out = got
                return out
        rows = self.decodable()
        if rows:
            self._inflight, read = self._queue(rows, prev)
            if self.spec is not None:
                self.spec.stamp(self._inflight, read is not None, prefilled)
            if read is not None:  # the processors needed the previous tokens: already read
                out, prev = read, None
        else:
            mx.async_eval(self.pool.arrays())  # a prefill-only step
        if prev is not None:
            out = self._read(prev)
        return out

    def _queue(self, rows: list[Row], prev: Optional[_InFlight]) -> tuple[_InFlight, Optional[list[Response]]]:
        """Queue the decode of ``rows`` on ``prev``'s lazy tokens; (the step, ``prev``'s responses if they had to
        be read here, else None).

        Every row's forward is built and queued before the host waits for anything. Only a row with logits
        processors whose last token is still in flight (in ``prev``) needs that token on the host: then, and
        only after the forward is queued, ``prev`` is read, the processors run on the rows' contexts, and the
        sampling of the whole batch is queued."""
        # Rows of the previous step first (their inputs are its lazy tokens), then rows the host knows.
        if prev is not None:
            rows = [r for r in rows if r.uid in prev.index] + [r for r in rows if r.uid not in prev.index]
            carried = [prev.index[r.uid] for r in rows if r.uid in prev.index]
            known = [r.tokens[-1] for r in rows[len(carried):]]
            parts = [prev.tokens[mx.array(carried, dtype=mx.int32)]] if carried else []
            if known:
                parts.append(mx.array(known, dtype=mx.uint32))
            inputs = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        else:
            inputs = None
        logits = self._decode_logits(rows, inputs)
        read = None
        if prev is not None and any(r.processors and r.uid in prev.index for r in rows):
            # This step's forward runs (on the previous step's lazy tokens) while the host waits for them.
            mx.async_eval(logits, *self.pool.arrays())
            read = self._read(prev)  # appends each row's previous token: the processors' context
        if any(r.processors for r in rows):
            parts = []
            for i, r in enumerate(rows):
                row = logits[i:i + 1]
                if r.processors:
                    ctx = mx.array(r.tokens, dtype=mx.int32)
                    for p in r.processors:
                        row = p(ctx, row)
                parts.append(row)
            logits = mx.concatenate(parts, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = sample_rows(logprobs, [r.sampler for r in rows])
        mx.async_eval(tokens, logprobs, *self.pool.arrays())
        for r in rows:
            r.n_kv += 1
            r.generated += 1
            r.final = r.generated >= r.max_tokens
        return _InFlight(rows, tokens, logprobs, {r.uid: i for i, r in enumerate(rows)}, [r.final for r in rows]), read

    def _read(self, step: _InFlight) -> list[Response]:
        """The host side of a queued step: its tokens, for the rows still in the batch."""
        out = []
        toks = step.tokens.tolist()
        if self.spec is not None:
            self.spec.read_time(step)
        for i, r in enumerate(step.rows):
            if self.rows.get(r.uid) is not r:  # removed (stop token, cancel, deadline) while in flight
                continue
            if step.drafts is None:
                emitted, final = [toks[i]], step.final[i]
            else:  # a verify step: the accepted drafts and the token after them
                emitted, final = self.spec.accept(self, step, i, r, toks), r.final
            o = step.index[r.uid]
            for j, t in enumerate(emitted):
                r.tokens.append(t)
                done = "length" if final and j == len(emitted) - 1 else None
                out.append(Response(r.uid, t, step.logprobs[o + j], done))
            if final:
                self.remove([r.uid], keep_cache=True)
        if self.spec is not None:
            self.spec.emitted(step, len(out))
        return out

    def score(self, ids: list[int]) -> mx.array:
        """[len(ids), V] logits of every position, computed through the pool (teacher forcing, one chunk).

        What the parity harness uses to measure the quantized KV cache: each position attends to K/V
        as stored (quantized with ``bits``), exactly as decode would read them."""
        row = self.insert_row(list(ids) + [0], 0, None, [])
        if row is None:
            raise ValueError(f"{len(ids)} tokens do not fit in the pool")
        try:
            self._ensure_blocks(row, len(ids))
            logits = self._forward(mx.array([ids], dtype=mx.uint32), self._slots(row, 0, len(ids)), [row.blocks],
                                   [len(ids)], 0, [0])[0]
            mx.eval(logits)
            return logits
        finally:
            self.remove([row.uid])

    # -- lifecycle / stats -------------------------------------------------------------
    @property
    def prefix_enabled(self) -> bool:
        return self.prefix.enabled

    def close(self) -> None:
        self.remove(list(self.rows))
        self.prefix.clear()

    def reset_counters(self) -> None:
        """The prefix cache's hit and the copy counters back to zero (its entries kept)."""
        self.prefix.reset_counters()
        if self.spec is not None:
            self.spec.reset_counters()
        self.pool.copied_bytes = self.admit_copy_bytes = self.finish_copy_bytes = 0

    def reset(self) -> None:
        """After a failed step: the pool may hold half-written layers, so every block starts over.

        The old pool is freed before the new one is allocated, so recovery never holds 2x the KV budget
        (a failed step is often a failed allocation: memory is short exactly then). Its arrays are held
        by the pool and by the failed step's lazy graph, which the exception being handled keeps alive in
        its traceback's frames: the traceback is logged at debug level, then dropped from the exception."""
        self.rows.clear()
        self._inflight = None
        self.outstanding = 0
        if self.spec is not None:
            self.spec.reset()
        self.prefix = BlockPrefixCache(self.pool, self.prefix.max_blocks)
        exc, seen = sys.exc_info()[1], set()
        if exc is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("the failed step:\n%s", "".join(traceback.format_exception(exc)))
        while exc is not None and id(exc) not in seen:  # the failure being handled, and what it chains
            seen.add(id(exc))
            traceback.clear_frames(exc.__traceback__)
            exc.__traceback__ = None  # cleared frames alone did not let go of the graph (CPython 3.11)
            exc = exc.__cause__ or exc.__context__
        self.pool.k, self.pool.v = [], []
        with contextlib.suppress(Exception):  # work still queued on the old arrays holds them until it ends
            mx.synchronize()
        gc.collect()
        mx.clear_cache()
        self.pool.reset()
        self.trash = self.pool.allocate()

    @property
    def used_blocks(self) -> int:
        return self.pool.num_blocks - 1 - self.pool.num_free

    def stats(self) -> dict:
        p = self.pool
        return dict(
            kv_cache="paged",
            kv_bits=p.bits,
            kv_block_size=p.block_size,
            kv_blocks_total=p.num_blocks - 1,
            kv_blocks_used=self.used_blocks - len(self.prefix.evictable),
            kv_blocks_cached=len(self.prefix),
            kv_blocks_free=p.num_free + len(self.prefix.evictable),
            kv_bytes_used=(self.used_blocks - len(self.prefix.evictable)) * p.block_bytes,
            kv_copy_bytes_total=p.copied_bytes,
            kv_admit_copy_bytes_total=self.admit_copy_bytes,
            kv_finish_copy_bytes_total=self.finish_copy_bytes,
            prefix_hits=self.prefix.hits,
            prefix_misses=self.prefix.misses,
            prefix_hit_tokens=self.prefix.hit_tokens,
            prefix_cache_bytes=len(self.prefix) * p.block_bytes,
            prefix_cache_budget_bytes=self.prefix.max_blocks * p.block_bytes,
            prefix_cache_entries=len(self.prefix),
            **(self.spec.stats() if self.spec is not None else {}),
        )


# ------------------------------------------------------------------ building it
def layer_shapes(model) -> tuple[list[LayerShape], mx.Dtype]:
    """Each layer's (KV heads, head dim) and the cache dtype, from a 1-token forward with mlx-lm's cache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    shapes, dtype = [], None
    for c in cache:
        k = c.keys
        shapes.append(LayerShape(k.shape[1], k.shape[3]))
        dtype = k.dtype
    return shapes, dtype


def unsupported(model) -> Optional[str]:
    """Why this model's cache cannot be paged (sliding windows, state caches), or None."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    kinds = {type(c).__name__ for c in make_prompt_cache(model) if type(c) is not KVCache}
    return f"its mlx-lm cache has {', '.join(sorted(kinds))} layers" if kinds else None


def check(model, shapes, dtype, bits: Optional[int], group_size: int) -> Optional[str]:
    """Run a short prompt through the paged step and through mlx-lm's own cache; why they differ, or None."""
    from mlx_lm.models.cache import make_prompt_cache

    vocab = model(mx.array([[0]]), cache=make_prompt_cache(model)).shape[-1]
    args = getattr(model, "args", None)
    vocab = min(vocab, getattr(args, "vocab_size", None) or vocab)  # embedding rows as well as logits
    toks = [t % vocab for t in (1, 17, 300, 4242, 9, 77, 1234, 5, 8)]  # any vocabulary, however small
    ref = model(mx.array([toks]), cache=make_prompt_cache(model))[0, -1].astype(mx.float32)
    patch_attention()
    pool = KVPool(shapes, dtype, num_blocks=4, block_size=4, bits=bits, group_size=group_size)
    batch = PagedBatch(model, pool, prefix_blocks=0, prefill_chunk=3, max_rows=2)
    row = batch.insert_row(toks, 1, None, [])
    while row.prefilling:
        batch._prefill()
    got = batch._decode_logits([row])[0].astype(mx.float32)
    err = mx.abs(got - ref).max().item()
    span = max(1e-6, mx.abs(ref).max().item())
    tol = 1e-3 if (dtype == mx.float32 and bits is None) else 5e-2
    if not err <= tol * span:
        return f"paged logits differ from mlx-lm's by {err:.3g} (max |logit| {span:.3g})"
    return None


def build(model, shapes: list[LayerShape], dtype: mx.Dtype, *, kv_budget: int, block_size: int,
          bits: Optional[int], group_size: int, prefix_bytes: int, prefill_chunk: int, max_rows: int,
          extra_block_bytes: int = 0) -> PagedBatch:
    """The pool (every block allocated now, ``kv_budget`` bytes at most) and its batch.

    ``extra_block_bytes``: what each block also costs elsewhere (a draft model's pool mirrors the block ids,
    ``spec/draft.py``): the budget is shared, so it holds fewer blocks and admission counts the draft's KV too."""
    patch_attention()
    block_bytes = KVPool(shapes, dtype, 1, block_size, bits, group_size).block_bytes
    pool = KVPool(shapes, dtype, kv_budget // (block_bytes + extra_block_bytes), block_size, bits, group_size)
    return PagedBatch(model, pool, prefix_bytes // (pool.block_bytes + extra_block_bytes), prefill_chunk, max_rows)
