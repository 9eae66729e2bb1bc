"""The engine contract: token ids in, typed events out. No HTTP, no Ray.

The server (``mlx_ray.serve``) depends only on this module, so it can be
tested with a fake engine, and the engine can be tested without Serve.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator

from ..errors import BadRequest, MlxRayError
from .chat_format import ChatFormat
from .spec.config import SpeculativeConfig

FinishReason = Literal["stop", "length", "cancelled", "error"]


class EngineConfig(BaseModel):
    """Limits of one engine (one model on one device)."""

    max_num_seqs: int = Field(16, ge=1, description="Requests decoded together in one running batch.")
    max_queue: int = Field(64, ge=0, description="Requests waiting for admission; past it, submit fails with Overloaded.")
    max_model_len: Optional[int] = Field(None, ge=16, description="Context limit; default: the model's.")
    prefill_chunk: int = Field(512, ge=16, description="Prompt tokens prefilled per step (chunked prefill).")
    kv_budget_bytes: Optional[int] = Field(None, ge=0, description="KV-cache bytes for running requests; default from device memory and model size.")
    prefix_cache_bytes: Optional[int] = Field(None, ge=0, description="Bytes of KV kept for prefix reuse (LRU); 0 disables; default a share of the KV budget.")
    stream_interval_ms: float = Field(0.0, ge=0, description="Coalesce text deltas for this long before emitting (0: every token).")
    seed: Optional[int] = Field(None, description="Engine-wide default seed.")
    health_timeout_s: float = Field(120.0, gt=0, description="check_health fails when the generation loop has made no progress for this long.")
    kv_cache: Literal["auto", "paged", "batch"] = Field(
        "auto", description="KV cache: paged (block pool, admission by blocks) where the model allows it (attention "
                            "runs on the device's verified kernel, else on its twin); batch: mlx-lm's rectangular batch cache; auto: paged when it can.")
    kv_bits: Optional[Literal["auto", 4, 8]] = Field(
        "auto", description="Quantize the paged KV cache to this many bits (affine, per group); None: the model's "
                            "dtype; auto: the model's dtype when max_num_seqs sequences of max_model_len fit the "
                            "memory plan (engine/memory.py), else 8.")
    @field_validator("kv_bits", mode="before")
    @classmethod
    def _kv_bits_words(cls, v):  # env vars and YAML: "8", "model" / "none"
        if isinstance(v, str) and v.strip().lower() in ("model", "none", "null"):
            return None
        return int(v) if isinstance(v, str) and v.strip().isdigit() else v

    kv_group_size: Literal[32, 64, 128] = Field(32, description="Group size of the quantized KV cache (32: top-1 agreement >= 0.99 with float KV on the parity prompts, where 64 fell short).")
    kv_block_size: int = Field(32, ge=1, le=1024, description="Tokens per block of the paged KV cache.")
    warmup: bool = Field(True, description="At start, run a few short chat requests (greedy and sampled) through the real "
                                           "path, leaving the chat template's preamble in the prefix cache, then zero the "
                                           "counters: the first users do not pay one-time costs.")
    max_loras: int = Field(4, ge=0, description="LoRA adapters held at once (vLLM's name): each in a slot of the "
                                                "adapted layers, loaded on first use, the least recently used one "
                                                "no running request uses evicted for another; 0: no adapters.")
    speculative: Optional[SpeculativeConfig] = Field(
        None, description="Speculative decoding (paged KV cache only; vLLM's speculative_config): "
                          "{method: ngram|draft, draft_model, num_speculative_tokens, prompt_lookup_min, "
                          "prompt_lookup_max, auto}; None (the default): off.")

    @field_validator("speculative", mode="before")
    @classmethod
    def _speculative_json(cls, v):  # the CLI flag and env vars give it as JSON text
        if isinstance(v, str):
            import json

            v = v.strip()
            if v.lower() in ("", "none", "null", "off"):
                return None
            try:
                return json.loads(v)
            except ValueError as e:
                raise ValueError(f"must be a JSON object such as {{\"method\": \"ngram\"}} ({e})") from None
        return v

    admission: Literal["backfill", "fifo"] = Field(
        "backfill", description="fifo: requests start strictly in arrival order; backfill (paged cache): while the "
                                "oldest waits for KV, later requests that cannot delay it start (EASY backfilling).")
    sleep_grace_s: float = Field(30.0, ge=0, description="Going to sleep (POST /sleep, `mlx-ray finetune "
                                                      "--sleep-serving`), running and queued requests get this long to "
                                                      "finish; the rest end with 503 + Retry-After (an error event in a "
                                                      "stream).")
    sleep_retry_after_s: float = Field(10.0, gt=0, description="Retry-After (seconds) of the 503 that an asleep model "
                                                               "answers (and its GET /v1/load, so a router fails over).")


@dataclass(frozen=True)
class Range:
    """A parameter's valid interval (None: unbounded on that side); ``str`` says it in a 400's words."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False

    def __contains__(self, v) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}]"

    def pydantic(self, **override) -> dict:
        """The same bounds as pydantic ``Field`` keywords (so the OpenAPI schema states them)."""
        kw = {} if self.lo is None else {("gt" if self.lo_open else "ge"): self.lo}
        if self.hi is not None:
            kw["le"] = self.hi
        return {**kw, **override}


MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
# The limits of SamplingParams, defined once: the engine enforces them (``engine/sampling.py``),
# the OpenAI request models declare them (``serve/openai_protocol.py``). 0 disables top_k.
LIMITS: dict[str, Range] = {
    "max_tokens": Range(1),
    "temperature": Range(0),  # 0 is greedy
    "top_p": Range(0, 1, lo_open=True),
    "top_k": Range(0),
    "min_p": Range(0, 1),
    "repetition_penalty": Range(0, lo_open=True),  # 1 disables it
    "presence_penalty": Range(-2, 2),
    "frequency_penalty": Range(-2, 2),
    "top_logprobs": Range(0, MAX_TOP_LOGPROBS),
}


@dataclass(frozen=True)
class Grammar:
    """What a request's output must match, enforced by constrained decoding (``engine/constrain.py``)."""

    kind: Literal["json_object", "json_schema", "lark"]
    spec: Any = None  # the JSON schema (a dict) or the Lark text (which may embed %json {schema})
    param: str = "response_format"  # the request parameter a 400 about it names


MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's limit)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 (below 1e-5: sampling.GREEDY_BELOW_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)  # matched on detokenized text, never emitted
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's EOS
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # 0..MAX_TOP_LOGPROBS
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    grammar: Optional[Grammar] = None  # constrained decoding; None: free text


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    deadline: Optional[float] = None  # time.monotonic() deadline; past it: finish "error" with DeadlineExceeded
    adapter: Optional[str] = None  # a LoRA adapter of the model, by name (mlx_ray/adapters.py); None: the base


# The floor of a reported logprob (vLLM's): -inf and NaN are not JSON, and a token the
# penalties or logit_bias made impossible still gets a number a client can parse.
MIN_LOGPROB = -9999.0


def finite_logprob(v: float) -> float:
    return v if v > MIN_LOGPROB else MIN_LOGPROB  # NaN fails the comparison too


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # >= MIN_LOGPROB, never NaN
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class TokenEvent:
    """New tokens of one request. ``text`` is the delta, never splitting a UTF-8 character."""

    token_ids: list[int]
    text: str
    logprobs: Optional[list[TokenLogprob]] = None


@dataclass
class FinishEvent:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: Optional[MlxRayError] = None


Event = Union[TokenEvent, FinishEvent]


class LLMEngine(abc.ABC):
    """What the server needs from an engine: everything ``serve/server.py`` calls is declared here."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Prompt plus generated tokens one request may hold."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def encode_chat(self, messages: list[dict], chat_template: Optional[str] = None,
                    add_generation_prompt: bool = True, tools: Optional[list[dict]] = None,
                    template_kwargs: Optional[dict] = None) -> list[int]:
        """The chat template applied (with ``tools`` and extra template variables) and tokenized;
        BadRequest when it cannot be."""

    def chat_format(self, chat_template: Optional[str] = None) -> ChatFormat:
        """The tool-call syntax and thinking markers of ``chat_template`` (None: the model's own)."""
        return ChatFormat()

    @abc.abstractmethod
    def decode(self, token_ids: list[int]) -> str: ...

    def adapters(self) -> list[str]:
        """The LoRA adapters a request may name (``GenerationRequest.adapter``); none by default."""
        return []

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream events for ``request``. Raises Overloaded / BadRequest / ContextOverflow
        *before the first event* when the request cannot be admitted."""

    @abc.abstractmethod
    async def cancel(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def check_health(self) -> None:
        """Raise EngineFault if the generation loop is dead or wedged."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """Counters and gauges: running, waiting, kv_bytes_used, kv_budget_bytes,
        prefix_hits, prefix_misses, prompt_tokens_total, generation_tokens_total."""

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    # Sleep and wake (vLLM's /sleep and /wake_up): an engine that can release its memory overrides these.
    async def sleep(self, grace_s: Optional[float] = None) -> dict:
        """Stop admitting, let what runs finish (up to ``grace_s``), end the rest with Unavailable, and
        release the model's memory; returns ``sleep_state()``."""
        raise BadRequest(f"{type(self).__name__} cannot sleep", param="model")

    async def wake_up(self) -> dict:
        """Reload what ``sleep`` released and admit again; returns ``sleep_state()``."""
        raise BadRequest(f"{type(self).__name__} cannot sleep", param="model")

    def sleep_state(self) -> dict:
        """{"sleeping": bool, "state": "awake"|"sleeping"|"asleep"|"waking", ...}."""
        return {"sleeping": False, "state": "awake"}
