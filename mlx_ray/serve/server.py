"""LLMServer: the shim between one engine and the ingress (a plain class, no Serve).

It turns a ``ModelRequest``'s prompts (``generation.py``) into token ids, fans
``n`` choices out as engine requests,
merges their event streams and coalesces them into batches (one batch per
``stream_batching_interval_ms``, the first one and finishes at once), as Ray
Serve LLM does, so the proxy carries few large messages instead of one per
token. Under load the interval grows: ``stream_messages_per_s`` is the replica's
budget of stream messages, shared by its open streams (``Inbox``). It knows
nothing of HTTP: errors travel as ``FinishEvent(error=...)`` and the ingress
maps them. ``check_health`` is what Serve calls; it calls the engine's, so a
dead generation loop makes Serve replace the replica.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib
import logging
import os
import time
import uuid
from typing import AsyncIterator, Optional

from ..engine.protocol import FinishEvent, GenerationRequest, LLMEngine, TokenEvent
from ..errors import BadRequest, ContextOverflow, EngineFault, MlxRayError
from .config import MAX_COALESCE_S, STREAM_BATCHING_INTERVAL_MS, STREAM_MESSAGES_PER_S, ModelConfig
from . import chat
from .chat_output import ChoiceSplitter
from .generation import MAX_CHOICES, ChatPrompt, ChoiceEvent, ModelRequest, PromptSpec, TextPrompt
from .metrics import ServerMetrics

log = logging.getLogger("mlx_ray.serve")

# A prompt with more characters than this many times (the vocabulary's longest token x the context)
# cannot fit: refused before it is tokenized. 2: input normalization (NFC) may merge characters.
CHARS_PER_TOKEN_MARGIN = 2


def load_engine_class(path: str) -> type:
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise BadRequest(f"engine_class {path!r} cannot be imported: {e}", param="engine_class") from None


def build_engine(cfg: ModelConfig) -> LLMEngine:
    cls = load_engine_class(cfg.engine_class)
    if hasattr(cls, "from_config"):
        return cls.from_config(cfg.model, cfg.engine)
    return cls(cfg.model, cfg.engine)


class LLMServer:
    """Owns one engine. Built by Serve from a ModelConfig dict, or directly in tests."""

    def __init__(self, model_config: dict | ModelConfig,
                 stream_batching_interval_ms: float = STREAM_BATCHING_INTERVAL_MS,
                 engine: Optional[LLMEngine] = None, stream_messages_per_s: float = STREAM_MESSAGES_PER_S):
        self._gauge_task: Optional[asyncio.Task] = None
        self._started = False
        self._start_lock: Optional[asyncio.Lock] = None
        self.cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.model_validate(model_config)
        self.interval = stream_batching_interval_ms / 1000.0
        self.messages_per_s = stream_messages_per_s
        self.open_streams = 0
        self.metrics = ServerMetrics(self.cfg.name)
        # Chat templates and tokenization run here, off the event loop (with direct ingress it is also
        # the HTTP loop), one at a time as before (a tokenizer is not safe to share between threads).
        self._prompt_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._token_chars: Optional[int] = None  # the vocabulary's longest token, in characters (0: unknown)
        # The model loads in start() (Serve's first health check), off the constructor.
        self.engine = engine if engine is not None else build_engine(self.cfg)

    async def start(self) -> None:
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self._started:
                await self.engine.start()
                self._started = True
                self._gauge_task = asyncio.get_running_loop().create_task(self._update_gauges())

    async def _update_gauges(self) -> None:
        while True:
            try:
                self.metrics.observe_stats(self.engine.stats())
            except Exception:  # stats are best effort; health is checked elsewhere
                log.debug("engine.stats() failed", exc_info=True)
            await asyncio.sleep(2.0)

    # -- what Serve and the ingress call ---------------------------------------

    async def check_health(self) -> None:
        """Serve's replica health check: raises when the engine's loop is dead."""
        await self.start()
        self.engine.check_health()

    async def health(self) -> dict:
        """For the ingress's GET /health: {"ok": bool, "error": str|None, "stats": {...}}."""
        try:
            await self.check_health()
        except Exception as e:
            return {"ok": False, "error": str(e) or e.__class__.__name__}
        return {"ok": True, "error": None, "stats": self.engine.stats()}

    async def info(self) -> dict:
        await self.start()
        return {"name": self.cfg.name, "model": self.cfg.model, "node_id": _node_id(), "pid": os.getpid(),
                "max_model_len": self.engine.max_model_len, **_runtime_facts()}

    async def stats(self) -> dict:
        await self.start()
        return self.engine.stats()

    # -- sleep and wake (vLLM's /sleep, /wake_up, /is_sleeping; `mlx-ray finetune --sleep-serving`) ----------

    async def sleep(self, grace_s: Optional[float] = None, node_id: Optional[str] = None) -> dict:
        """Put the engine to sleep (``engine.sleep``); with ``node_id``, only if this replica runs on that
        Ray node. Returns ``replica_state()``."""
        await self.start()
        if node_id is None or node_id == _node_id():
            await self.engine.sleep(grace_s)
        return await self.replica_state()

    async def wake_up(self, node_id: Optional[str] = None) -> dict:
        """Wake the engine (``engine.wake_up``); with ``node_id``, only if this replica runs on that node."""
        await self.start()
        if node_id is None or node_id == _node_id():
            await self.engine.wake_up()
        return await self.replica_state()

    async def replica_state(self) -> dict:
        """Which replica this is (model, replica id, Ray node, pid) and its engine's ``sleep_state()``."""
        await self.start()
        return {"model": self.cfg.name, "replica": _replica_id(), "node_id": _node_id(), "pid": os.getpid(),
                **self.engine.sleep_state()}

    async def generate(self, request: ModelRequest) -> AsyncIterator[list[ChoiceEvent]]:
        """Stream batches of ChoiceEvents for ``len(request.prompts) * request.n`` choices.

        Choice ``p * n + i`` is prompt ``p``'s i-th sample (seed + i when seeded).
        An error before any token is one batch of FinishEvents carrying it.
        """
        t0 = time.monotonic()
        rid = request.request_id or uuid.uuid4().hex
        deadline = t0 + request.timeout_s if request.timeout_s else None
        try:
            await self.start()
            reqs, splitters = await self._prepare(rid, request, deadline)
        except MlxRayError as e:
            self.metrics.request_done(e.kind)
            yield [ChoiceEvent(i, FinishEvent("error", 0, 0, error=e))
                   for i in range(len(request.prompts) * max(1, request.n))]
            return
        inbox = Inbox()
        tasks = [asyncio.get_running_loop().create_task(self._pump(i, r, inbox)) for i, r in enumerate(reqs)]
        pending = set(range(len(reqs)))
        first_token_at: dict[int, float] = {}
        last_token_at: dict[int, float] = {}
        status = "ok"
        self.open_streams += 1
        try:
            not_before = 0.0  # the first batch at once (TTFT)
            while pending:
                batch = await inbox.take(not_before)
                now = time.monotonic()
                out = []
                for idx, ev in batch:
                    if isinstance(ev, TokenEvent):
                        if idx not in first_token_at:
                            first_token_at[idx] = now
                            self.metrics.ttft.observe(now - t0)
                        last_token_at[idx] = now
                        split = splitters.get(idx)
                        out.append(ChoiceEvent(idx, ev, self._token_texts(ev), split and split.feed(ev.text)))
                    else:
                        pending.discard(idx)
                        self.metrics.finished(ev, first_token_at.get(idx), last_token_at.get(idx))
                        if ev.error is not None:
                            status = ev.error.kind
                        split = splitters.get(idx)
                        out.append(ChoiceEvent(idx, ev, None, split and split.finish()))
                yield out
                not_before = asyncio.get_running_loop().time() + self.stream_interval()
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            self.open_streams -= 1
            for t in tasks:
                if not t.done():
                    t.cancel()
            for idx in pending:
                try:
                    await self.engine.cancel(reqs[idx].request_id)
                except Exception:
                    log.debug("cancel of %s failed", reqs[idx].request_id, exc_info=True)
            self.metrics.request_done(status)

    def stream_interval(self) -> float:
        """Seconds between two batches of one stream: the configured interval, or under load the message
        budget's share of each open stream (n streams at B messages/s: n / B), whichever is longer.

        Each message costs CPU in this replica, Serve's proxy and the client whatever it holds, so
        one token per message and step spends more of a small machine on streaming as streams
        are added; with a budget, that cost stays flat and messages carry more tokens.
        """
        if self.messages_per_s <= 0:
            return self.interval
        return max(self.interval, min(MAX_COALESCE_S, self.open_streams / self.messages_per_s))

    # -- internals ---------------------------------------------------------------

    async def _prepare(self, rid: str, request: ModelRequest, deadline: Optional[float]
                       ) -> tuple[list[GenerationRequest], dict[int, ChoiceSplitter]]:
        """``_requests`` on the prompt thread: templates and tokenizers take milliseconds to seconds."""
        if self._prompt_pool is None:
            self._prompt_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlx-ray-prompts")
        return await asyncio.get_running_loop().run_in_executor(self._prompt_pool, self._requests, rid, request,
                                                                deadline)

    def _requests(self, rid: str, request: ModelRequest, deadline: Optional[float]
                  ) -> tuple[list[GenerationRequest], dict[int, ChoiceSplitter]]:
        """The engine requests, and a splitter per chat choice (content / reasoning / tool calls)."""
        if not 1 <= request.n <= MAX_CHOICES:
            raise BadRequest(f"n must be in [1, {MAX_CHOICES}], got {request.n}", param="n")
        max_len = self.engine.max_model_len
        reqs, splitters = [], {}
        for p, spec in enumerate(request.prompts):
            self._check_length(spec, max_len)
            sp = request.sampling
            plan = chat.plan(self.engine, spec, self.cfg) if isinstance(spec, ChatPrompt) else None
            ids = plan.ids if plan else spec.token_ids(self.engine, self.cfg.chat_template)
            if not ids:
                raise BadRequest("the prompt is empty after tokenization", param=spec.param)
            if plan and plan.grammar is not None:
                if sp.grammar is not None:
                    raise BadRequest("response_format cannot be combined with a forced tool_choice "
                                     "(the tool call's schema is the output's grammar)", param="response_format")
                sp = dataclasses.replace(sp, grammar=plan.grammar)
            if sp.max_tokens <= 0:  # "as many as fit", OpenAI's chat default
                if len(ids) >= max_len:
                    raise ContextOverflow(
                        f"the prompt has {len(ids)} tokens but the context is {max_len}; shorten the prompt",
                        param=spec.param)
                else:
                    sp = dataclasses.replace(sp, max_tokens=max_len - len(ids))
            for i in range(request.n):
                s = sp if sp.seed is None or i == 0 else dataclasses.replace(sp, seed=sp.seed + i)
                if plan is not None:
                    splitters[len(reqs)] = plan.splitter()
                reqs.append(GenerationRequest(f"{rid}-{p}-{i}", list(ids), dataclasses.replace(s), deadline,
                                              adapter=request.adapter))
        return reqs, splitters

    def _check_length(self, spec: PromptSpec, max_len: int) -> None:
        """ContextOverflow, before tokenizing, for a prompt with too many characters to fit any way."""
        if self._token_chars is None:
            self._token_chars = _longest_token_chars(self.engine)
        if not self._token_chars:
            return
        if isinstance(spec, TextPrompt):
            chars = len(spec.text)
        elif isinstance(spec, ChatPrompt):  # what every template renders in full: the users' own text
            chars = sum(len(m["content"]) for m in spec.messages
                        if m.get("role") == "user" and isinstance(m.get("content"), str))
        else:
            return
        if chars > CHARS_PER_TOKEN_MARGIN * self._token_chars * max_len:
            raise ContextOverflow(f"the prompt has {chars} characters, more than the context of {max_len} tokens "
                                  "can hold; shorten the prompt", param=spec.param)

    async def adapters(self) -> list[str]:
        """The LoRA adapters of the model (what GET /v1/models lists under it)."""
        await self.start()
        return await asyncio.to_thread(self.engine.adapters)

    async def max_model_len(self) -> int:
        """The engine's real context length (what GET /v1/models reports)."""
        await self.start()
        return self.engine.max_model_len

    async def _pump(self, idx: int, req: GenerationRequest, inbox: "Inbox") -> None:
        """Forward one engine stream into the shared inbox; always ends with a FinishEvent."""
        try:
            async for ev in self.engine.generate(req):
                inbox.put_nowait((idx, ev))
                if isinstance(ev, FinishEvent):
                    return
            inbox.put_nowait((idx, FinishEvent("error", len(req.prompt_token_ids), 0,
                                               error=EngineFault("the engine ended a stream without finishing it"))))
        except asyncio.CancelledError:
            raise
        except MlxRayError as e:
            inbox.put_nowait((idx, FinishEvent("error", len(req.prompt_token_ids), 0, error=e)))
        except Exception as e:  # an engine bug: surface it as a fault, never hang the request
            log.exception("engine stream failed")
            inbox.put_nowait((idx, FinishEvent("error", len(req.prompt_token_ids), 0,
                                               error=EngineFault(f"engine failed: {e.__class__.__name__}: {e}"))))

    def _token_texts(self, ev: TokenEvent) -> Optional[dict]:
        if not ev.logprobs:
            return None
        ids = {lp.token_id for lp in ev.logprobs}
        for lp in ev.logprobs:
            ids.update(t for t, _ in lp.top)
        return {i: self._decode_one(i) for i in ids}

    def _decode_one(self, token_id: int) -> str:
        return self.engine.decode([token_id])

    async def shutdown(self) -> None:
        if self._gauge_task is not None:
            self._gauge_task.cancel()
        if self._prompt_pool is not None:
            self._prompt_pool.shutdown(wait=False)
        if self._started:
            await self.engine.shutdown()

    def __del__(self):  # Serve tears replicas down without awaiting anything
        if self._gauge_task is not None:
            self._gauge_task.cancel()


