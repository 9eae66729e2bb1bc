"""OpenAI request and response shapes (the subset mlx-ray serves).

Requests are validated here (ranges, combinations), so the ingress can answer
400 naming the parameter. Every field declared here is honoured; OpenAI fields
that would change the output and are not supported (``REFUSED``) answer 400
naming them; any other unknown field is ignored with a warning in the log, as
vLLM does (the README lists them). ``response_format`` (``json_object``,
``json_schema``) and forced ``tool_choice`` are enforced by constrained decoding
(``engine/constrain.py``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..engine.protocol import LIMITS, MAX_LOGIT_BIAS, MAX_STOP_STRINGS, Grammar, SamplingParams
from ..errors import BadRequest
from .generation import MAX_CHOICES, ChatPrompt, PromptSpec, TextPrompt, TokenPrompt

MAX_TEMPERATURE = 2.0  # OpenAI's cap (the engine takes any temperature >= 0)
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's cap
MAX_TOOLS = 128  # OpenAI's limit

log = logging.getLogger("mlx_ray.serve")

# OpenAI request fields that would change the answer and are not supported: 400 naming them
REFUSED = {
    "functions": "the legacy functions parameter is not supported; send tools",
    "function_call": "the legacy function_call parameter is not supported; send tool_choice",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning_effort is not supported; a template's switch goes in chat_template_kwargs "
                        "(e.g. {\"enable_thinking\": false})",
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Optional[Union[str, list[str]]] = None
    max_tokens: Optional[int] = Field(None, **LIMITS["max_tokens"].pydantic())
    temperature: float = Field(1.0, **LIMITS["temperature"].pydantic(le=MAX_TEMPERATURE))
    top_p: float = Field(1.0, **LIMITS["top_p"].pydantic())
    seed: Optional[int] = None
    presence_penalty: float = Field(0.0, **LIMITS["presence_penalty"].pydantic())
    frequency_penalty: float = Field(0.0, **LIMITS["frequency_penalty"].pydantic())
    user: Optional[str] = None
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    # extensions understood by vLLM / mlx_lm.server clients
    top_k: int = Field(0, **LIMITS["top_k"].pydantic())
    min_p: float = Field(0.0, **LIMITS["min_p"].pydantic())
    repetition_penalty: float = Field(1.0, **LIMITS["repetition_penalty"].pydantic())
    ignore_eos: bool = False
    timeout: Optional[float] = Field(None, gt=0, description=(
        "A deadline in seconds for the whole request, generation included, that the client sets for itself: "
        "past it, 408 (x-should-retry: false) or a terminal error event. The server's own timeouts are on the "
        "first token and on stalls only."))
    logit_bias: Optional[dict[str, float]] = Field(None, description="Token id (as a string) -> bias in [-100, 100], added to its logit.")
    response_format: Optional["ResponseFormat"] = None

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data):
        if isinstance(data, dict):
            for name, why in REFUSED.items():
                if data.get(name) is not None:
                    raise _param_error(name, why)
            if data.get("modalities") not in (None, ["text"]):
                raise _param_error("modalities", "only text output is supported")
        return data

    @model_validator(mode="after")
    def _check_common(self):
        ignored = sorted(set(self.model_extra or ()) - {"modalities"})
        if ignored:  # vLLM's behaviour: accepted, not used, said in the log
            log.warning("the request has fields this server ignores: %s", ", ".join(ignored))
        stops = self.stop_list()
        if len(stops) > MAX_STOP_STRINGS:
            raise _param_error("stop", f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(s == "" for s in stops):
            raise _param_error("stop", "stop sequences must be non-empty")
        if self.stream_options is not None and not self.stream:
            raise _param_error("stream_options", "stream_options is only allowed with stream: true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: Optional[int], logprobs: bool, top_logprobs: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 0,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=self.stop_list(),
            ignore_eos=self.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs,
            logit_bias=self._logit_bias(), grammar=self.response_format.grammar() if self.response_format else None,
        )

    def _logit_bias(self) -> dict[int, float]:
        bias = self.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS:
            raise BadRequest(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias")
        try:
            return {int(k): float(v) for k, v in bias.items()}
        except ValueError:
            raise BadRequest("logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None  # enforced either way: the schema is the output's grammar


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise _param_error("response_format", "type json_schema needs json_schema.schema")
        return self

    def grammar(self) -> Optional[Grammar]:
        if self.type == "json_object":
            return Grammar("json_object")
        if self.type == "json_schema":
            return Grammar("json_schema", self.json_schema.schema_)
        return None


class FunctionDefinition(BaseModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema; enforced when tool_choice forces a call
    strict: Optional[bool] = None  # OpenAI's: with tool_choice auto the arguments are parsed, not constrained


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class TextPart(BaseModel):
    """A message's content part: text only (an image or audio part is refused, naming its type)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str

    @field_validator("type", mode="before")
    @classmethod
    def _text_only(cls, v):
        if v != "text":
            raise _param_error("messages", f"content part type {v!r} is not supported (text only)")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def template_dict(self) -> dict:
        """The message as chat templates read it (mlx-lm's shape: tool-call arguments as objects)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        extra = self.model_extra or {}
        if self.name is not None:
            out["name"] = self.name
        for key in ("tool_call_id", "reasoning_content"):
            if extra.get(key) is not None:
                out[key] = extra[key]
        if extra.get("tool_calls"):
            out["tool_calls"] = [_template_call(c) for c in extra["tool_calls"]]
        return out

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, **LIMITS["max_tokens"].pydantic())
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, **LIMITS["top_logprobs"].pydantic())
    tools: Optional[list[Tool]] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: bool = True
    # vLLM extensions
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None  # extra template variables, e.g. enable_thinking

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise _param_error("top_logprobs", "top_logprobs requires logprobs: true")
        names = [t.function.name for t in self.tools or ()]
        if self.tool_choice not in (None, "none") and not names:
            raise _param_error("tool_choice", "tool_choice is only allowed when tools are given")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise _param_error("tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, "
                                              f"which is not among the tools ({', '.join(names)})")
        if len(set(names)) != len(names):
            raise _param_error("tools", "tool names must be unique")
        return self

    def to_sampling(self) -> SamplingParams:
        mt = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling(mt, self.logprobs, self.top_logprobs or 0)

    def prompts(self) -> list[PromptSpec]:
        choice = self.tool_choice or "auto"
        tools = tuple(t.model_dump(exclude_none=True) for t in self.tools) if self.tools else None
        return [ChatPrompt(tuple(m.template_dict() for m in self.messages), self.chat_template, tools,
                           choice if isinstance(choice, str) else choice.model_dump(),
                           self.parallel_tool_calls, self.chat_template_kwargs)]


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.echo:
            raise _param_error("echo", "echo is not supported")
        if self.suffix:
            raise _param_error("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise _param_error("best_of", "best_of other than n is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise _param_error("prompt", "prompt must not be empty")
        return self

    def prompts(self) -> list[PromptSpec]:
        """One prompt spec per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [TextPrompt(p)]
        if all(isinstance(x, int) for x in p):
            return [TokenPrompt(tuple(p))]
        if all(isinstance(x, str) for x in p):
            return [TextPrompt(x) for x in p]
        return [TokenPrompt(tuple(x)) for x in p]

    def to_sampling(self) -> SamplingParams:
        # OpenAI's legacy default is 16 tokens for completions
        return self.sampling(self.max_tokens if self.max_tokens is not None else 16,
                             self.logprobs is not None, self.logprobs or 0)


