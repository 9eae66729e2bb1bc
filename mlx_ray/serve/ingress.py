"""The OpenAI-compatible HTTP ingress: routing, timeouts and status codes.

``OpenAIIngress`` holds one handle per served model (Serve ``DeploymentHandle``s,
or anything with the same ``.options(stream=True).generate.remote(...)`` shape)
and routes on the request's ``model``, sending it a typed ``ModelRequest``
(``generation.py``). The request shapes are ``openai_protocol.py``, the response
bodies ``openai_bodies.py``. Errors of the taxonomy map to statuses in exactly
one table (``STATUS``) and to OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ..errors import (BadRequest, ContextOverflow, DeadlineExceeded, EngineFault, FirstTokenTimeout, MlxRayError,
                      NotFound, Overloaded, RequestTooLarge, StallTimeout, Unavailable, UpstreamTimeout)
from . import openai_protocol as oai
from . import openapi
from .config import MAX_COALESCE_S, ServeConfig
from .generation import ModelRequest, first_error
from .metrics import load_report, prometheus_text
from .openai_bodies import Body, ChatBody, CompletionBody

log = logging.getLogger("mlx_ray.serve")

# The one table: error class -> (HTTP status, OpenAI error type). First match along the MRO wins.
# Timeouts are chosen for the official openai SDK, which repeats 408, 409, 429 and 5xx unless the
# `x-should-retry` header says otherwise (MlxRayError.retryable): a first-token timeout (nothing of the
# request runs any more, mostly a queue) may be repeated; a stall after tokens, or a deadline the
# client set, may not (the retry would redo the work done, and most likely end the same way).
STATUS: dict[type, tuple[int, str]] = {
    RequestTooLarge: (413, "invalid_request_error"),
    ContextOverflow: (400, "invalid_request_error"),
    BadRequest: (400, "invalid_request_error"),
    NotFound: (404, "not_found_error"),
    Overloaded: (429, "rate_limit_error"),
    Unavailable: (503, "service_unavailable"),
    DeadlineExceeded: (408, "timeout_error"),  # the request's own `timeout`; x-should-retry: false
    FirstTokenTimeout: (503, "timeout_error"),  # x-should-retry: true
    StallTimeout: (504, "timeout_error"),  # x-should-retry: false (a stream: an error event)
    UpstreamTimeout: (504, "timeout_error"),
    EngineFault: (500, "server_error"),
    MlxRayError: (500, "server_error"),
}
HEALTH_TIMEOUT_S = 10.0
# A replica whose stats take longer is left out of /metrics, and its /v1/load is a 503.
LOAD_TIMEOUT_S = 5.0
KEEPALIVE = ": keepalive\n\n"  # an SSE comment: clients skip it, proxies see bytes
# A request's own `timeout` is a deadline the engine enforces itself (408); past it plus this grace,
# the replica is taken as wedged or gone: the ingress answers 504 and cancels the request.
UPSTREAM_GRACE_S = 5.0
# Below this, the default body limit never refuses (64 bytes per token of context above it).
MIN_BODY_LIMIT = 1 << 20
BODY_BYTES_PER_TOKEN = 64

# route path -> (method name on OpenAIIngress, HTTP methods)
ROUTES = {
    "/v1/chat/completions": ("chat_completions", ["POST"]),
    "/v1/completions": ("completions", ["POST"]),
    "/v1/models": ("list_models", ["GET"]),
    "/v1/load": ("load", ["GET"]),
    "/health": ("health", ["GET"]),
    "/sleep": ("http_sleep", ["POST"]),  # vLLM's sleep mode: POST /sleep, POST /wake_up, GET /is_sleeping
    "/wake_up": ("http_wake_up", ["POST"]),
    "/is_sleeping": ("http_is_sleeping", ["GET"]),
    "/metrics": ("metrics", ["GET"]),
}
OPEN_PATHS = {"/health", "/metrics"}  # /metrics is open, as vLLM's (counts only, no content)


def error_response(e: BaseException) -> JSONResponse:
    err = as_taxonomy(e)
    status, type_ = next(v for cls, v in STATUS.items() if isinstance(err, cls))
    code = err.code or (err.kind if isinstance(err, (ContextOverflow, RequestTooLarge, FirstTokenTimeout, StallTimeout))
                        else None)
    headers = {}
    if isinstance(err, (Overloaded, Unavailable)):
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    if err.retryable is not None:
        headers["x-should-retry"] = "true" if err.retryable else "false"
    return JSONResponse(oai.error_body(str(err), type_, err.param, code), status_code=status, headers=headers)


def as_taxonomy(e: BaseException) -> MlxRayError:
    """Unwrap Ray's wrappers and translate Serve's own errors into the taxonomy."""
    cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError
    if isinstance(cause, BaseException):
        e = cause
    if isinstance(e, MlxRayError):
        return e
    if isinstance(e, ValidationError):
        return _validation_error(e)
    name = e.__class__.__name__
    if name == "BackPressureError":  # Serve's queue for the model is full
        return Overloaded("the model's queue is full; retry later", retry_after=1.0)
    if name in ("ActorDiedError", "RayActorError", "ActorUnavailableError"):
        return EngineFault("the model's replica died; Serve is restarting it, retry shortly")
    log.error("unexpected error in the ingress: %r", e)
    return EngineFault(f"internal error: {name}: {e}")


def _validation_error(e: ValidationError) -> BadRequest:
    errors = e.errors()
    for err in errors:  # our own message first (a union's other branches report their own errors too)
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ValueError) and inner.args and isinstance(inner.args[0], BadRequest):
            return inner.args[0]
    err = max(errors, key=lambda x: len(x.get("loc", ())))  # a union's deepest branch says the most
    loc = [str(x) for x in err.get("loc", ())]
    param = loc[0] if loc else None
    where = ".".join(loc)
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return BadRequest(f"missing required parameter '{where}'", param=param)
    return BadRequest(f"invalid parameter '{where}': {msg}", param=param)


class OpenAIIngress:
    """FastAPI routes over one handle per model. Plain class: `serve.ingress` is applied by the builder."""

    def __init__(self, servers: dict[str, Any], config: "dict | ServeConfig"):
        self.cfg = config if isinstance(config, ServeConfig) else ServeConfig.from_args(config)
        self.servers = servers

    # -- routes ------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        try:
            req = oai.ChatCompletionRequest.model_validate(await _json(request, await self._body_limit()))
            return await self._run(req, ChatBody(req))
        except Exception as e:  # noqa: BLE001 - every error becomes an OpenAI error body
            return error_response(e)

    async def completions(self, request: Request) -> Response:
        try:
            req = oai.CompletionRequest.model_validate(await _json(request, await self._body_limit()))
            return await self._run(req, CompletionBody(req))
        except Exception as e:  # noqa: BLE001
            return error_response(e)

    async def list_models(self, request: Request) -> Response:
        cards = []
        for m in self.cfg.models:
            n = await self._max_model_len(m)
            cards.append(oai.ModelCard(id=m.name, root=m.model, max_model_len=n))
            cards += [oai.ModelCard(id=f"{m.name}:{a}", root=f"{m.model}:{a}", parent=m.name, max_model_len=n)
                      for a in await self._adapters(m)]
            cards += [oai.ModelCard(id=alias, root=f"{m.model}:{a}", parent=m.name, max_model_len=n)
                      for alias, a in m.lora_modules.items()]
        return JSONResponse(oai.ModelList(data=cards).model_dump())

    async def _adapters(self, m) -> list[str]:
        """The adapters on the cache beside model ``m`` (none while its replica cannot answer)."""
        try:
            return await asyncio.wait_for(_await(self.servers[m.name].adapters.remote()), HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - starting, gone, or an engine without adapters
            log.info("adapters of %s not available (%s)", m.name, type(e).__name__)
            return []

    def _route(self, model: str) -> tuple[Any, Optional[str]]:
        """(the handle of the served model, the LoRA adapter) that a request's ``model`` names: a served
        name, ``<name>:<adapter>``, or an alias of ``lora_modules``; NotFound otherwise."""
        handle = self.servers.get(model)
        if handle is not None:
            return handle, None
        for m in self.cfg.models:
            if model in m.lora_modules:
                return self.servers[m.name], m.lora_modules[model]
        base, _, adapter = model.rpartition(":")
        if base in self.servers and adapter:
            return self.servers[base], adapter
        raise NotFound(f"model '{model}' is not served here; GET /v1/models lists the served models", param="model")

    async def _max_model_len(self, m) -> Optional[int]:
        """The engine's real context length, asked once per model (None while its replica cannot answer)."""
        cache = self.__dict__.setdefault("_context_lens", {})
        if m.name not in cache:
            try:
                cache[m.name] = await asyncio.wait_for(_await(self.servers[m.name].max_model_len.remote()),
                                                       HEALTH_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - starting or gone: the configured limit, not cached
                log.info("max_model_len of %s not available yet (%s)", m.name, type(e).__name__)
                return m.engine.max_model_len
        return cache[m.name]

    async def _body_limit(self) -> int:
        """max_request_body_bytes, or 64 bytes per token of the largest served context (at least 1 MiB)."""
        if self.cfg.max_request_body_bytes is not None:
            return self.cfg.max_request_body_bytes
        lens = [m.engine.max_model_len or await self._max_model_len(m) for m in self.cfg.models]
        return max([MIN_BODY_LIMIT] + [BODY_BYTES_PER_TOKEN * n for n in lens if n])

    async def health(self, request: Request) -> Response:
        async def one(name, handle):
            try:
                return name, await asyncio.wait_for(_await(handle.health.remote()), HEALTH_TIMEOUT_S)
            except asyncio.TimeoutError:
                return name, {"ok": False, "error": f"no answer within {HEALTH_TIMEOUT_S:.0f}s (starting or wedged)"}
            except Exception as e:  # noqa: BLE001 - unreachable replica == unhealthy
                return name, {"ok": False, "error": f"{e.__class__.__name__}: {e}"[:300]}

        results = dict(await asyncio.gather(*(one(n, h) for n, h in self.servers.items())))
        bad = {n: r["error"] for n, r in results.items() if not r["ok"]}
        if bad:
            msg = "; ".join(f"{n}: {err}" for n, err in bad.items())
            return JSONResponse(oai.error_body(f"unhealthy: {msg}", "server_error", None, "unhealthy"),
                                status_code=503, headers={"Retry-After": "5"})
        body: dict = {"status": "ok", "models": {n: "ok" for n in results}}
        # A kernel that failed at run time is off (its calls go to the twin): still healthy, but said here.
        failed = {n: k for n, r in results.items() if (k := (r.get("stats") or {}).get("kernels_failed"))}
        if failed:
            body["kernels_failed"] = failed
        return JSONResponse(body)

    def _named_model(self, request: Request) -> str:
        """The served model a request's ``?model=NAME`` names; without it, the one model served (with
        several, a 400 naming them); an unknown one, a 404."""
        name = request.query_params.get("model")
        if name is None:
            if len(self.servers) != 1:
                raise BadRequest(f"several models are served here ({', '.join(self.servers)}): "
                                 "name one with ?model=NAME", param="model")
            (name,) = self.servers
        elif name not in self.servers:
            raise NotFound(f"model '{name}' is not served here; GET /v1/models lists the served models",
                           param="model")
        return name

    async def load(self, request: Request) -> Response:
        """GET /v1/load[?model=NAME]: a model's load report for a router (``metrics.load_report``).
        Without ``model``, the one model served; with several, a 400 naming them. An asleep model is
        unavailable (503 + Retry-After), so a router's probe fails over."""
        try:
            name = self._named_model(request)
            stats = await self._stats(name)
            m = next(m for m in self.cfg.models if m.name == name)
            if stats.get("sleeping"):
                raise Unavailable(f"model '{name}' is asleep (POST /wake_up wakes it)",
                                  retry_after=m.engine.sleep_retry_after_s)
            return JSONResponse(load_report(name, stats, m.engine.max_num_seqs))
        except Exception as e:  # noqa: BLE001
            return error_response(e)

    async def http_sleep(self, request: Request) -> Response:
        """POST /sleep[?model=NAME][&grace_s=S][&level=1|2] (vLLM's): the model's replica stops admitting,
        lets running requests finish for ``grace_s`` (default the engine's ``sleep_grace_s``), ends the rest
        with 503, and releases its KV pool and weights. vLLM's ``level`` is accepted; both levels release
        the weights here (they reload from the model cache). Answers the replica's state."""
        try:
            name = self._named_model(request)
            q = request.query_params
            if q.get("level", "1") not in ("1", "2"):
                raise BadRequest(f"level must be 1 or 2, got {q['level']!r}", param="level")
            try:
                grace = float(q["grace_s"]) if "grace_s" in q else None
            except ValueError:
                raise BadRequest(f"grace_s must be a number of seconds, got {q['grace_s']!r}",
                                 param="grace_s") from None
            if grace is not None and not 0 <= grace <= 3600:
                raise BadRequest("grace_s must be in [0, 3600]", param="grace_s")
            state = await _await(self.servers[name].sleep.remote(grace))
            return JSONResponse({"is_sleeping": state["sleeping"], **state})
        except Exception as e:  # noqa: BLE001
            return error_response(e)

    async def http_wake_up(self, request: Request) -> Response:
        """POST /wake_up[?model=NAME] (vLLM's): reload the weights from the cache and serve again."""
        try:
            state = await _await(self.servers[self._named_model(request)].wake_up.remote())
            return JSONResponse({"is_sleeping": state["sleeping"], **state})
        except Exception as e:  # noqa: BLE001
            return error_response(e)

    async def http_is_sleeping(self, request: Request) -> Response:
        """GET /is_sleeping[?model=NAME] (vLLM's): {"is_sleeping": bool, ...the replica's state}."""
        try:
            state = await asyncio.wait_for(_await(self.servers[self._named_model(request)].replica_state.remote()),
                                           LOAD_TIMEOUT_S)
            return JSONResponse({"is_sleeping": state["sleeping"], **state})
        except asyncio.TimeoutError:
            return error_response(Unavailable("the model's replica did not answer within "
                                              f"{LOAD_TIMEOUT_S:.0f}s (starting, waking or wedged)", retry_after=5.0))
        except Exception as e:  # noqa: BLE001
            return error_response(e)

    async def metrics(self, request: Request) -> Response:
        """GET /metrics: vLLM's gauges per served model (``model_name`` label), in Prometheus's text
        format; a model whose replica does not answer in ``LOAD_TIMEOUT_S`` is left out."""
        got = await asyncio.gather(*(self._stats(n) for n in self.servers), return_exceptions=True)
        models = {n: s for n, s in zip(self.servers, got) if not isinstance(s, BaseException)}
        body, content_type = prometheus_text(models)
        return Response(body, media_type=content_type)

    async def _stats(self, name: str) -> dict:
        """The engine stats of model ``name``'s replica; Unavailable (503) when it does not answer in time."""
        try:
            return await asyncio.wait_for(_await(self.servers[name].stats.remote()), LOAD_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise Unavailable(f"model '{name}': its replica did not answer within {LOAD_TIMEOUT_S:.0f}s "
                              "(starting or wedged)", retry_after=5.0) from None
        except Exception as e:  # noqa: BLE001 - gone or failing: not a load anyone can use
            log.info("stats of %s not available: %s: %s", name, type(e).__name__, e)
            raise Unavailable(f"model '{name}': its replica cannot report its load "
                              f"({type(e).__name__})", retry_after=5.0) from None

    # -- the shared request path ---------------------------------------------------

    async def _run(self, req, fmt: Body) -> Response:
        handle, adapter = self._route(req.model)
        rid = uuid.uuid4().hex
        # req.timeout: a deadline the client sets itself (the engine enforces it); the server's own
        # timeouts are on the first token and on stalls, never on generation that makes progress.
        call = ModelRequest(req.prompts(), req.to_sampling(), req.n, req.timeout, rid, adapter)
        stream = handle.options(stream=True).generate.remote(call)
        batches = _Batches(stream, self.cfg.first_token_timeout_s,
                           self.cfg.stall_timeout_s + max(MAX_COALESCE_S, self.cfg.stream_batching_interval_ms / 1000),
                           req.timeout + UPSTREAM_GRACE_S if req.timeout else None)
        try:  # a stream starts once admitted: admission errors come at once, a long prefill gets keepalives
            first = await batches.next(self.cfg.sse_keepalive_s if req.stream else None)
        except BaseException:
            batches.cancel()
            raise
        early = first_error(first) if first else None
        if early is not None:
            batches.cancel()
            raise early
        if not req.stream:
            try:
                async for batch in batches.rest(first):
                    fmt.add(batch)
            finally:
                batches.cancel()
            if fmt.error is not None:
                raise fmt.error
            return JSONResponse(fmt.final())
        choices = len(call.prompts) * call.n
        return StreamingResponse(self._sse(batches, first, fmt, req.include_usage(), choices), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, batches: "_Batches", first, fmt: Body, include_usage: bool,
                   choices: int) -> AsyncIterator[str]:
        tail = text = ""
        try:
            try:
                async for batch in batches.rest(first, self.cfg.sse_keepalive_s):
                    if batch is None:  # nothing for sse_keepalive_s (queued, prefilling): a comment line
                        yield KEEPALIVE
                        continue
                    # a batch's chunks as one body write: one ASGI message, one Ray message to the proxy;
                    # the last batch waits for the stream's end and goes with its closing frames
                    text = "".join(_event(chunk) for chunk in fmt.chunks(batch))
                    if fmt.error is not None:
                        break
                    if len(fmt.finish) >= choices:
                        tail = text
                    elif text:
                        yield text
            except Exception as e:  # noqa: BLE001 - a timeout or a lost replica mid-stream: a terminal error event
                fmt.error = as_taxonomy(e)
                text = ""
            if fmt.error is not None:
                tail = text + f"data: {error_response(fmt.error).body.decode()}\n\n"
            elif include_usage:
                tail += _event(fmt.usage_chunk())
            yield tail + "data: [DONE]\n\n"
        finally:
            batches.cancel()  # no-op once finished; on client disconnect it stops the engine


def _event(chunk: dict) -> str:
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


async def _json(request: Request, limit: int) -> Any:
    raw = await _body(request, limit)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}", param=None) from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def _body(request: Request, limit: int) -> bytes:
    """The raw body, refused (413) as soon as it is known to exceed ``limit``: by its Content-Length
    before anything is read, else while it arrives. Nothing larger is parsed or tokenized."""
    def too_large(size: str) -> RequestTooLarge:
        return RequestTooLarge(f"the request body is {size} bytes, more than the {limit} this server accepts "
                               "(max_request_body_bytes; a prompt that long cannot fit the model's context)")

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"over {size}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _await(x):
    return await x


class _Batches:
    """Iterate a streamed Serve response; cancel it (and thus the engine requests) when abandoned.

    Timeouts count waiting, never progress: the first batch must come within ``first_s``
    (queueing and prefill; else FirstTokenTimeout), each later one within ``stall_s`` of the
    one before (else StallTimeout). With ``total_s`` (the request's own deadline plus a grace),
    the whole response must arrive within it (else UpstreamTimeout: the engine enforces that
    deadline itself, so the replica is wedged or gone). Each raises after cancelling the stream.
    """

    def __init__(self, stream, first_s: float, stall_s: float, total_s: Optional[float] = None):
        self.stream = stream
        self.it = stream.__aiter__()
        self.done = False
        self.first_s, self.stall_s, self.total_s = first_s, stall_s, total_s
        self.t0 = time.monotonic()
        self.batches = 0  # received so far
        self.deadline = self.t0 + first_s
        self._pending: Optional[asyncio.Future] = None

    async def next(self, within: Optional[float] = None):
        """The next batch; None when ``within`` seconds pass first (the same wait goes on at the next call)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._next())
        if within is not None:
            done, _ = await asyncio.wait({self._pending}, timeout=within)
            if not done:
                return None
        fut, self._pending = self._pending, None
        return await fut

    async def _next(self):
        end = self.deadline if self.total_s is None else min(self.deadline, self.t0 + self.total_s)
        try:
            batch = await asyncio.wait_for(self.it.__anext__(), max(0.0, end - time.monotonic()))
        except StopAsyncIteration:
            self.done = True
            return []
        except asyncio.TimeoutError:
            self.cancel()
            raise self._timeout() from None
        self.batches += 1
        self.deadline = time.monotonic() + self.stall_s
        return batch

    def _timeout(self) -> MlxRayError:
        if self.total_s is not None and time.monotonic() >= self.t0 + self.total_s:
            return UpstreamTimeout(f"the model's replica did not answer within {self.total_s:.0f}s "
                                   "(wedged or restarting); the request was cancelled, retry",
                                   retryable=None if self.batches == 0 else False)
        if self.batches == 0:
            return FirstTokenTimeout(f"no first token within {self.first_s:g}s (queued or prefilling; "
                                     "first_token_timeout_s); the request was cancelled, retry later")
        return StallTimeout(f"generation made no progress for {self.stall_s:g}s (stall_timeout_s); the request "
                            "was cancelled after it had started, so it is not retried automatically")

    async def rest(self, first, keepalive_s: Optional[float] = None):
        """The batches from ``first`` on; with ``keepalive_s``, None after each such wait without one."""
        yield first
        while not self.done:
            batch = await self.next(keepalive_s)
            if batch is None or batch:
                yield batch
        self.done = True

    def cancel(self):
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        if not self.done:
            self.done = True
            cancel = getattr(self.stream, "cancel", None)
            if cancel is not None:
                cancel()


# ---- the FastAPI app ----------------------------------------------------------------------


class _APIKeyMiddleware:
    """Pure ASGI (streaming-safe): require `Authorization: Bearer <key>` on all but OPEN_PATHS."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").rstrip("/") not in OPEN_PATHS:
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                resp = JSONResponse(oai.error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                                                   "invalid_request_error", None, "invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _base_app(cfg: ServeConfig) -> FastAPI:
    app = FastAPI(title="mlx-ray", description="OpenAI-compatible API served by mlx-ray on Ray Serve")
    key = cfg.resolve_api_key()  # in a replica: read on the ingress's node, never from init args
    if key is not None:
        app.add_middleware(_APIKeyMiddleware, key=key)
    if cfg.cors_allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_allow_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    return app


def create_app(ingress: OpenAIIngress) -> FastAPI:
    """A FastAPI app over an ingress instance (no Serve: unit tests, embedding)."""
    return _routes_app(ingress.cfg, lambda: ingress)


def asgi_app_builder(config: dict) -> Callable[[], FastAPI]:
    """What `serve.ingress` wraps: a builder *function* that makes the app inside the replica.

    Serve takes a function as it is on every Ray from 2.53 to the newest, but
    cloudpickles an app object, which fails on 2.53 with FastAPI >= 0.129 (its
    app holds a lock). The routes find the replica's own ``OpenAIIngress`` when a
    request comes (Serve sets ``servable_object`` after the constructor ran).
    """

    def build_asgi_app() -> FastAPI:
        return _routes_app(ServeConfig.from_args(config), _replica_ingress)

    return build_asgi_app


def _replica_ingress() -> OpenAIIngress:
    from ray import serve

    return serve.get_replica_context().servable_object


def _routes_app(cfg: ServeConfig, resolve: Callable[[], OpenAIIngress]) -> FastAPI:
    app = _base_app(cfg)
    for path, (name, methods) in ROUTES.items():
        app.add_api_route(path, _endpoint(resolve, name), methods=methods, openapi_extra=openapi.request_body(path))
    openapi.document_request_bodies(app)
    return app


def _endpoint(resolve: Callable[[], OpenAIIngress], name: str):
    async def endpoint(request: Request):
        return await getattr(resolve(), name)(request)

    endpoint.__name__ = name
    return endpoint
