"""The router's request path: send each request to the arm the policy picks, retry once before the first
byte, pass the answer through chunk by chunk; and the background loop that probes every arm.

``Router`` holds one ``Arm`` per configured arm (its breaker, its last load, its attempts in flight) and one
aiohttp session. ``handle(path, body, headers)`` returns a Starlette ``Response``:

- The first byte decides. Until an arm's answer has produced its first byte for the client (a streamed
  ``data:`` event, or a whole non-streamed body), nothing has been sent: a refused connection, a timeout,
  a 5xx or a 429, no first token within ``first_token_timeout_s``, or the arm's circuit opening under the
  attempt, all count as a failure of that arm, and the request is tried once more elsewhere
  (``policy.retry_target``). A 4xx other than 429 is the client's own: passed through, not retried.
- After the first byte, the stream is passed through event by event, with only ``"model"`` rewritten to
  the public name. If the arm breaks, stalls for ``stall_timeout_s``, ends without ``[DONE]``, or its
  circuit opens (the Mac went to sleep), the stream ends with an OpenAI error event and ``[DONE]``:
  never a silent truncation, never a hang.
- A client that disconnects closes the arm's connection, which cancels the request there.

The probe loop (``start``) asks every arm ``GET <base_url>/models`` each ``probe_interval_s`` and reads
its load source. A probe that fails opens the arm's circuit at once and aborts that arm's attempts in
flight: those without a first byte are retried elsewhere, streams already running end with an error
event. So a sleeping Mac costs its clients at most one probe interval, not one request timeout each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping, Optional

import aiohttp
from starlette.responses import Response, StreamingResponse

from ..errors import FirstTokenTimeout, MlxRayError, NotFound, StallTimeout, Unavailable, UpstreamTimeout
from .breaker import Breaker
from .config import ArmConfig, RouterConfig
from .loads import ArmLoad, InFlight, parse_mlx_ray_report, parse_prometheus, shifted
from .metrics import RouterMetrics
from .policy import NoArm, Route, arm_state, decide, retry_target
from .request import RouteRequest, route_request
from .sse import DONE, EventReader, error_event, is_data, model_rewriter

log = logging.getLogger("mlx_ray.router")

# Request headers passed on to the arm (the client's Authorization is the router's key, never the arm's).
FORWARD_HEADERS = ("x-request-id", "user-agent", "openai-organization", "openai-project")
# Response headers passed back from the arm.
BACK_HEADERS = ("x-request-id", "x-should-retry", "retry-after", "openai-processing-ms")
ERROR_BODY_LIMIT = 1 << 20  # an arm's error body is read up to this


class _Aborted(Exception):
    """The attempt's arm was taken out (its probe failed) while the attempt waited on it."""


@dataclass(eq=False)
class Attempt:
    """One request's attempt on one arm; ``abort`` wakes whoever waits on it."""

    arm: str
    aborted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    resp: Optional[aiohttp.ClientResponse] = None  # a stream being passed through: closed on abort

    def abort(self, why: str) -> None:
        if not self.aborted.done():
            self.aborted.set_result(why)
            if self.resp is not None:
                self.resp.close()  # wakes the pass-through's pending read


@dataclass
class Failure:
    """Why an attempt failed before its first byte. ``status``/``body``: the arm's own error answer."""

    kind: str  # connect, timeout, first_token, status, busy, aborted, protocol
    message: str
    status: Optional[int] = None
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    counts: bool = True  # a failure of the arm (its breaker counts it); False: it answered, but busy (429)

    def error(self) -> MlxRayError:
        if self.kind == "first_token":
            return FirstTokenTimeout(self.message)
        if self.kind == "timeout":
            return UpstreamTimeout(self.message)
        return Unavailable(self.message, retry_after=1.0)


