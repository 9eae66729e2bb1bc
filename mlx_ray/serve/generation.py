"""What crosses between the ingress and a model's ``LLMServer``: typed, picklable, no HTTP.

The ingress sends one ``ModelRequest`` (prompts, sampling, ``n``, deadline, id)
through a Serve handle (or ``LocalHandle``); the server streams back lists of
``ChoiceEvent`` (one engine event of one choice). Errors travel as
``FinishEvent(error=...)``; the ingress maps them to statuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ..engine.protocol import Event, FinishEvent, LLMEngine, SamplingParams
from ..errors import MlxRayError
from .chat_output import Delta

MAX_CHOICES = 16  # ``n``: choices per prompt, each one engine request


@dataclass(frozen=True)
class TextPrompt:
    text: str
    param = "prompt"  # the request parameter a 400 about this prompt names

    def token_ids(self, engine: LLMEngine, chat_template: Optional[str]) -> list[int]:
        return engine.encode(self.text)


@dataclass(frozen=True)
class TokenPrompt:
    ids: tuple[int, ...]
    param = "prompt"

    def token_ids(self, engine: LLMEngine, chat_template: Optional[str]) -> list[int]:
        return list(self.ids)


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[dict, ...]  # {"role", "content": str, and "tool_calls" / "tool_call_id" / "name" where given}
    chat_template: Optional[str] = None  # None: the model's (or the server's configured) template
    tools: Optional[tuple[dict, ...]] = None  # OpenAI tool definitions, rendered by the template
    tool_choice: Union[str, dict] = "auto"  # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True
    template_kwargs: Optional[dict] = None  # chat_template_kwargs, e.g. {"enable_thinking": false}
    param = "messages"

    def token_ids(self, engine: LLMEngine, chat_template: Optional[str]) -> list[int]:
        return engine.encode_chat(list(self.messages), chat_template=self.chat_template or chat_template)


PromptSpec = Union[TextPrompt, TokenPrompt, ChatPrompt]


@dataclass
class ModelRequest:
    """One OpenAI request for one model: ``len(prompts) * n`` choices (choice ``p * n + i``)."""

    prompts: list[PromptSpec]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    timeout_s: Optional[float] = None
    request_id: Optional[str] = None
    adapter: Optional[str] = None  # the model's LoRA adapter to run it on (None: the base)


@dataclass
class ChoiceEvent:
    """One engine event of one choice; ``token_texts`` ({token_id: text}) when it carries logprobs."""

    index: int
    event: Event
    token_texts: Optional[dict[int, str]] = None
    message: Optional[Delta] = None  # a chat choice's text split into content, reasoning and tool calls


def first_error(batch: list[ChoiceEvent]) -> Optional[MlxRayError]:
    for item in batch:
        if isinstance(item.event, FinishEvent) and item.event.error is not None:
            return item.event.error
    return None
