"""OpenAI request and response shapes (the subset mlx-ray serves).

Requests are validated here (ranges, combinations), so the ingress can answer
400 naming the parameter. Unknown request fields are ignored, as OpenAI-compatible
servers (vLLM, mlx_lm.server) do. ``response_format: json_object`` is a best
effort: the request is accepted and the model is asked for JSON by the caller's
messages (as OpenAI requires them to say so); decoding is not constrained.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine.protocol import LIMITS, MAX_STOP_STRINGS, SamplingParams
from ..errors import BadRequest
from .generation import MAX_CHOICES, ChatPrompt, PromptSpec, TextPrompt, TokenPrompt

MAX_TEMPERATURE = 2.0  # OpenAI's cap (the engine takes any temperature >= 0)
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's cap


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

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
    timeout: Optional[float] = Field(None, gt=0, description="Per-request deadline in seconds (capped by the server's).")

    @model_validator(mode="after")
    def _check_common(self):
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
        )


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise _param_error("messages", f"content part type {part.get('type')!r} is not supported (text only)")
            parts.append(part.get("text", ""))
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, **LIMITS["max_tokens"].pydantic())
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, **LIMITS["top_logprobs"].pydantic())
    response_format: Optional[ResponseFormat] = None
    chat_template: Optional[str] = None  # vLLM extension

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise _param_error("top_logprobs", "top_logprobs requires logprobs: true")
        if self.response_format is not None and self.response_format.type == "json_schema":
            raise _param_error("response_format", "json_schema is not supported; use {\"type\": \"json_object\"}")
        if self.response_format is not None and self.response_format.type == "json_object":
            if not any("json" in m.text().lower() for m in self.messages):
                raise _param_error("messages", "with response_format json_object, the messages must ask for JSON")
        return self

    def to_sampling(self) -> SamplingParams:
        mt = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling(mt, self.logprobs, self.top_logprobs or 0)

    def prompts(self) -> list[PromptSpec]:
        messages = tuple({"role": m.role, "content": m.text()} for m in self.messages)
        return [ChatPrompt(messages, self.chat_template)]


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


class ChatChoice(_Choice):
    message: ChoiceMessage


class ChunkDelta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


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
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_Request.model_rebuild()
