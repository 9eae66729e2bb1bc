"""Prompt lookup (vLLM's ``ngram`` method): draft what followed the last earlier occurrence of the row's
longest suffix n-gram (``prompt_lookup_max`` down to ``prompt_lookup_min`` tokens) in its own tokens.

No model: numpy over the row's token ids, one vectorized comparison per n-gram length, a few tens of
microseconds for thousands of tokens. It wins where the output copies its input (extraction, edits,
RAG, tool calls) and drafts nothing where it does not. The most recent occurrence with k tokens
after it is taken (vLLM takes the first): an edit of a document copies from where it is, and
repeated structure (JSON keys, code) repeats its latest form. A row's tokens are kept as a numpy array that grows with the row."""

from __future__ import annotations

import numpy as np


class NgramProposer:
    name = "ngram"

    def __init__(self, prompt_lookup_min: int = 2, prompt_lookup_max: int = 4):
        self.nmin, self.nmax = prompt_lookup_min, prompt_lookup_max
        self._arrays: dict[int, np.ndarray] = {}  # uid -> its tokens (a prefix of what it has now)
        self.asked = self.drafted = 0

    def propose(self, asks: list[tuple[int, list[int], int]]) -> dict[int, list[int]]:
        out = {}
        for uid, tokens, k in asks:
            self.asked += 1
            draft = lookup(self._tokens(uid, tokens), self.nmin, self.nmax, k)
            if draft:
                self.drafted += 1
                out[uid] = draft
        return out

    def _tokens(self, uid: int, tokens: list[int]) -> np.ndarray:
        a = self._arrays.get(uid)
        if a is None or len(a) > len(tokens):
            a = np.asarray(tokens, dtype=np.int64)
        elif len(a) < len(tokens):
            a = np.concatenate([a, np.asarray(tokens[len(a):], dtype=np.int64)])
        self._arrays[uid] = a
        return a

    def likely(self, uid: int, tokens: list[int]) -> bool:
        """Whether a lookup on the tokens the host has (the row's last token may still be in flight) finds a
        draft: then one after that token probably does too. Costs no wait for the device."""
        return bool(lookup(self._tokens(uid, tokens), self.nmin, self.nmax, 1))

    def forget(self, uid: int) -> None:
        self._arrays.pop(uid, None)

    def stats(self) -> dict:
        return {"spec_ngram_lookups": self.asked, "spec_ngram_hits": self.drafted}


def lookup(a: np.ndarray, nmin: int, nmax: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix n-gram of ``a``
    (``nmin <= n <= nmax``); [] when none occurs."""
    L = len(a)
    if k <= 0 or L < nmin + 1:
        return []
    # ends[i]: an occurrence of the suffix's last n tokens ends at position i (< L - 1, so something follows it)
    ends = a[:L - 1] == a[L - 1]
    best = -1
    for n in range(1, min(nmax, L - 1) + 1):
        if n > 1:
            ends[n - 1:] &= a[:L - n] == a[L - n]  # shift: the token n - 1 before each end matches too
            ends[:n - 1] = False
        hits = np.flatnonzero(ends)
        if hits.size == 0:
            break
        if n >= nmin:
            full = hits[hits + k < L]  # occurrences with k tokens after them: the most recent of those
            best = int(full[-1]) if full.size else int(hits[0])  # else the one with the most after it
    if best < 0:
        return []
    return a[best + 1:best + 1 + k].tolist()
