"""The router's one validated config: the public model name, the policy and the arms behind it.

An *arm* is one OpenAI-compatible backend (the cluster's vLLM primary, the Mac's mlx-ray, ...). A
minimal overflow config in YAML::

    public_model: llama-70b
    policy: overflow            # or "ab"
    ttft_slo_s: 10
    arms:
      - name: vllm
        role: primary
        base_url: http://vllm.default.svc:8000/v1
        model: meta-llama/Llama-3.3-70B-Instruct
        load: {prometheus: http://vllm.default.svc:8000/metrics}
        max_waiting: 0          # past its load as soon as one request queues
      - name: mac
        role: secondary
        base_url: http://router-visible-mac:8000/v1
        model: qwen2.5-32b
        load: {mlx_ray: http://router-visible-mac:8000/v1/load}

``load_config(path)`` reads YAML or JSON; every mistake is one ``BadRequest`` line that names the field
and says what to fix, before anything starts.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import BadRequest

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")  # goes into headers and metric labels


def _http_url(v: str, what: str) -> str:
    if not re.match(r"^https?://[^/\s]+", v or ""):
        raise ValueError(f"{what} must be an http:// or https:// URL, got {v!r}")
    return v.rstrip("/")


class LoadSource(BaseModel):
    """Where the router reads an arm's load; set exactly one of ``prometheus`` and ``mlx_ray``.

    - ``prometheus``: a Prometheus text endpoint with vLLM's gauges (``vllm:num_requests_waiting``,
      ``vllm:num_requests_running``, or Ray Serve LLM's ``ray_vllm_...``); ``model_name`` keeps only
      the samples with that ``model_name`` label (one server, several models).
    - ``mlx_ray``: an mlx-ray arm's JSON load report (waiting, running, free KV blocks, measured rates).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prometheus: Optional[str] = Field(None, description="Prometheus text endpoint with vLLM-named gauges.")
    mlx_ray: Optional[str] = Field(None, description="URL of an mlx-ray load report (JSON).")
    model_name: Optional[str] = Field(None, description="Keep only samples with this model_name label.")

    @model_validator(mode="after")
    def _one(self) -> "LoadSource":
        if (self.prometheus is None) == (self.mlx_ray is None):
            raise ValueError("set exactly one of prometheus and mlx_ray")
        if self.prometheus is not None:
            self.prometheus = _http_url(self.prometheus, "prometheus")
        if self.mlx_ray is not None:
            self.mlx_ray = _http_url(self.mlx_ray, "mlx_ray")
        return self

    @property
    def kind(self) -> str:
        return "prometheus" if self.prometheus is not None else "mlx_ray"

    @property
    def url(self) -> str:
        return self.prometheus if self.prometheus is not None else self.mlx_ray  # type: ignore[return-value]


