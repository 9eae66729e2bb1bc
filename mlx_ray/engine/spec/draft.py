"""The draft-model proposer: a small model with the target's tokenizer, on its own paged KV.

Its pool mirrors the target's block ids: position p of a row has its draft K/V at the same slot as its
target K/V, in the draft's own per-layer arrays (``KVPool`` with the draft's layer shapes). So the
target's block accounting admits the draft's KV too: a block costs the target's bytes plus the
draft's, the budget holds fewer blocks (``paged.build``'s ``extra_block_bytes``), and a row never
allocates draft KV the admission did not count. Blocks freed, cached and copied on write (the
prefix cache) carry both.

The draft's KV is filled on demand, not when the target prefills: a row's draft K/V is written the
first time the controller lets it draft, by the catch-up (below), at most ``catchup_chunk`` positions
a step (a row further behind drafts nothing that step and catches up over the next ones, as a
chunked prefill). So a draft the controller never uses (under load, or where it costs as much as
the target) costs no prefill either. Positions another row wrote into a shared prefix-cache block
are not trusted: a row catches up from its own start (rewriting the same values there).

To propose k tokens for rows it first catches up (feeds the row's tokens its KV does not hold yet:
the prompt on a first ask; after a verify, the correction and, when all drafts were accepted, the
last drafted token), then drafts greedily: k forwards, each
one query a row, the argmax fed to the next, all queued lazily and read once. Its draft is a point
mass, so verification is exact for sampled rows too (``spec/__init__.py``). The draft ignores the
row's penalties and LoRA adapter (they only lower acceptance); a grammar row's draft is cut where
its grammar stops allowing it (``verify.Speculator.step``).
"""

from __future__ import annotations

import time
from typing import Optional

import mlx.core as mx

from ...errors import BadRequest
from ..kv_pool import KVPool
from .. import paged


class DraftProposer:
    name = "draft"

    def __init__(self, model, pool: KVPool, vocab_size: int, catchup_chunk: int = 512):
        self.model, self.pool, self.vocab_size = model, pool, vocab_size
        self.catchup_chunk = max(1, catchup_chunk)  # positions a row catches up in one step (its prefill chunk)
        self.batch = None  # the PagedBatch whose rows it drafts for (set by ``spec.build``)
        # uid -> (base, fed): draft K/V holds the row's tokens[:base], then the drafted tokens ``fed`` at base, base + 1, ...
        self.state: dict[int, tuple[int, list[int]]] = {}
        self.asked = self.drafted = self.forwards = self.catching_up = 0
        self.widths: list[int] = []  # rows in each forward of the last ``propose`` (the controller's cost samples)

    # -- the batch's hooks -----------------------------------------------------------------------
    def copy_block(self, src: int, dst: int, n: int) -> None:
        self.pool.copy_block(src, dst, n)

    def likely(self, uid: int, tokens: list[int]) -> bool:
        return True

    def forget(self, uid: int) -> None:
        self.state.pop(uid, None)

    # -- proposing ---------------------------------------------------------------------------------
    def behind(self, uid: int, tokens: list[int]) -> int:
        """Positions a row's next ask would catch up on before drafting (its whole prompt on a first ask)."""
        return max(0, len(tokens) - 1 - self._held(uid, tokens))

    def _held(self, uid: int, toks: list[int]) -> int:
        """Positions whose draft K/V holds the row's own tokens ``toks`` (0 for a row never asked)."""
        base, fed = self.state.get(uid, (0, []))
        n = base
        for t in fed:
            if n < len(toks) and toks[n] == t:
                n += 1
            else:
                break
        return n

    def propose(self, asks: list[tuple[int, list[int], int]]) -> dict[int, list[int]]:
        batch, bs = self.batch, self.pool.block_size
        self.asked += len(asks)
        # Catch up (every row's missing positions, one query each, at most ``catchup_chunk`` a row) and draft the
        # first token of the rows that are caught up, all in one forward.
        inputs, slots, tables, lens, offsets = [], [], [], [], []
        rows, ks, last = [], [], []
        for uid, _, k in asks:
            r = batch.rows[uid]
            T = len(r.tokens)
            start = min(self._held(uid, r.tokens), T - 1)
            end = min(T, start + self.catchup_chunk)
            for p in range(start, end):
                inputs.append(r.tokens[p])
                slots.append(r.blocks[p // bs] * bs + p % bs)
                tables.append(r.blocks)
                lens.append(p + 1)
                offsets.append(p)
            if end < T:  # still behind: no draft this step
                self.state[uid] = (end, [])
                self.catching_up += 1
                continue
            batch._ensure_blocks(r, T + k - 1)  # draft K/V up to the (k-1)-th drafted token's position
            rows.append(r)
            ks.append(k)
            last.append(len(inputs) - 1)
        logits = paged.forward(self.model, self.pool, mx.array(inputs, dtype=mx.uint32)[:, None], slots, tables,
                               lens, mx.array(offsets, dtype=mx.int32))[:, -1, :]
        self.widths = [len(inputs)]  # the controller's cost samples: the rows of each forward
        self.forwards += 1
        if not rows:
            mx.eval(*self.pool.arrays())
            return {}
        tok = mx.argmax(logits[mx.array(last)], axis=-1).astype(mx.uint32)
        drafted = [tok]
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
            self.widths.append(len(alive))
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

    def timed_forward(self, batch, n: int) -> float:
        """Seconds of one draft forward of ``n`` one-token rows on the trash block, with its argmax read back (what
        a drafted depth costs; ``verify.calibrated`` fits the controller's ``DraftCost`` on it)."""
        bs, trash = self.pool.block_size, batch.trash
        t0 = time.perf_counter()
        logits = paged.forward(self.model, self.pool, mx.zeros((n, 1), dtype=mx.uint32),
                               [trash * bs + (j % bs) for j in range(n)], [[trash]] * n,
                               [1 + j % bs for j in range(n)], mx.array([j % bs for j in range(n)], dtype=mx.int32))
        mx.eval(mx.argmax(logits[:, -1, :], axis=-1), *self.pool.arrays())
        return time.perf_counter() - t0

    @staticmethod
    def _pos_in(_drafted, j: int, i: int, ks: list[int]) -> int:
        """Row i's index in the j-th drafted column (the rows with k > j, in order)."""
        return sum(1 for x in range(i) if ks[x] > j)

    def stats(self) -> dict:
        return {"spec_draft_asks": self.asked, "spec_draft_forwards": self.forwards,
                "spec_draft_asks_catching_up": self.catching_up}


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
