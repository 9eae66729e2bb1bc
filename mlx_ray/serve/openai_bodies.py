"""OpenAI response bodies built from a model's streamed events (the shapes: ``openai_protocol.py``).

A ``ChatBody`` or ``CompletionBody`` accumulates the ``ChoiceEvent`` batches of one
request and renders either the non-streamed body (``final``) or the stream's chunks
(``chunks``, ``usage_chunk``). No HTTP here: the ingress frames and sends them.
"""

from __future__ import annotations

from typing import Optional

from ..engine.protocol import FinishEvent, TokenEvent
from ..errors import MlxRayError
from . import openai_protocol as oai
from .chat_output import Delta
from .generation import ChoiceEvent


class Body:
    """Accumulates events of one request; renders non-streamed bodies and stream chunks."""

    object_prefix = "cmpl"

    def __init__(self, req):
        self.req = req
        self.id = oai.new_id(self.object_prefix)
        self.n = req.n
        self.text: dict[int, str] = {}
        self.logprobs: dict[int, list] = {}
        self.finish: dict[int, FinishEvent] = {}
        self.error: Optional[MlxRayError] = None
        self.started: set[int] = set()

    def add(self, batch: list[ChoiceEvent]) -> dict[int, tuple[str, list, Optional[FinishEvent]]]:
        """Record a batch; return per choice index its (text, logprob entries, finish event)."""
        per: dict[int, tuple[str, list, Optional[FinishEvent]]] = {}
        for item in batch:
            idx, ev = item.index, item.event
            text, lps, fin = per.get(idx, ("", [], None))
            if isinstance(ev, TokenEvent):
                text += ev.text
                self.text[idx] = self.text.get(idx, "") + ev.text
                if ev.logprobs:
                    entries = self._lp_entries(idx, ev, item.token_texts or {})
                    lps = lps + entries
                    self.logprobs.setdefault(idx, []).extend(entries)
            else:
                fin = ev
                self.finish[idx] = ev
                if ev.error is not None and self.error is None:
                    self.error = ev.error
            per[idx] = (text, lps, fin)
        return per

    def usage(self) -> oai.Usage:
        prompt = {}
        cached = 0
        for idx, f in self.finish.items():
            p = idx // self.n
            if p not in prompt:
                prompt[p] = f.prompt_tokens
                cached += f.cached_tokens
        pt = sum(prompt.values())
        ct = sum(f.completion_tokens for f in self.finish.values())
        return oai.Usage(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct,
                         prompt_tokens_details={"cached_tokens": cached})

    def usage_chunk(self) -> dict:
        return self._chunk_obj([], usage=self.usage())

    @staticmethod
    def reason(f: Optional[FinishEvent]) -> Optional[str]:
        if f is None:
            return None
        return f.finish_reason if f.finish_reason in ("stop", "length") else "stop"

    def chunks(self, batch: list[ChoiceEvent]) -> list[dict]:
        """One chunk per choice touched by the batch (its tokens coalesced), in index order."""
        out = []
        for idx, (text, lps, fin) in sorted(self.add(batch).items()):
            if fin is not None and fin.error is not None:
                continue
            choice = self._choice_chunk(idx, text, lps, self.reason(fin))
            if choice is not None:
                out.append(self._chunk_obj([choice]))
        return out

    def _lp_entries(self, idx: int, ev: TokenEvent, texts: dict[int, str]) -> list:
        raise NotImplementedError

    def _choice_chunk(self, idx, text, lps, reason) -> Optional[dict]:
        """The choice's part of a chunk; None when it has nothing to say (text held back)."""
        raise NotImplementedError

    def _chunk_obj(self, choices, usage=None) -> dict:
        raise NotImplementedError

    def final(self) -> dict:
        raise NotImplementedError


