"""What a chat template makes the model write: its tool-call syntax and its thinking markers.

The choice is mlx-lm's: the tool parser (a module of ``mlx_lm.tool_parsers``)
comes from the template's text (``tokenizer_utils._infer_tool_parser``), or
from ``tool_parser_type`` in the checkpoint's tokenizer config; the thinking
markers from the vocabulary (``TokenizerWrapper.think_start/think_end``). A
template given per model or per request is read the same way, and since a
small model's vocabulary may spell ``<think>`` in several tokens, a template
that writes one of mlx-lm's marker pairs enables them too. A model's config
may name either explicitly (``tool_parser``, ``think_markers``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

from ..errors import BadRequest

# mlx-lm's single-token thinking pairs (tokenizer_utils._infer_thinking), looked for in a template's text.
THINK_PAIRS = (("<think>", "</think>"), ("<longcat_think>", "</longcat_think>"), ("<|think:start|>", "<|think:end|>"))


@dataclass(frozen=True)
class ChatFormat:
    tool_parser: Optional[str] = None  # module name under mlx_lm.tool_parsers; None: no tool calling
    think: Optional[tuple[str, str]] = None  # (start, end) of a thinking section; None: no reasoning split


def tool_parser_module(name: str):
    """The mlx-lm tool parser module ``name`` (``parse_tool_call``, ``tool_call_start``, ``tool_call_end``)."""
    try:
        return importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    except ImportError:
        raise BadRequest(f"tool_parser {name!r} is not one of mlx-lm's tool parsers (mlx_lm/tool_parsers/)",
                         param="tool_parser") from None


class _TemplateView:
    """What ``_infer_tool_parser`` reads of a tokenizer, with another template."""

    def __init__(self, tokenizer, template: Optional[str]):
        self.chat_template = template
        self.get_vocab = tokenizer.get_vocab


def detect(tokenizer, template: Optional[str], tool_parser: Optional[str] = None,
           think_markers: Optional[tuple[str, str]] = None) -> ChatFormat:
    """The format of ``template`` (None: the tokenizer's own) for an mlx-lm ``TokenizerWrapper``."""
    from mlx_lm.tokenizer_utils import _infer_tool_parser

    own = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    text = template if template is not None else own
    if tool_parser is None:
        configured = (getattr(tokenizer, "init_kwargs", None) or {}).get("tool_parser_type")
        tool_parser = configured if template is None and configured else _infer_tool_parser(_TemplateView(tokenizer, text))
    elif tool_parser == "none":
        tool_parser = None
    if tool_parser is not None:
        tool_parser_module(tool_parser)
    think = tuple(think_markers) if think_markers else None
    if think is None and tokenizer.has_thinking:
        think = (tokenizer.think_start, tokenizer.think_end)
    if think is None and text:
        think = next((p for p in THINK_PAIRS if p[0] in text), None)  # a template may only open it
    return ChatFormat(tool_parser, think)
