"""Constrained decoding: a request's grammar enforced on its own row, token by token (llguidance).

A request may carry a :class:`~mlx_ray.engine.protocol.Grammar`: any JSON object,
a JSON schema, or a Lark grammar (what tool calls are forced with; Lark may embed
``%json {schema}``). :class:`Grammars` (one per engine) compiles it against the
model's tokenizer *before admission*, so a schema llguidance cannot enforce
answers 400 naming the feature, never a half-enforced answer.

:class:`GrammarProcessor` is a per-row logits processor (mlx-lm's contract,
``(context tokens, logits (1, V)) -> logits``), placed after every other
processor so it runs last before the sampler, greedy or sampled: it feeds the
row's tokens generated since its last call to its own matcher (rolling back the
drafted tokens a speculative step rejected), then sets every token the grammar
does not allow to ``-inf``. Its state is the request's alone, so rows without a
grammar are never touched and rows with different grammars never share one
(vllm-mlx #784 was a shared processor in mlx-lm's batch generator). Once the
grammar is complete only EOS is allowed, so the request ends with ``stop``.

Why llguidance (``bench/grammar_mask.py``; README "Structured outputs"): its
schema compiles in about 2 ms against xgrammar's 20-160 ms and outlines-core's
0.7-20 s (compiled per request: every request may bring its own schema), masks
cost tens of microseconds at 49k and 152k vocabularies (negligible against a
decode step), it reports unsupported schema keywords by name, and its macOS
arm64 wheel is abi3 with no dependencies (xgrammar's pulls in torch).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import BadRequest
from .protocol import Grammar

log = logging.getLogger(__name__)

# Fixed separators: a model cannot spin on whitespace between JSON tokens (llguidance's default
# allows any run of it), and ", " / ": " are what models were trained on (json.dumps' default).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """Compiles grammars against one tokenizer (built lazily: 0.4 s at 49k tokens, 2.5 s at 152k)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids):
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tok = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tok is None:
                import llguidance.hf

                self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=self._eos)
            return self._tok

    def compile(self, g: Grammar) -> str:
        """The llguidance grammar for ``g``; BadRequest (naming ``g.param``) when it cannot be enforced."""
        import llguidance

        try:
            if g.kind == "json_object":
                text = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            elif g.kind == "json_schema":
                if not isinstance(g.spec, dict):
                    raise BadRequest(f"{g.param}: the JSON schema must be an object", param=g.param)
                text = llguidance.LLMatcher.grammar_from_json_schema(g.spec, defaults=JSON_OPTIONS)
            elif g.kind == "lark":
                text = llguidance.LLMatcher.grammar_from_lark(g.spec)
            else:
                raise BadRequest(f"unknown grammar kind {g.kind!r}", param=g.param)
        except ValueError as e:  # not JSON-serializable, not an object
            raise BadRequest(f"{g.param}: {e}", param=g.param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self.tokenizer)
        if is_error:
            what = "the JSON schema cannot be enforced" if g.kind != "lark" else "the grammar is invalid"
            raise BadRequest(f"{g.param}: {what}: {_one_line(messages[0])}", param=g.param)
        for w in messages:
            log.info("grammar warning (%s): %s", g.param, w)
        return text

    def processor(self, compiled: str) -> "GrammarProcessor":
        import llguidance

        m = llguidance.LLMatcher(self.tokenizer, compiled, log_level=0)
        if m.is_error():  # validated above; a limit hit at construction
            raise BadRequest(f"the grammar cannot be built: {_one_line(m.get_error())}", param="response_format")
        return GrammarProcessor(m, self.vocab_size)


class GrammarProcessor:
    """One request's matcher as a logits processor: follow the context, mask the next token.

    The matcher follows the context it is called with, not a count of calls: it consumes the tokens
    generated since it last looked and, when the context is not an extension of what it consumed
    (a speculative step consumed drafted tokens that were rejected), rolls back to the common
    prefix first. So a speculative step may call it once a drafted position, in order, and the next
    step's call lands it on the tokens actually accepted."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.calls = 0
        self.start: Optional[int] = None  # the prompt's length: the first call's context
        self.consumed: list[int] = []  # generated tokens the matcher holds
        self.bits = np.full(((vocab_size + 31) // 32,), -1, dtype=np.int32)
        self.error: Optional[str] = None

    def sync(self, tokens) -> None:
        """Put the matcher on ``tokens`` (the row's context: prompt + generated), rolling back if needed."""
        if self.start is None:
            self.start = len(tokens)
        if self.error is not None:
            return
        gen = tokens[self.start:]
        gen = gen.tolist() if hasattr(gen, "tolist") else list(gen)
        have = self.consumed
        n = len(have)
        if len(gen) < n or gen[:n] != have:
            n = 0
            while n < min(len(gen), len(have)) and gen[n] == have[n]:
                n += 1
            self.matcher.rollback(len(have) - n)
            del have[n:]
        for t in gen[n:]:
            if not self.matcher.consume_token(int(t)):
                self.error = self.matcher.get_error() or "the token was rejected"
                log.error("grammar matcher left its grammar (%s); only EOS is allowed from here", self.error)
                return
            have.append(int(t))

    def valid_draft(self, tokens, draft: list[int]) -> int:
        """How many leading tokens of ``draft`` the grammar allows after ``tokens`` (the matcher is left on ``tokens``)."""
        self.sync(tokens)
        return 0 if self.error is not None else self.matcher.validate_tokens(list(draft))

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self.sync(tokens)
        self.calls += 1
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        return mx.where(mx.array(allowed.astype(np.bool_))[None], logits, mx.array(-mx.inf, logits.dtype))


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


def schema_text(schema) -> str:
    """A schema as compact JSON (for Lark's ``%json`` and error messages)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