class Arm:
    """One arm's runtime state in this router replica."""

    def __init__(self, cfg: ArmConfig, rc: RouterConfig, clock: Callable[[], float]):
        self.cfg = cfg
        self.name = cfg.name
        self.url = cfg.base_url
        self.breaker = Breaker(rc.failure_threshold, rc.cooldown_s, clock)
        self.load: Optional[ArmLoad] = None
        self.inflight_at_read = 0  # this router's requests in flight there when the load was read
        self.load_error: Optional[str] = None
        self.probe_error: Optional[str] = "not probed yet"
        self.probed_at: Optional[float] = None
        self.attempts: set[Attempt] = set()
        self.failures = 0  # attempts that failed before their first byte, since start
        key = os.environ.get(cfg.api_key_env, "").strip() if cfg.api_key_env else ""
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.rewrite = model_rewriter(cfg.model, rc.public_model)

    def abort_all(self, why: str) -> None:
        for at in list(self.attempts):
            at.abort(why)

    def report(self) -> dict:
        """This arm as /health shows it."""
        load = self.load
        return {"circuit": self.breaker.state, "up": self.probe_error is None, "probe_error": self.probe_error,
                "load": None if load is None else {k: v for k, v in vars(load).items() if v is not None},
                "load_error": self.load_error, "in_flight": len(self.attempts), "failed_attempts": self.failures}


