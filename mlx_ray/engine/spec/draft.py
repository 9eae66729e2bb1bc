"""The draft-model proposer: a small model with the target's tokenizer, on its own paged KV.

Its pool mirrors the target's block ids: position p of a row has its draft K/V at the same slot as its
target K/V, in the draft's own per-layer arrays (``KVPool`` with the draft's layer shapes). So the
target's block accounting admits the draft's KV too: a block costs the target's bytes plus the
draft's, the budget holds fewer blocks (``paged.build``'s ``extra_block_bytes``), and a row never
allocates draft KV the admission did not count. Blocks freed, cached and copied on write (the
prefix cache) carry both.

The draft prefills every chunk the target prefills (``prefill``). To propose k tokens for rows it
first catches up (feeds the row's tokens its KV does not hold yet: after a verify, the correction
and, when all drafts were accepted, the last drafted token), then drafts greedily: k forwards, each
one query a row, the argmax fed to the next, all queued lazily and read once. Its draft is a point
mass, so verification is exact for sampled rows too (``spec/__init__.py``). The draft ignores the
row's penalties and LoRA adapter (they only lower acceptance); a grammar row's draft is cut where
its grammar stops allowing it (``verify.Speculator.step``).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from ...errors import BadRequest
from ..kv_pool import KVPool
from .. import paged


class DraftProposer:
    name = "draft"

    def __init__(self, model, pool: KVPool, vocab_size: int):
        self.model, self.pool, self.vocab_size = model, pool, vocab_size
        self.batch = None  # the PagedBatch whose rows it drafts for (set by ``spec.build``)
        # uid -> (base, fed): draft K/V holds the row's tokens[:base], then the drafted tokens ``fed`` at base, base + 1, ...
        self.state: dict[int, tuple[int, list[int]]] = {}
        self.asked = self.drafted = self.forwards = 0

    # -- the batch's hooks -----------------------------------------------------------------------
    def prefill(self, chunks, inputs, slots, tables, lens, offset) -> None:
        paged.forward(self.model, self.pool, mx.array(inputs, dtype=mx.uint32), slots, tables, lens, offset)
        mx.async_eval(self.pool.arrays())
        for uid, start, end in chunks:
            base, _ = self.state.get(uid, (start, []))
            if base >= start:
                self.state[uid] = (end, [])

    def copy_block(self, src: int, dst: int, n: int) -> None:
        self.pool.copy_block(src, dst, n)

    def likely(self, uid: int, tokens: list[int]) -> bool:
        return True

    def forget(self, uid: int) -> None:
        self.state.pop(uid, None)

    # -- proposing ---------------------------------------------------------------------------------
    def _held(self, uid: int, row) -> int:
        """Positions whose draft K/V holds the row's own tokens."""
        base, fed = self.state.get(uid, (row.cached, []))
        n, toks = base, row.tokens
        for t in fed:
            if n < len(toks) and toks[n] == t:
                n += 1
            else:
                break
        return n

    def propose(self, asks: list[tuple[int, list[int], int]]) -> dict[int, list[int]]:
        batch, bs = self.batch, self.pool.block_size
        rows = [batch.rows[uid] for uid, _, _ in asks]
        ks = [k for _, _, k in asks]
        self.asked += len(asks)
        # Catch up and draft the first token: one query per missing position, every row in one forward.
        inputs, slots, tables, lens, offsets, last = [], [], [], [], [], []
        for r, k in zip(rows, ks):
            T = len(r.tokens)
            batch._ensure_blocks(r, T + k - 1)  # draft K/V up to the (k-1)-th drafted token's position
            for p in range(min(self._held(r.uid, r), T - 1), T):
                inputs.append(r.tokens[p])
                slots.append(r.blocks[p // bs] * bs + p % bs)
                tables.append(r.blocks)
                lens.append(p + 1)
                offsets.append(p)
            last.append(len(inputs) - 1)
        logits = paged.forward(self.model, self.pool, mx.array(inputs, dtype=mx.uint32)[:, None], slots, tables,
                               lens, mx.array(offsets, dtype=mx.int32))[:, -1, :]
        tok = mx.argmax(logits[mx.array(last)], axis=-1).astype(mx.uint32)
        drafted = [tok]
        self.forwards += 1
        alive = list(range(len(rows)))
        for j in range(1, max(ks)):
            alive = [i for i in alive if ks[i] > j]
            prev_idx = mx.array([self._pos_in(drafted, j - 1, i, ks) for i in alive])
            inp = drafted[j - 1][prev_idx]
            sl, tb, ln, of = [], [], [], []
            for i in alive:
                r = rows[i]
                p = len(r.tokens) - 1 + j
                sl.append(r.blocks[p // bs] * bs + p % bs)
                tb.append(r.blocks)
                ln.append(p + 1)
                of.append(p)
            logits = paged.forward(self.model, self.pool, inp[:, None], sl, tb, ln, mx.array(of, dtype=mx.int32))[:, -1, :]
            drafted.append(mx.argmax(logits, axis=-1).astype(mx.uint32))
            self.forwards += 1
        mx.eval(drafted, *self.pool.arrays())
        cols = [d.tolist() for d in drafted]
        out = {}
        for i, (r, k) in enumerate(zip(rows, ks)):
            d = [cols[j][self._pos_in(drafted, j, i, ks)] for j in range(k)]
            d = [t for t in d if t < self.vocab_size][:k]  # never a padded-vocabulary id
            self.state[r.uid] = (len(r.tokens), d[:k - 1])
            if d:
                out[r.uid] = d
                self.drafted += 1
        return out

    @staticmethod
    def _pos_in(_drafted, j: int, i: int, ks: list[int]) -> int:
        """Row i's index in the j-th drafted column (the rows with k > j, in order)."""
        return sum(1 for x in range(i) if ks[x] > j)

    def stats(self) -> dict:
        return {"spec_draft_asks": self.asked, "spec_draft_forwards": self.forwards}


def check_tokenizers(target, draft, draft_name: str) -> Optional[str]:
    """Why ``draft``'s tokenizer cannot draft for ``target``'s (one line), or None."""
    tv, dv = target.get_vocab(), draft.get_vocab()
    if tv != dv:
        diff = len(set(tv.items()) ^ set(dv.items()))
        return f"its vocabulary differs from the target's ({len(dv)} vs {len(tv)} tokens, {diff} entries differ)"
    if set(target.eos_token_ids) != set(draft.eos_token_ids):
        return f"its end-of-sequence ids {sorted(draft.eos_token_ids)} are not the target's {sorted(target.eos_token_ids)}"
    return None


def refuse(draft_name: str, why: str) -> BadRequest:
    return BadRequest(f"draft model {draft_name} cannot draft for this model: {why}; a draft must share the "
                      f"target's tokenizer", param="speculative")
