"""One chat choice's generated text split into ``reasoning_content``, ``content`` and ``tool_calls``.

The split is mlx-lm's ``TextStateMachine`` (``mlx_lm.generate``): it matches
the thinking and tool-call markers on decoded text (robust to how the model
tokenized them), strips them, and holds back text that may still turn out to
be a marker. A streamed choice and a non-streamed one go through the same
:class:`ChoiceSplitter`, fed delta by delta or all at once, so they give the
same message. A tool-call section becomes calls when it closes (its parser
sees the whole section); one that does not parse stays content, markers and all.

Whitespace between and around tool calls is not content (it is held back and
dropped when a call follows or the output ends with calls), as vLLM returns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..engine.chat_format import ChatFormat, tool_parser_module
from .tool_calls import parse_section


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class ChoiceSplitter:
    """Feed text deltas, get message deltas; ``finish()`` flushes what was held back."""

    def __init__(self, fmt: ChatFormat, tools: Optional[list] = None, parse_tools: bool = False,
                 in_thinking: bool = False):
        transitions: dict[str, list] = {}
        if fmt.think:
            transitions["normal"] = [(fmt.think[0], "reasoning")]
            transitions["reasoning"] = [(fmt.think[1], "normal")]
        self.parser = fmt.tool_parser if parse_tools and tools else None
        self.tools = tools
        if self.parser:
            mod = tool_parser_module(self.parser)
            self.markers = (mod.tool_call_start, mod.tool_call_end)
            transitions.setdefault("normal", []).append((mod.tool_call_start, "tool"))
            transitions["tool"] = [(mod.tool_call_end, "normal")] if mod.tool_call_end else []
        self.passthrough = not transitions
        from mlx_lm.generate import TextStateMachine  # only where a replica splits output (a stock head has no mlx_lm)

        self._machine = TextStateMachine
        self.state = TextStateMachine(transitions).make_state("reasoning" if in_thinking and fmt.think else "normal")
        self.tool_text = ""
        self.held_ws = ""  # whitespace-only content not yet emitted
        self.calls = 0

    def feed(self, text: str) -> Delta:
        if self.passthrough:
            return Delta(content=text)
        self.state, segments = self._machine.split(self.state, text)
        out = Delta()
        for i, (name, seg) in enumerate(segments):
            closed = i < len(segments) - 1  # the state changed after this segment
            if name == "tool":
                self.tool_text += seg
                if closed:
                    self._close_tool(out)
            elif name == "reasoning":
                out.reasoning += seg
            else:
                self._content(out, seg)
        return out

    def finish(self) -> Delta:
        """Flush: a held-back partial marker is text of the current state; an open tool section is parsed."""
        if self.passthrough:
            return Delta()
        name, _, _, pending = self.state
        out = Delta()
        if name == "tool":
            self.tool_text += pending
            self._close_tool(out)
        elif name == "reasoning":
            out.reasoning += pending
        else:
            self._content(out, pending)
        if not self.calls:
            out.content += self.held_ws
        self.held_ws = ""
        return out

    def _content(self, out: Delta, text: str) -> None:
        if not text:
            return
        if self.parser is None:
            out.content += text
        elif text.strip():
            out.content += self.held_ws + text
            self.held_ws = ""
        else:
            self.held_ws += text

    def _close_tool(self, out: Delta) -> None:
        text, self.tool_text = self.tool_text, ""
        calls = parse_section(self.parser, text, self.tools)
        if calls is None:  # not a call after all: the model's text, as written
            self._content(out, self.markers[0] + text + (self.markers[1] or ""))
            return
        self.held_ws = ""
        for c in calls:
            out.tool_calls.append({"index": self.calls, **c})
            self.calls += 1
