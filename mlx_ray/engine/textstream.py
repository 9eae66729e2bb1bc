"""Token ids -> text deltas for one request, with stop strings.

mlx-lm's streaming detokenizer already holds back incomplete UTF-8 sequences
(a CJK character or an emoji spread over several byte tokens is released only
when complete; a character cut off by the end of generation is dropped). On top of it this class matches stop strings on the decoded
text: a stop string split across tokens is caught, and neither it nor anything
after it is ever emitted. Text that could still turn into a stop string is
held back until it cannot.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, detokenizer, stop: list[str] | None = None):
        self._detok = detokenizer
        self._stop = [s for s in (stop or []) if s]
        self._pending = ""  # decoded, not yet emitted (a possible stop-string prefix)
        self.stopped = False  # a stop string matched

    def add(self, token: int) -> str:
        """Feed one generated token; returns the text that is safe to emit now."""
        if self.stopped:
            return ""
        self._detok.add_token(token)
        self._pending += self._detok.last_segment
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation (EOS, stop token, length): flush everything held back."""
        if self.stopped:
            return ""
        self._detok.finalize()
        # Bytes of a character cut off by the end of generation decode to U+FFFD: drop them.
        self._pending += self._detok.last_segment.rstrip("\ufffd")
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._pending
        if self._stop:
            hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                self._pending = ""
                return text[: min(hits)]
            if not final:
                keep = self._held_back(text)
                self._pending = text[len(text) - keep :] if keep else ""
                return text[: len(text) - keep]
        self._pending = ""
        return text

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        keep = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        return keep
