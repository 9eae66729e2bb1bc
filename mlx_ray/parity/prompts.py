"""Prompt sets: the built-in one (short, chat-templated, code, multilingual,
long) shipped as package data, or the user's own file.

A model without a chat template (a base model) gets every chat prompt as raw
text (:meth:`Prompt.as_raw`: the messages' contents, one paragraph each).

Accepted files: ``.json`` (a list of strings or of objects with ``name`` and
either ``prompt`` (raw text) or ``messages`` (chat, run through the model's
chat template)), ``.jsonl`` (one such item per line), anything else: one raw
prompt per non-empty line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import BadRequest


@dataclass
class Prompt:
    name: str
    text: str | None = None  # raw text, tokenized as is
    messages: list[dict] | None = None  # chat, rendered with the tokenizer's chat template

    def token_ids(self, tokenizer) -> list[int]:
        """Token ids of this prompt for an HF tokenizer (mlx-lm's TokenizerWrapper forwards to it)."""
        if self.messages is not None:
            ids = tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        return list(tokenizer.encode(self.text))

    def as_raw(self) -> "Prompt":
        """This prompt as raw text: a chat prompt's messages' contents, one paragraph each."""
        if self.messages is None:
            return self
        return Prompt(self.name, text="\n\n".join(str(m.get("content", "")) for m in self.messages) + "\n")


def has_chat_template(tokenizer) -> bool:
    """Whether an HF tokenizer (or mlx-lm's wrapper of one) has a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def data_path(name: str) -> Path:
    return Path(str(resources.files("mlx_ray.parity") / "data" / name))


def _item(i: int, obj) -> Prompt:
    if isinstance(obj, str):
        return Prompt(name=f"p{i}", text=obj)
    if isinstance(obj, dict) and ("prompt" in obj or "messages" in obj):
        msgs = obj.get("messages")
        if msgs is not None and not (isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs)):
            raise BadRequest(f"prompt {i}: 'messages' must be a list of {{role, content}} objects")
        return Prompt(name=str(obj.get("name", f"p{i}")), text=obj.get("prompt"), messages=msgs)
    raise BadRequest(f"prompt {i}: expected a string or an object with 'prompt' or 'messages'")


def load_prompts(path: str | Path | None) -> list[Prompt]:
    """The prompts in ``path``, or the built-in set when ``path`` is None."""
    p = Path(path) if path else data_path("prompts.json")
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as e:
        raise BadRequest(f"cannot read prompts file {p}: {e.strerror}") from None
    try:
        if p.suffix == ".json":
            items = json.loads(raw)
            if not isinstance(items, list):
                raise BadRequest(f"{p}: expected a JSON list of prompts")
        elif p.suffix == ".jsonl":
            items = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            items = [line for line in raw.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise BadRequest(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    prompts = [_item(i, x) for i, x in enumerate(items)]
    if not prompts:
        raise BadRequest(f"{p} holds no prompts")
    return prompts