class Router:
    """The request path and the probe loop of one router replica (see the module's docstring)."""

    def __init__(self, cfg: RouterConfig, *, metrics: Optional[RouterMetrics] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.arms = {a.name: Arm(a, cfg, clock) for a in cfg.arms}
        self.inflight = InFlight()
        self.metrics = metrics or RouterMetrics(cfg.public_model)
        self._client: Optional[aiohttp.ClientSession] = None
        self._probe_tasks: list[asyncio.Task] = []

    @property
    def client(self) -> aiohttp.ClientSession:
        """The one HTTP client of this replica. aiohttp, not httpx: aiohttp is Ray's own dependency, so it is on
        every stock head the router runs on; httpx is not. No pool limit of aiohttp's own (100): the router's
        max_ongoing_requests bounds the connections. Every wait has its own limit (``_race``, ``_get``)."""
        if self._client is None:
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.probe_timeout_s * 2),
                auto_decompress=False)
        return self._client

    # -- the probe loop ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start probing (idempotent); the first round runs before this returns."""
        if not self._probe_tasks:
            loop = asyncio.get_running_loop()
            self._probe_tasks = [loop.create_task(self._probe_loop(a)) for a in self.arms.values()]
            await self.probe_all()

    async def close(self) -> None:
        for t in self._probe_tasks:
            t.cancel()
        self._probe_tasks = []
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _probe_loop(self, arm: Arm) -> None:
        """One arm's probes, one every probe_interval_s from the start of the last (a probe that hangs for its
        timeout does not delay the next one's start more than that): an arm that stops answering is out
        within probe_interval_s + probe_timeout_s."""
        interval, spent = self.cfg.probe_interval_s, 0.0
        while True:
            await asyncio.sleep(max(0.0, interval - spent))
            t0 = self.clock()
            try:
                await self._probe(arm)
            except Exception:  # noqa: BLE001 - the loop must outlive any one probe
                log.exception("probe of arm %s failed", arm.name)
            spent = self.clock() - t0

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(a) for a in self.arms.values()))

    async def _probe(self, arm: Arm) -> None:
        b = arm.breaker
        if b.state == "open":  # nothing to learn until its cool-down ends
            self._export(arm)
            return
        trial = b.state == "half_open"
        if trial and not b.try_acquire():  # a request holds the trial: its outcome decides
            return
        if arm.cfg.load is not None and arm.cfg.load.kind == "mlx_ray":
            # An mlx-ray arm's load report comes from the model's replica itself (its engine's stats), so it is
            # the probe: GET /v1/models of a several-model app is answered by its ingress, which stays up while
            # the model's node sleeps.
            ok, why = await self._read_load(arm)
        else:  # the load is read beside the probe, so a stalled load source cannot delay the next probe
            load = asyncio.ensure_future(self._read_load(arm)) if arm.cfg.load is not None else None
            ok, why, _ = await self._get(arm, arm.url + "/models")
            if load is not None:
                await load
        arm.probed_at = self.clock()
        was = b.state
        b.record_probe(ok)
        arm.probe_error = None if ok else why
        if not ok:
            arm.load = None
            if was == "closed":
                log.warning("arm %s does not answer its probe (%s): circuit open for %gs", arm.name, why, b.cooldown_s)
            arm.abort_all(f"the arm {arm.name!r} stopped answering ({why})")
        self._export(arm)

    async def _read_load(self, arm: Arm) -> tuple[bool, str]:
        """Read the arm's load into ``arm.load`` (None, with ``load_error``, when it fails); (answered, why not)."""
        src = arm.cfg.load
        assert src is not None
        url = src.url
        if src.kind == "mlx_ray" and src.model_name:
            url += ("&" if "?" in url else "?") + "model=" + src.model_name
        at_read = self.inflight.requests(arm.name)
        ok, why, body = await self._get(arm, url)
        arm.inflight_at_read = at_read
        try:
            if not ok:
                raise ValueError(why)
            if src.kind == "prometheus":
                arm.load = parse_prometheus(body.decode("utf-8", "replace"), src.model_name)
            else:
                arm.load = parse_mlx_ray_report(json.loads(body))
            arm.load_error = None
        except ValueError as e:  # the router then counts its own requests in flight there
            arm.load, arm.load_error = None, str(e)
        return ok, why

    async def _get(self, arm: Arm, url: str) -> tuple[bool, str, bytes]:
        async def get() -> tuple[int, bytes]:
            async with self.client.get(url, headers=arm.headers) as r:
                return r.status, await r.read()

        try:
            status, body = await asyncio.wait_for(get(), self.cfg.probe_timeout_s)
        except asyncio.TimeoutError:
            return False, f"no answer within {self.cfg.probe_timeout_s:g}s", b""
        except aiohttp.ClientError as e:
            return False, f"{type(e).__name__}: {e}"[:200], b""
        if status != 200:
            return False, f"HTTP {status} from {url}", body[:500]
        return True, "", body

    def _export(self, arm: Arm) -> None:
        self.metrics.arm_state(arm.name, arm.breaker.state, self.inflight.requests(arm.name))

    # -- the request path ----------------------------------------------------------------------

    def states(self) -> dict:
        out = {}
        for n, a in self.arms.items():
            now = self.inflight.requests(n)
            load = None if a.load is None else shifted(a.load, now - a.inflight_at_read)
            out[n] = arm_state(a.breaker, load, now, self.inflight.queued_tokens(n))
        return out

    def route_request(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> RouteRequest:
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        return route_request(body, headers, self.cfg.sticky_header, rid)

    async def handle(self, path: str, body: dict, headers: Mapping[str, str]) -> Response:
        """Route one OpenAI request (``path``: ``/chat/completions`` or ``/completions``). Raises the taxonomy's
        errors for what the router itself refuses (unknown model: NotFound; no arm: Unavailable)."""
        model = body.get("model")
        if model != self.cfg.public_model:
            raise NotFound(f"model {model!r} is not served here; this router serves {self.cfg.public_model!r} "
                           "(GET /v1/models)", param="model")
        rr = self.route_request(body, headers)
        decision = decide(rr, self.states(), self.cfg)
        if isinstance(decision, NoArm):
            raise self._no_arm(decision)
        route: Optional[Route] = decision
        last: Optional[Failure] = None
        forward = {k: v for k, v in headers.items() if k.lower() in FORWARD_HEADERS}
        while route is not None:
            arm = self.arms[route.arm]
            if not arm.breaker.try_acquire():  # its half-open trial went to a probe meanwhile
                last = Failure("aborted", f"the arm {arm.name!r} is being probed after an outage")
            else:
                self.metrics.sent(arm.name, route.reason, route.retried)
                try:
                    out = await self._attempt(arm, route, rr, path, body, forward)
                except BaseException:  # the client went away: a half-open trial without a verdict is freed
                    arm.breaker.release()
                    raise
                if not isinstance(out, Failure):
                    return out
                last = out
                arm.failures += 1
                if out.counts:
                    arm.breaker.record_failure()
                self.metrics.error(arm.name, out.kind)
                self._export(arm)
                log.info("attempt on arm %s failed before its first byte (%s: %s)", arm.name, out.kind, out.message)
            route = retry_target(route, rr, self.states(), self.cfg)
        assert last is not None
        return self._failed(last)

    def _no_arm(self, d: NoArm) -> Unavailable:
        down = "; ".join(f"{a.name}: {a.probe_error or a.breaker.state}" for a in self.arms.values())
        return Unavailable(f"no arm behind {self.cfg.public_model!r} can take a request now ({down}); "
                           f"retry in {d.retry_after}s", retry_after=d.retry_after)

    def _failed(self, f: Failure) -> Response:
        """The last failure, as the client sees it: the arm's own error answer if it gave one."""
        if f.status is not None:
            return Response(f.body, status_code=f.status, headers=f.headers,
                            media_type=f.headers.get("content-type", "application/json"))
        from ..serve.ingress import error_response

        return error_response(f.error())

    def _headers(self, route: Route, upstream: Optional[Mapping[str, str]] = None) -> dict:
        h = {k: v for k, v in (upstream or {}).items() if k.lower() in BACK_HEADERS}
        h["x-mlx-ray-arm"] = route.arm
        h["x-mlx-ray-route"] = route.reason
        return h

    async def _race(self, aw, at: Attempt, timeout: Optional[float]):
        """``aw``'s result; raises asyncio.TimeoutError after ``timeout``, _Aborted if the attempt is aborted."""
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait({task, at.aborted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        if at.aborted.done():
            raise _Aborted(at.aborted.result())
        raise asyncio.TimeoutError

    async def _attempt(self, arm: Arm, route: Route, rr: RouteRequest, path: str, body: dict,
                       forward: dict) -> "Response | Failure":
        at = Attempt(arm.name)
        arm.attempts.add(at)
        self.inflight.start(arm.name, rr.prompt_tokens)
        self._export(arm)
        stream = bool(body.get("stream"))
        t0 = self.clock()
        limit = self.cfg.first_token_timeout_s if stream else self.cfg.request_timeout_s
        deadline = t0 + limit
        resp: Optional[aiohttp.ClientResponse] = None
        handed_over = first = False
        try:
            # sock_read: the longest silence allowed on the connection. A stream's stall (after its first byte) is
            # caught by it, without a timer of the router's own per chunk.
            quiet = max(self.cfg.stall_timeout_s, self.cfg.first_token_timeout_s) if stream else self.cfg.request_timeout_s
            send = self.client.post(arm.url + path, json={**body, "model": arm.cfg.model},
                                    headers={**forward, **arm.headers, "Accept-Encoding": "identity"},
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=quiet,
                                                                  sock_connect=self.cfg.probe_timeout_s * 2))
            resp = await self._race(send, at, limit)
            left = max(0.0, deadline - self.clock())
            if resp.status != 200:
                data = await self._race(resp.read(), at, left)
                headers = self._headers(route, resp.headers)
                headers["content-type"] = resp.headers.get("content-type", "application/json")
                if resp.status == 429:  # alive but full: retried elsewhere, never a reason to open its circuit
                    arm.breaker.record_success()
                    return Failure("busy", "HTTP 429", 429, data[:ERROR_BODY_LIMIT], headers, counts=False)
                if resp.status >= 500:
                    return Failure("status", f"HTTP {resp.status}", resp.status, data[:ERROR_BODY_LIMIT], headers)
                arm.breaker.record_success()  # the arm answered; the request was wrong
                return Response(arm.rewrite(data), status_code=resp.status, headers=headers,
                                media_type=headers["content-type"])
            if not stream:
                data = await self._race(resp.read(), at, left)
                first = True
                self._first(arm, rr, t0)
                return Response(arm.rewrite(data), headers=self._headers(route, resp.headers),
                                media_type=resp.headers.get("content-type", "application/json"))
            reader = EventReader(resp.content.iter_any())
            head: list[bytes] = []
            while not any(is_data(e) for e in head):
                events = await self._race(reader.next(), at, max(0.0, deadline - self.clock()))
                if events is None:
                    return Failure("protocol", f"the arm {arm.name!r} ended the stream before its first token")
                head += events
            first = True
            self._first(arm, rr, t0)
            handed_over = True
            at.resp = resp
            return StreamingResponse(self._pass_through(arm, at, resp, reader, head), media_type="text/event-stream",
                                     headers={**self._headers(route, resp.headers), "Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        except _Aborted as e:
            return Failure("aborted", str(e))
        except asyncio.TimeoutError:
            if stream:
                return Failure("first_token", f"no first token from arm {arm.name!r} within {limit:g}s "
                                              "(first_token_timeout_s)")
            return Failure("timeout", f"no answer from arm {arm.name!r} within {limit:g}s (request_timeout_s)")
        except aiohttp.ClientError as e:
            return Failure("connect", f"arm {arm.name!r}: {type(e).__name__}: {e}"[:300])
        finally:
            if not handed_over:
                arm.attempts.discard(at)
                self.inflight.finish(arm.name, 0 if first else rr.prompt_tokens)
                self._export(arm)
                if resp is not None:
                    resp.close()

    def _first(self, arm: Arm, rr: RouteRequest, t0: float) -> None:
        self.inflight.first_token(arm.name, rr.prompt_tokens)
        arm.breaker.record_success()
        self.metrics.first_byte(arm.name, self.clock() - t0)

    async def _pass_through(self, arm: Arm, at: Attempt, resp: aiohttp.ClientResponse, reader: EventReader,
                            head: list[bytes]) -> AsyncIterator[bytes]:
        """The stream from its first events on, each batch of events as one write; ends with an error event
        and ``[DONE]`` if the arm fails, stalls or is taken out before its own ``[DONE]``."""
        events, failed = head, None
        try:
            while True:
                if events:
                    out = b"".join(arm.rewrite(e) + b"\n\n" for e in events)
                    yield out
                    if events[-1].strip() == DONE:
                        return
                try:
                    events = await reader.next()
                except (asyncio.TimeoutError, aiohttp.ClientError) as e:
                    events, failed = None, e
                if events is None:  # ended without [DONE], broke, stalled, or taken out by its probe
                    failed = self._cut_short(arm, at, failed)
                if failed is not None:
                    from ..serve.ingress import error_response

                    kind = "stall" if isinstance(failed, StallTimeout) else "stream"
                    self.metrics.error(arm.name, kind)
                    arm.breaker.record_failure()
                    yield error_event(error_response(failed).body)
                    return
        finally:
            arm.attempts.discard(at)
            self.inflight.finish(arm.name)
            self._export(arm)
            resp.close()  # a client that went away: closing the connection cancels the arm's request

    def _cut_short(self, arm: Arm, at: Attempt, e: Optional[BaseException]) -> MlxRayError:
        """Why a started stream ended before its ``[DONE]``, as the error its client sees."""
        if at.aborted.done():
            return Unavailable(f"{at.aborted.result()}; the stream was cut short, retry the request",
                               retry_after=1.0, retryable=False)
        if isinstance(e, asyncio.TimeoutError):  # aiohttp's sock_read (ServerTimeoutError is one too)
            return StallTimeout(f"arm {arm.name!r} sent nothing for {self.cfg.stall_timeout_s:g}s "
                                "(stall_timeout_s); the stream was cut short")
        if e is not None:
            return Unavailable(f"arm {arm.name!r} broke the stream ({type(e).__name__}); it was cut short",
                               retry_after=1.0, retryable=False)
        return Unavailable(f"arm {arm.name!r} ended the stream without [DONE]; it was cut short",
                           retry_after=1.0, retryable=False)

    # -- what /health and /v1/models show ----------------------------------------------------

    def health(self) -> tuple[bool, dict]:
        """(any arm admits, the report per arm)."""
        arms = {n: a.report() for n, a in self.arms.items()}
        ok = any(a.breaker.admits() for a in self.arms.values())
        return ok, {"status": "ok" if ok else "down", "public_model": self.cfg.public_model,
                    "policy": self.cfg.policy, "arms": arms}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.cfg.public_model, "object": "model", "created": 0,
                                            "owned_by": "mlx-ray-router"}]}