def _template_call(call) -> dict:
    try:
        fn = call["function"]
        args = fn.get("arguments") or {}
        return {"id": call.get("id"), "type": "function",
                "function": {"name": fn["name"], "arguments": json.loads(args) if isinstance(args, str) else args}}
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise BadRequest(f"an assistant tool_calls entry is malformed ({type(e).__name__}: {e}); each needs "
                         "function.name and function.arguments (a JSON string)", param="messages") from None


def _param_error(param: str, message: str) -> ValueError:
    # pydantic wraps ValueErrors; the ingress unwraps BadRequest from ctx["error"]
    return ValueError(BadRequest(message, param=param))


# ---- responses -----------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[dict] = None


class _Choice(BaseModel):
    index: int
    finish_reason: Optional[str] = None
    logprobs: Optional[dict] = None


class ChoiceMessage(BaseModel):
    role: str = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None  # vLLM's field: the thinking section, split off
    tool_calls: Optional[list[dict]] = None


class ChatChoice(_Choice):
    message: ChoiceMessage


class ChunkDelta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[dict]] = None


class ChatChunkChoice(_Choice):
    delta: ChunkDelta


class CompletionChoice(_Choice):
    text: str


class _Object(BaseModel):
    """Common head of OpenAI response objects."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))


class ChatCompletion(_Object):
    object: Literal["chat.completion"] = "chat.completion"
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class ChatCompletionChunk(_Object):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class Completion(_Object):
    object: Literal["text_completion"] = "text_completion"
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(_Object):
    object: Literal["model"] = "model"
    owned_by: str = "mlx-ray"
    root: Optional[str] = None
    parent: Optional[str] = None  # a LoRA adapter's base model (OpenAI's and vLLM's field)
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_Request.model_rebuild()