class ChatBody(Body):
    """Chat bodies: a choice split by the server (``ChoiceEvent.message``) has reasoning and tool calls too."""

    object_prefix = "chatcmpl"

    def __init__(self, req):
        super().__init__(req)
        self.message: dict[int, Delta] = {}  # per choice, all of it so far
        self.delta: dict[int, Delta] = {}  # per choice, this batch's

    def add(self, batch: list[ChoiceEvent]):
        per = super().add(batch)
        self.delta = {}
        for item in batch:
            m = item.message
            if m is None:
                continue
            for d in (self.delta.setdefault(item.index, Delta()), self.message.setdefault(item.index, Delta())):
                d.content += m.content
                d.reasoning += m.reasoning
                d.tool_calls.extend(m.tool_calls)
        return per

    def _reason(self, idx: int, reason: Optional[str]) -> Optional[str]:
        m = self.message.get(idx)
        return "tool_calls" if reason == "stop" and m is not None and m.tool_calls else reason

    def _lp_entries(self, idx, ev, texts):
        def entry(tok: str, logprob: float) -> dict:
            return {"token": tok, "logprob": logprob, "bytes": list(tok.encode())}

        return [{**entry(texts.get(lp.token_id, ""), lp.logprob),
                 "top_logprobs": [entry(texts.get(t, ""), v) for t, v in lp.top[: self.req.top_logprobs or 0]]}
                for lp in ev.logprobs]

    def _choice_chunk(self, idx, text, lps, reason):
        d = self.delta.get(idx) if idx in self.message else Delta(content=text)
        d = d or Delta()
        delta = _message_fields(d, streamed=True)
        if idx not in self.started:
            self.started.add(idx)
            delta["role"] = "assistant"
        elif not d and reason is None and not lps:
            return None
        return {"index": idx, "delta": delta, "finish_reason": self._reason(idx, reason),
                "logprobs": {"content": lps} if self.req.logprobs else None}

    def _chunk_obj(self, choices, usage=None):
        return oai.ChatCompletionChunk(id=self.id, model=self.req.model, choices=choices,
                                       usage=usage).model_dump(exclude_none=False)

    def final(self):
        choices = [oai.ChatChoice(index=i, message=oai.ChoiceMessage(**_message_fields(
                                      self.message.get(i) or Delta(content=self.text.get(i, "")), streamed=False)),
                                  finish_reason=self._reason(i, self.reason(self.finish.get(i))),
                                  logprobs={"content": self.logprobs.get(i, [])} if self.req.logprobs else None)
                   for i in range(self.n)]
        return oai.ChatCompletion(id=self.id, model=self.req.model, choices=choices, usage=self.usage()).model_dump()


def _message_fields(d: Delta, streamed: bool) -> dict:
    """OpenAI message (or delta) fields of a split choice: content null when only tool calls came."""
    out: dict = {"content": d.content if d.content or not (d.tool_calls or d.reasoning) else None}
    if d.reasoning:
        out["reasoning_content"] = d.reasoning
    if d.tool_calls:
        out["tool_calls"] = d.tool_calls if streamed else [{k: v for k, v in c.items() if k != "index"}
                                                           for c in d.tool_calls]
    return out


class CompletionBody(Body):
    def __init__(self, req):
        super().__init__(req)
        self.n_choices = len(req.prompts()) * req.n
        self.offset: dict[int, int] = {}

    def _lp_entries(self, idx, ev, texts):
        out = []
        for lp in ev.logprobs:
            tok = texts.get(lp.token_id, "")
            off = self.offset.get(idx, 0)
            self.offset[idx] = off + len(tok)
            out.append((tok, lp.logprob, {texts.get(t, ""): v for t, v in lp.top[: self.req.logprobs or 0]}, off))
        return out

    @staticmethod
    def _lp_obj(entries) -> dict:
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}

    def _choice_chunk(self, idx, text, lps, reason):
        return {"index": idx, "text": text, "finish_reason": reason,
                "logprobs": self._lp_obj(lps) if self.req.logprobs is not None else None}

    def _chunk_obj(self, choices, usage=None):
        return oai.Completion(id=self.id, model=self.req.model, choices=choices, usage=usage).model_dump()

    def final(self):
        choices = [oai.CompletionChoice(index=i, text=self.text.get(i, ""), finish_reason=self.reason(self.finish.get(i)),
                                        logprobs=self._lp_obj(self.logprobs.get(i, [])) if self.req.logprobs is not None else None)
                   for i in range(self.n_choices)]
        return oai.Completion(id=self.id, model=self.req.model, choices=choices, usage=self.usage()).model_dump()
