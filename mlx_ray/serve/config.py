"""One validated config for serving: models, engine limits, placement, API key, CORS.

Loadable from YAML/JSON (``ServeConfig.load``), from a Ray Serve ``args`` dict
(``ServeConfig.from_args``; the short form ``{"model_id": ..., "max_model_len": ...}``
is accepted too) or from env vars (``MODEL_ID``, ``MAX_MODEL_LEN``, ... as the
cluster's RayService already sets them). A bad config raises ``BadRequest``
naming the field, before anything starts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from ..engine.protocol import EngineConfig
from ..errors import BadRequest

DEFAULT_RESOURCE = "gpu_apple_mps"
DEFAULT_ENGINE = "mlx_ray.engine.engine:MLXEngine"


# Streaming defaults, defined once: ServeConfig's fields and LLMServer's own defaults (tests, direct use).
STREAM_BATCHING_INTERVAL_MS = 10.0
STREAM_MESSAGES_PER_S = 50.0
# The longest a stream's tokens are held back for the message budget (the budget's interval is capped here).
MAX_COALESCE_S = 1.0


class PlacementConfig(BaseModel):
    """Where the model's replicas run (Ray actor options of its deployment)."""

    model_config = ConfigDict(extra="forbid")

    resource: Optional[str] = Field(DEFAULT_RESOURCE, description="Custom Ray resource a node must offer (the Mac worker joins with gpu_apple_mps: 1); null: none.")
    resource_amount: float = Field(1.0, gt=0, description="How much of `resource` one replica takes.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved per replica (0 on Apple Silicon: Metal is not a Ray GPU).")
    num_replicas: int = Field(1, ge=1, description="Fixed replica count (ignored when autoscaling_config is set).")
    autoscaling_config: Optional[dict[str, Any]] = Field(None, description="Ray Serve autoscaling_config (min_replicas, max_replicas, ...).")
    max_queued_requests: Optional[int] = Field(None, description=(
        "Requests each caller (the ingress) holds for this model while no replica has room, before answering 429; "
        "-1: unlimited; default: the engine's max_queue (at least 16), so bursts are absorbed while Serve probes replicas."))

    @field_validator("max_queued_requests")
    @classmethod
    def _queued(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v != -1 and v < 1:
            raise ValueError("must be -1 (no limit) or a positive integer")
        return v

    def ray_actor_options(self) -> dict:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        if self.resource:
            opts["resources"] = {self.resource: self.resource_amount}
        return opts


class ModelConfig(BaseModel):
    """One served model: one Serve deployment behind the shared ingress."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(..., min_length=1, description="Model to load: a local MLX/HF directory, a cache name or a hub id.")
    name: Optional[str] = Field(None, description="Name clients put in `model`; default: `model` as given.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine limits (batch size, queue, context, KV budget).")
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    chat_template: Optional[str] = Field(None, description="Jinja chat template overriding the tokenizer's.")
    engine_class: str = Field(DEFAULT_ENGINE, description="`module:Class` of the LLMEngine implementation (tests swap it).")
    tool_parser: Optional[str] = Field(None, description=(
        "mlx-lm tool parser (a module of mlx_lm/tool_parsers/, e.g. json_tools, mistral, qwen3_coder) for this "
        "model's tool calls; default: chosen from the chat template as mlx-lm does; \"none\": no tool calling."))
    think_markers: Optional[tuple[str, str]] = Field(None, description=(
        "Start and end markers of the model's thinking section, split into reasoning_content; default: "
        "mlx-lm's markers found in the vocabulary or the chat template."))
    lora_modules: dict[str, str] = Field(default_factory=dict, description=(
        "Aliases of this model's LoRA adapters, as vLLM's --lora-modules: {alias: adapter name}; a request "
        "names an adapter by `<name>:<adapter>` or by its alias (adapters live beside the model on the cache, "
        "mlx_ray/adapters.py; engine.max_loras of them are held at once)."))

    @model_validator(mode="after")
    def _default_name(self) -> "ModelConfig":
        if not self.name:
            self.name = self.model
        return self

    @property
    def max_ongoing_requests(self) -> int:
        """What one replica accepts at once: exactly the engine's admission limit."""
        return self.engine.max_num_seqs + self.engine.max_queue

    @property
    def max_queued_requests(self) -> int:
        q = self.placement.max_queued_requests
        return q if q is not None else max(16, self.engine.max_queue)

    @property
    def deployment_name(self) -> str:
        """A Serve deployment name derived from the served name (Serve forbids some characters)."""
        return "LLMServer:" + re.sub(r"[^A-Za-z0-9_.\-]+", "_", self.name)[-80:]

    def deployment_options(self, runtime_env: Optional[dict] = None) -> dict:
        opts: dict[str, Any] = {
            "name": self.deployment_name,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.placement.ray_actor_options(),
            "health_check_period_s": 5,
            "health_check_timeout_s": 30,
        }
        if runtime_env:
            opts["ray_actor_options"]["runtime_env"] = runtime_env
        if self.placement.autoscaling_config:
            opts["autoscaling_config"] = self.placement.autoscaling_config
        else:
            opts["num_replicas"] = self.placement.num_replicas
        return opts


class ServeConfig(BaseModel):
    """Everything `mlx-ray serve` and `mlx_ray.serve:app` need."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(..., min_length=1, description="Models served behind one OpenAI ingress (routed on `model`).")
    host: str = Field("127.0.0.1", description="HTTP bind address of Serve's proxy.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of Serve's proxy (0: pick a free one).")
    api_key: Optional[SecretStr] = Field(None, description=(
        "Bearer key required on every endpoint but /health. In-process only: it is never put in a "
        "deployment's init args (Ray stores those in its GCS); deploy with api_key_file or api_key_env."))
    api_key_file: Optional[Path] = Field(None, description="File holding the API key (first line), read where the ingress runs.")
    api_key_env: Optional[str] = Field(None, description="Env var holding the API key, read where the ingress runs.")
    cors_allow_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS; empty: CORS off.")
    first_token_timeout_s: float = Field(600.0, gt=0, description=(
        "Longest wait for a request's first token (queueing and prefill). Past it the request is cancelled "
        "and answered 503 (x-should-retry: true: nothing of it runs any more), or in a stream already "
        "open for keepalives, a terminal error event. Generation time never counts."))
    stall_timeout_s: float = Field(120.0, gt=0, description=(
        "Longest gap between two tokens once generation started (the stream's own coalescing, at most 1 s, "
        "comes on top). Past it the request is cancelled: a stream ends with an error event and [DONE]; a "
        "non-streaming request gets 504 with x-should-retry: false, so the openai SDK does not redo the work. "
        "A stream making progress is never cut."))
    request_timeout_s: Optional[float] = Field(None, gt=0, description=(
        "Deprecated alias of first_token_timeout_s (it used to count generation time too, so long answers "
        "ended in a 408 mid-stream)."))
    max_request_body_bytes: Optional[int] = Field(None, ge=1024, description=(
        "Largest request body accepted; larger ones are refused with 413 before they are read in full, parsed "
        "or tokenized. Default: 64 bytes per token of the largest served context (ordinary text takes about 4; "
        "runs of one character up to the vocabulary's longest token), at least 1 MiB."))
    stream_batching_interval_ms: float = Field(STREAM_BATCHING_INTERVAL_MS, ge=0, description="Coalesce streamed tokens for this long per chunk (proxy overhead).")
    stream_messages_per_s: float = Field(STREAM_MESSAGES_PER_S, ge=0, description=(
        "A model replica's budget of stream messages per second, shared by its open streams: with n open, "
        "each stream's tokens are coalesced for n / budget s (at most 1 s, at least stream_batching_interval_ms), "
        "so streaming's CPU cost stays flat as streams are added. A lone stream still gets every token at once; "
        "first tokens and finishes are never held. 0: no budget."))
    sse_keepalive_s: float = Field(10.0, gt=0, description=(
        "A stream with nothing to send for this long (queued, prefilling) gets an SSE comment line "
        "(': keepalive'), so proxies keep it open."))
    control_loop_interval_s: float = Field(0.5, gt=0, le=10, description=(
        "Serve's control loop period in the cluster `mlx-ray serve` starts itself (Ray's default: 0.1 s, "
        "which on a small machine costs the engine CPU; see the README); a cluster joined with --address "
        "keeps its own."))
    ray_event_stats: bool = Field(False, description=(
        "Ray's own event-loop instrumentation (per-handler event stats and the main service's handler metrics, "
        "RAY_event_stats / RAY_emit_main_service_metrics) in the cluster `mlx-ray serve` starts itself: off by "
        "default, which cuts the Serve path's CPU per streamed token by about a quarter (README, 'Ray's own "
        "instrumentation'); application metrics (Serve's and mlx-ray's) do not depend on it. A cluster joined "
        "with --address keeps its own."))
    ingress_max_ongoing_requests: int = Field(1024, ge=1, description="Concurrent HTTP requests one ingress replica handles.")
    ingress_num_replicas: int = Field(1, ge=1)
    direct_ingress: bool = Field(True, description=(
        "With one model, its replica answers HTTP itself (no separate ingress deployment: one Ray hop and one "
        "process fewer per request); false: always a separate OpenAIIngress deployment."))

    @model_validator(mode="before")
    @classmethod
    def _alias(cls, data: Any) -> Any:
        """request_timeout_s (deprecated) sets first_token_timeout_s."""
        if isinstance(data, dict) and data.get("request_timeout_s") is not None:
            data = dict(data)
            old = data.pop("request_timeout_s")
            if data.get("first_token_timeout_s") is not None and float(data["first_token_timeout_s"]) != float(old):
                raise ValueError("request_timeout_s is the deprecated alias of first_token_timeout_s; set only "
                                 "first_token_timeout_s")
            data["first_token_timeout_s"] = old
        return data

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"served model names must be unique, repeated: {sorted(dup)}")
        if sum(x is not None for x in (self.api_key, self.api_key_file, self.api_key_env)) > 1:
            raise ValueError("set only one of api_key, api_key_file and api_key_env")
        return self

    # -- loading --------------------------------------------------------------

    @classmethod
    def validate_dict(cls, data: dict, source: str = "config") -> "ServeConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise BadRequest(f"{source}: {_first_error(e)}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ServeConfig":
        return cls.validate_dict(read_config_file(path), source=str(path))

    @classmethod
    def from_args(cls, args: Optional[dict] = None, env: Optional[dict] = None) -> "ServeConfig":
        """From a Serve `args` dict (full or short form), falling back to env vars."""
        args = dict(args or {})
        if "config_file" in args:
            base = read_config_file(args.pop("config_file"))
            base.update(args)
            args = base
        if "models" not in args:
            short = _short_form(args, os.environ if env is None else env)
            if short is None:
                raise BadRequest("config: models: no model given; pass args.models, args.model_id or env MODEL_ID")
            args = short
        return cls.validate_dict(args, source="args")

    @property
    def has_api_key(self) -> bool:
        return any(x is not None for x in (self.api_key, self.api_key_file, self.api_key_env))

    def resolve_api_key(self) -> Optional[str]:
        """The key, read now from wherever it is configured (call it where the ingress runs)."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            try:
                key = self.api_key_file.expanduser().read_text().strip().splitlines()[0].strip()
            except (OSError, IndexError) as e:
                raise BadRequest(f"api_key_file {self.api_key_file}: cannot read a key on this node "
                                 f"({e.__class__.__name__}); mount it where the ingress runs, or use api_key_env") from None
            if not key:
                raise BadRequest(f"api_key_file {self.api_key_file} is empty")
            return key
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env, "").strip()
            if not key:
                raise BadRequest(f"api_key_env {self.api_key_env} is not set (or empty) on this node; "
                                 "set it where the ingress runs (a pod env from a Secret, the worker's env)")
            return key
        return None

    def to_args(self) -> dict:
        """A JSON-able dict that `from_args` turns back into this config, without the key itself:
        Ray stores a deployment's init args in its GCS, so only the key's file or env var travels."""
        return self.model_dump(mode="json", exclude_none=True, exclude={"api_key"})

    def model(self, name: str) -> Optional[ModelConfig]:
        return next((m for m in self.models if m.name == name), None)