class Inbox:
    """The events of one request's choices, taken in batches: a batch waits for ``not_before`` (the
    stream's interval), except that a finish is handed over at once. One event loop; no locks."""

    __slots__ = ("items", "urgent", "_waiter")

    def __init__(self):
        self.items: list = []
        self.urgent = False
        self._waiter: Optional[asyncio.Future] = None

    def put_nowait(self, item: tuple) -> None:
        first = not self.items
        self.items.append(item)
        if isinstance(item[1], FinishEvent):
            self.urgent = True
        if (first or self.urgent) and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self, not_before: float) -> list:
        """Every event so far, once there is one and ``not_before`` (the loop's clock) has passed or one finishes."""
        loop = asyncio.get_running_loop()
        while not (self.items and (self.urgent or loop.time() >= not_before)):
            self._waiter = loop.create_future()
            timer = loop.call_at(not_before, _wake, self._waiter) if self.items else None
            try:
                await self._waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        out, self.items, self.urgent = self.items, [], False
        return out


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _node_id() -> Optional[str]:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _replica_id() -> Optional[str]:
    """This Serve replica's id (None outside a replica)."""
    try:
        from ray import serve

        rid = serve.get_replica_context().replica_id
    except Exception:  # noqa: BLE001 - not in a replica, or no Serve
        return None
    return getattr(rid, "unique_id", None) or str(rid)


