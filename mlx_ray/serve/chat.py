"""A chat prompt planned on the model's replica: template inputs, forced tool calls, output splitting.

``plan`` renders the chat template with the request's ``tools`` and
``chat_template_kwargs``, finds the template's chat format (tool parser and
thinking markers: ``engine/chat_format.py``, overridden by the model's config),
builds the grammar a forced ``tool_choice`` needs, and notes whether the
prompt leaves a thinking section open (then the output starts as reasoning).
Each choice of the request gets its own :class:`~.chat_output.ChoiceSplitter`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..engine.chat_format import ChatFormat
from ..engine.protocol import Grammar, LLMEngine
from ..errors import BadRequest
from .chat_output import ChoiceSplitter
from .config import ModelConfig
from .generation import ChatPrompt
from .tool_calls import forced_grammar

THINK_TAIL_TOKENS = 32  # prompt tokens decoded to see whether the template opened a thinking section


@dataclass
class ChatPlan:
    ids: list[int]
    fmt: ChatFormat
    grammar: Optional[Grammar] = None  # forced tool calls
    tools: Optional[list[dict]] = None
    parse_tools: bool = False
    in_thinking: bool = False

    def splitter(self) -> ChoiceSplitter:
        return ChoiceSplitter(self.fmt, self.tools, self.parse_tools, self.in_thinking)


def chat_format(engine: LLMEngine, template: Optional[str], cfg: ModelConfig) -> ChatFormat:
    fmt = engine.chat_format(template)
    if cfg.tool_parser:
        fmt = dataclasses.replace(fmt, tool_parser=None if cfg.tool_parser == "none" else cfg.tool_parser)
    if cfg.think_markers:
        fmt = dataclasses.replace(fmt, think=tuple(cfg.think_markers))
    return fmt


def plan(engine: LLMEngine, spec: ChatPrompt, cfg: ModelConfig) -> ChatPlan:
    template = spec.chat_template or cfg.chat_template
    fmt = chat_format(engine, template, cfg)
    tools = [dict(t) for t in spec.tools] if spec.tools else None
    choice = spec.tool_choice
    if tools and choice != "none" and fmt.tool_parser is None:
        raise BadRequest("this model's chat template has no tool-call syntax mlx-lm knows; set the model's "
                         "tool_parser (or chat_template) in its config, or send tool_choice \"none\"", param="tools")
    extra = {k: v for k, v in (("tools", tools), ("template_kwargs", spec.template_kwargs)) if v}
    ids = engine.encode_chat(list(spec.messages), chat_template=template, **extra)
    grammar = None
    if tools and (choice == "required" or isinstance(choice, dict)):
        grammar = forced_grammar(fmt.tool_parser, tools, choice, spec.parallel_tool_calls)
    in_thinking = False
    if fmt.think:
        tail = engine.decode(ids[-THINK_TAIL_TOKENS:])
        in_thinking = tail.rfind(fmt.think[0]) > tail.rfind(fmt.think[1])
    return ChatPlan(ids, fmt, grammar, tools, bool(tools) and choice != "none", in_thinking)