def read_config_file(path: str | os.PathLike) -> dict:
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as e:
        raise BadRequest(f"config file {p}: {e.strerror or e}") from None
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml / json syntax errors
        raise BadRequest(f"config file {p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"config file {p}: expected a mapping at the top level")
    return data


# short form / env vars -> full form. Keys: arg name, env var, where it goes.
_ENGINE_KEYS = {"max_model_len": "MAX_MODEL_LEN", "max_num_seqs": "MAX_NUM_SEQS", "max_queue": "MAX_QUEUE",
                "prefill_chunk": "PREFILL_CHUNK", "kv_budget_bytes": "KV_BUDGET_BYTES",
                "prefix_cache_bytes": "PREFIX_CACHE_BYTES", "kv_cache": "KV_CACHE", "kv_bits": "KV_BITS",
                "admission": "ADMISSION", "speculative": "SPECULATIVE_CONFIG"}
_PLACEMENT_KEYS = {"resource": "MLX_RAY_RESOURCE", "num_cpus": "NUM_CPUS", "num_gpus": "NUM_GPUS",
                   "num_replicas": "NUM_REPLICAS"}
_TOP_KEYS = {"api_key_file": "API_KEY_FILE", "api_key_env": "API_KEY_ENV",
             "first_token_timeout_s": "FIRST_TOKEN_TIMEOUT_S", "stall_timeout_s": "STALL_TIMEOUT_S",
             "request_timeout_s": "REQUEST_TIMEOUT_S",  # deprecated alias of first_token_timeout_s
             "max_request_body_bytes": "MAX_REQUEST_BODY_BYTES"}


def _short_form(args: dict, env) -> Optional[dict]:
    model = args.pop("model_id", None) or args.pop("model", None) or env.get("MODEL_ID")
    if not model:
        return None
    m: dict[str, Any] = {"model": model, "engine": {}, "placement": {}}
    name = args.pop("served_model_name", None) or env.get("SERVED_MODEL_NAME")
    if name:
        m["name"] = name
    for key, var in _ENGINE_KEYS.items():
        val = args.pop(key, None) if key in args else env.get(var)
        if val is not None:
            m["engine"][key] = val
    for key, var in _PLACEMENT_KEYS.items():
        val = args.pop(key, None) if key in args else env.get(var)
        if val is not None:
            m["placement"][key] = val
    top = {k: args.pop(k) for k in list(args) if k in ServeConfig.model_fields}
    for key, var in _TOP_KEYS.items():
        if key not in top and env.get(var):
            top[key] = env[var]
    if not any(k in top for k in ("api_key", "api_key_file", "api_key_env")) and env.get("API_KEY"):
        top["api_key_env"] = "API_KEY"  # read by the ingress on its node, never copied into init args
    if args:
        raise BadRequest(f"args: unknown field(s) {sorted(args)}")
    return {"models": [m], **top}


def env_form(args: dict) -> dict[str, str]:
    """The env vars that `from_args({})` turns back into these args (one model, the keys above)."""
    models = args.get("models") or []
    if len(models) != 1:
        raise BadRequest("--env-vars names one model (MODEL_ID); several models need the args form")
    m = dict(models[0])
    env = {"MODEL_ID": str(m.pop("model"))}
    name = m.pop("name", None)
    if name and name != env["MODEL_ID"]:
        env["SERVED_MODEL_NAME"] = str(name)
    pairs = [(f"{section}.{key}", keys.get(key), val)
             for section, keys in (("engine", _ENGINE_KEYS), ("placement", _PLACEMENT_KEYS))
             for key, val in (m.pop(section, None) or {}).items()]
    pairs += [(f"models[0].{key}", None, val) for key, val in m.items()]
    pairs += [(key, _TOP_KEYS.get(key), val) for key, val in args.items() if key != "models"]
    left = sorted(where for where, var, val in pairs if var is None or val is None)
    if left:
        raise BadRequest(f"--env-vars: no env var carries {', '.join(left)}; use the args form")
    env.update({var: json.dumps(val) if isinstance(val, (dict, list)) else str(val) for _, var, val in pairs})
    return env


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "(top level)"
    msg = err.get("msg", "invalid")
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{loc}: {msg}{more}"