def _longest_token_chars(engine: LLMEngine) -> int:
    """The characters of the vocabulary's longest token (a byte-level BPE token's string has one
    character per byte, at least as many as the text it stands for); 0 when it cannot be had."""
    tok = getattr(engine, "tokenizer", None)
    hf = getattr(tok, "_tokenizer", tok)
    try:
        vocab = hf.get_vocab()
        return max(map(len, vocab)) if vocab else 0
    except Exception:  # noqa: BLE001 - no tokenizer of that kind: no early check
        return 0


def _runtime_facts() -> dict:
    """What decides CPU speed inside this replica process (Ray sets its own thread env vars)."""
    from ..blas import loaded_blas, threads as blas_threads

    facts = {"blas": loaded_blas(), "blas_threads": blas_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
             "niceness": os.nice(0),
             "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    try:
        from mlx_ray.kernels import dense, qmm
    except ImportError:
        return {**facts, "kernels": {}}
    states = [k.status() for k in (qmm, dense)]
    facts.update(kernels={st["name"]: st["active"] for st in states}, kernel_threads=states[0].get("threads"))
    try:  # the Metal kernels' on-device verdicts (mlx_ray/kernels/gate.py): enabled, and why (not)
        from mlx_ray.kernels import gate

        facts["metal_kernels"] = {v.name: {"enabled": v.enabled, "reason": v.reason, "speedup": v.speedup,
                                           "device": v.device} for v in gate.verdicts()}
    except Exception as e:  # noqa: BLE001 - info() must answer even if the verdicts cannot be had
        facts["metal_kernels"] = {"error": f"{type(e).__name__}: {e}"}
    return facts