class ArmConfig(BaseModel):
    """One backend behind the router: where it is, which model it serves, and how it is used."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(..., description="Short unique name; sent to clients in the x-mlx-ray-arm header.")
    base_url: str = Field(..., description=(
        "The arm's OpenAI-compatible base URL (http/https, usually ending in /v1). An app of the same Serve cluster "
        "is reached through Serve's proxy, e.g. http://127.0.0.1:8000/mac/v1."))
    model: str = Field(..., min_length=1, description="The arm's own model id, sent upstream (may be '<base>:<adapter>').")
    role: Literal["primary", "secondary"] = Field(..., description="overflow: the primary takes requests first, secondaries take the spill.")
    weight: Optional[float] = Field(None, ge=0, allow_inf_nan=False, description="ab: this arm's share of users (weights need not sum to 1).")
    load: Optional[LoadSource] = Field(None, description="Where to read its load; none: the router counts its own requests in flight.")
    max_waiting: Optional[int] = Field(None, ge=0, description="Past its load when more requests than this wait (queue).")
    max_running: Optional[int] = Field(None, ge=1, description="Past its load when this many run (or, without a load source, are in flight).")
    prefill_tokens_per_s: float = Field(100.0, gt=0, description=(
        "Prompt tokens/s the arm prefills, to predict its time to first token until its load report measures it "
        "(a Mac Mini M4 Pro does about 105 for a dense 27B at 4-bit)."))
    api_key_env: Optional[str] = Field(None, description="Env var holding the key the router sends to this arm, read where the router runs.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"arm name {v!r}: use letters, digits, '.', '_' or '-' (at most 63)")
        return v

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        return _http_url(v, "base_url")


class RouterConfig(BaseModel):
    """The router: one public model name in front of several arms, and how requests are split."""

    model_config = ConfigDict(extra="forbid")

    public_model: str = Field(..., min_length=1, description="The model name clients send and see in every response.")
    policy: Literal["overflow", "ab"] = Field("overflow", description=(
        "overflow: the primary first, spill to a secondary only when the primary is busy and the secondary "
        "meets the TTFT SLO; ab: a weighted split, each user sticky to one arm."))
    arms: list[ArmConfig] = Field(..., min_length=1)
    ttft_slo_s: float = Field(10.0, gt=0, description="overflow: spill only if the secondary's predicted time to first token is within this.")
    first_token_timeout_s: float = Field(60.0, gt=0, description="No first token by then: cancel and retry once on another arm.")
    sticky_header: Optional[str] = Field(None, description="ab: the header that keys a user to an arm; default: the request's `user` field.")
    probe_interval_s: float = Field(2.0, gt=0, description="Seconds between active health probes (and load reads) of each arm.")
    cooldown_s: float = Field(5.0, gt=0, description="How long an open circuit keeps an arm out before one trial request or probe.")
    failure_threshold: int = Field(3, ge=1, description="Consecutive failed requests that open an arm's circuit (one failed probe opens it at once).")
    probe_timeout_s: float = Field(2.0, gt=0, description="A probe (GET <base_url>/models) not answered in this is a failed probe.")
    stall_timeout_s: float = Field(60.0, gt=0, description="A started stream that sends nothing for this long ends with an error event.")
    request_timeout_s: float = Field(600.0, gt=0, description="A non-streaming request's whole answer must come within this (retried once if not).")
    api_key_env: Optional[str] = Field(None, description="Env var holding the key clients must send, read where the router runs.")
    num_replicas: int = Field(1, ge=1, description="Router replicas (each probes the arms itself; A/B hashing needs no shared state).")
    max_ongoing_requests: int = Field(1000, ge=1, description="Requests one router replica proxies at once.")
    placement: Literal["head", "anywhere"] = Field("head", description=(
        "head: the router's replicas run on the head node (Ray's node:__internal_head__ resource), never on the Mac, "
        "whose sleep must not take the router down; anywhere: let Ray place them."))
    host: str = Field("127.0.0.1", description="`mlx-ray route` on an embedded Ray: HTTP bind address.")
    port: int = Field(8000, ge=0, le=65535, description="`mlx-ray route` on an embedded Ray: HTTP port (0: a free one).")

    @field_validator("sticky_header")
    @classmethod
    def _header(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.match(r"^[A-Za-z0-9-]+$", v):
            raise ValueError(f"sticky_header {v!r} is not an HTTP header name")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _check(self) -> "RouterConfig":
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arm names must be unique, repeated: {', '.join(dup)}")
        primaries = [a.name for a in self.arms if a.role == "primary"]
        if self.policy == "overflow":
            if not primaries:
                raise ValueError("policy overflow needs one arm with role: primary (the arm requests go to first)")
            if len(primaries) > 1:
                raise ValueError(f"policy overflow takes one primary, got {', '.join(primaries)}; "
                                 "make the others role: secondary")
            p = self.primary
            if p.max_waiting is None and p.max_running is None:
                raise ValueError(f"primary {p.name!r} sets neither max_waiting nor max_running, so it is never past its "
                                 "load and nothing spills; set one")
            if p.load is None and p.max_running is None:
                raise ValueError(f"primary {p.name!r} has no load source, so the router counts its own requests in "
                                 "flight: set max_running (the count past which requests spill)")
        else:
            unweighted = [a.name for a in self.arms if a.weight is None]
            if unweighted:
                raise ValueError(f"policy ab: give every arm a weight (0 keeps it out of the split), missing on "
                                 f"{', '.join(unweighted)}")
            if not sum(a.weight or 0.0 for a in self.arms) > 0:
                raise ValueError("policy ab: the weights sum to 0; give at least one arm a positive weight")
        return self

    @property
    def primary(self) -> Optional[ArmConfig]:
        return next((a for a in self.arms if a.role == "primary"), None)

    @property
    def secondaries(self) -> list[ArmConfig]:
        return [a for a in self.arms if a.role == "secondary"]

    def arm(self, name: str) -> ArmConfig:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    # -- loading --------------------------------------------------------------

    @classmethod
    def validate_dict(cls, data: Any, source: str = "config") -> "RouterConfig":
        """``data`` validated, or one ``BadRequest`` line naming the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise BadRequest(f"{source}: {_one_line(e, data)}") from None


def load_config(path: str | os.PathLike) -> RouterConfig:
    """The router config in a YAML or JSON file (by suffix: .json is JSON, anything else YAML)."""
    from ..serve.config import read_config_file  # pure Python: no engine, no Ray

    return RouterConfig.validate_dict(read_config_file(path), source=str(path))


def _one_line(e: ValidationError, data: Any) -> str:
    """The first error as ``where: what``, with ``arms.1`` written as ``arms[name]`` when the arm has one."""
    err = e.errors()[0]
    loc = list(err.get("loc", ()))
    if len(loc) >= 2 and loc[0] == "arms" and isinstance(loc[1], int):
        try:
            loc[1] = f"[{data['arms'][loc[1]]['name']}]"
        except (KeyError, IndexError, TypeError):
            loc[1] = f"[{loc[1]}]"
    where = "".join(str(x) if str(x).startswith("[") else f".{x}" for x in loc).lstrip(".")
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return " ".join(f"{where + ': ' if where else ''}{msg}{more}".split())
