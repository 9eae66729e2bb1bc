"""MLXEngine: the async face of the generation loop (``scheduler.py``).

It loads the model (``loader.py``), validates and admits requests on the
caller's event loop (raising ``Overloaded`` / ``BadRequest`` /
``ContextOverflow`` before the first event), and streams the loop's events
back through an ``asyncio.Queue`` per request. All MLX work runs on the loop
thread, never on the event loop.

The tokenizer helpers (``encode``, ``encode_chat``) are here for the server;
the loop itself only speaks token ids.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import mlx.core as mx

from .. import blas
from ..errors import BadRequest, ContextOverflow, EngineFault, Overloaded, Unavailable
from . import backend as kv_backend
from . import chat_format, device, loader, lora, memory, sampling, warmup
from .constrain import Grammars
from .protocol import EngineConfig, Event, FinishEvent, GenerationRequest, LLMEngine
from .scheduler import Scheduler, Seq
from .textstream import TextStream

log = logging.getLogger(__name__)

# apply_chat_template arguments the engine sets itself: chat_template_kwargs may not
RESERVED_TEMPLATE_KWARGS = {"add_generation_prompt", "tokenize", "tools", "chat_template", "conversation",
                            "messages", "return_dict", "documents"}


class _Handle:
    __slots__ = ("queue", "finished")

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False


class MLXEngine(LLMEngine):
    """One model on one device, serving many concurrent requests (continuous batching)."""

    def __init__(self, model: str | Path, config: Optional[EngineConfig] = None):
        self.config = config or EngineConfig()
        self._model_arg = model
        self._load_lock = threading.Lock()
        self._model = None
        self._tokenizer = None
        self.info: Optional[loader.ModelInfo] = None
        self._sched: Optional[Scheduler] = None
        self._inflight: dict[str, _Handle] = {}
        self._chat_formats: dict[Optional[str], chat_format.ChatFormat] = {}
        self._shutdown = False
        self._final_stats: dict = {}  # the loop's last stats, kept once shut down
        self.kv_budget_bytes = 0
        self.prefix_cache_bytes = 0
        self.plan: Optional[memory.MemoryPlan] = None
        self.grammars: Optional[Grammars] = None
        self.lora: Optional[lora.Store] = None  # the adapters (max_loras > 0)
        self._loaded = False  # tokenizer, info and plan: kept while asleep
        # Sleep and wake: "awake", "sleeping" (admission closed, draining), "asleep" (model and KV
        # released), "waking" (reloading). One transition at a time (a thread lock: callers may come from
        # several event loops).
        self._state = "awake"
        self._sleep_lock = threading.Lock()
        self._sleep_facts: dict = {}  # what the last sleep and wake measured
        self.cold_start_s: Optional[float] = None

    # -- loading ------------------------------------------------------------------------
    def load(self) -> None:
        """Load the model and tokenizer (idempotent, blocking). ``start`` calls it off the event loop."""
        with self._load_lock:
            if self._loaded:
                return
            model, tokenizer, info = loader.load(self._model_arg)
            cfg = self.config
            if cfg.max_model_len and cfg.max_model_len > info.max_model_len:
                log.warning("max_model_len %d exceeds the model's %d; using the model's", cfg.max_model_len, info.max_model_len)
            max_len = min(cfg.max_model_len or info.max_model_len, info.max_model_len)
            info.max_model_len = max_len
            self.plan = self._plan(info)
            self.config = cfg = cfg.model_copy(update={"kv_bits": self.plan.kv_bits})
            self.kv_budget_bytes = self.plan.kv_pool_bytes
            self.prefix_cache_bytes = self.plan.prefix_cache_bytes
            memory.apply_wired_limit(self.plan)
            self._tokenizer, self.info = tokenizer, info
            self.grammars = Grammars(tokenizer._tokenizer, info.vocab_size, tokenizer.eos_token_ids)
            if cfg.max_loras:
                self.lora = lora.Store(model, info.path, cfg.max_loras)
            self._model = model
            self._loaded = True
            # The model's modules and arrays and the tokenizer are long-lived: move them out of the
            # cyclic GC's generations so its collections during generation stop rescanning them
            # (perf showed gc_collect_main at 1.5-2.7% of a decode step; vLLM freezes after init too).
            gc.freeze()

    def _plan(self, info: loader.ModelInfo) -> memory.MemoryPlan:
        """The memory plan (engine/memory.py) on what was loaded: the KV pool, its bits, the prefix share."""
        cfg = self.config
        dev = device.resolve()
        if dev.source == "profile":
            log.warning("memory plan on device profile %s (a stand-in for tests and planning, not this machine)",
                        dev.name)
        fp = memory.footprint(info.path, weights_bytes=info.weights_bytes, kv_bytes_per_token=info.kv_bytes_per_token,
                              vocab=info.vocab_size)
        plan = memory.make_plan(fp, dev, max_model_len=info.max_model_len, max_num_seqs=cfg.max_num_seqs,
                                kv_bits=cfg.kv_bits, kv_group_size=cfg.kv_group_size, block_size=cfg.kv_block_size,
                                prefill_chunk=cfg.prefill_chunk, kv_budget_bytes=cfg.kv_budget_bytes,
                                prefix_cache_bytes=cfg.prefix_cache_bytes)
        # What changes the service (quantized KV, fewer full-length rows) is a warning; hints are info.
        changed = plan.full_length_seqs < cfg.max_num_seqs or (cfg.kv_bits == "auto" and plan.kv_bits is not None)
        for note in plan.notes:
            log.log(logging.WARNING if changed else logging.INFO, "memory plan: %s", note)
        return plan

    @property
    def tokenizer(self):
        """The mlx-lm TokenizerWrapper (HF tokenizer plus streaming detokenizer)."""
        self.load()
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        self.load()
        return self.info.max_model_len

    @property
    def model_id(self) -> str:
        return str(self._model_arg)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(list(token_ids))

    def encode_chat(self, messages: list[dict], chat_template: Optional[str] = None,
                    add_generation_prompt: bool = True, tools: Optional[list[dict]] = None,
                    template_kwargs: Optional[dict] = None) -> list[int]:
        tok = self.tokenizer
        if chat_template is None and not tok.has_chat_template:
            raise BadRequest(f"model {self.model_id} has no chat template; pass one (chat_template) "
                             "or send a plain completion prompt", param="chat_template")
        taken = sorted(set(template_kwargs or {}) & RESERVED_TEMPLATE_KWARGS)
        if taken:
            raise BadRequest(f"chat_template_kwargs may not set {', '.join(taken)} (the server sets them)",
                             param="chat_template_kwargs")
        kw: dict[str, Any] = {**(template_kwargs or {}), "add_generation_prompt": add_generation_prompt, "tokenize": True}
        if tools:
            kw["tools"] = tools
        if chat_template is not None:
            kw["chat_template"] = chat_template
        try:
            ids = tok.apply_chat_template(messages, **kw)
        except Exception as e:  # jinja errors, bad roles, bad content shapes
            raise BadRequest(f"cannot apply the chat template: {e}", param="messages") from e
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def chat_format(self, chat_template: Optional[str] = None) -> chat_format.ChatFormat:
        # Cached per template: detection reads the whole vocabulary (mlx-lm's _infer_tool_parser
        # calls get_vocab(), a 49k-entry dict), which py-spy put at 12.6% of a Serve replica's
        # samples under load when it ran per request on the event loop.
        cache = self._chat_formats
        fmt = cache.get(chat_template)
        if fmt is None:
            fmt = chat_format.detect(self.tokenizer, chat_template)
            if len(cache) >= 32:  # per-request templates: keep the cache bounded
                cache.pop(next(iter(cache)))
            cache[chat_template] = fmt
        return fmt

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._sched is not None or self._state != "awake":
            return
        t0 = time.perf_counter()
        await asyncio.to_thread(self.load)
        await asyncio.to_thread(lambda: self.grammars.tokenizer)  # llguidance's view of the vocabulary (0.4-2.5 s)
        if self._sched is not None:
            return
        blas.set_threads()  # a Ray replica inherits OMP_NUM_THREADS=num_cpus (mlx_ray/blas.py)
        backend = await self._start_loop()
        if backend is None:
            return
        if blas.wanted_library() and not blas.preload_active():
            log.warning("MLX runs with the reference BLAS (slow); start Python with LD_PRELOAD=%s "
                        "(the mlx-ray CLI and Ray workers do this themselves)", blas.wanted_library())
        log.info("engine started: %s (%s, %s), %s KV cache, kv budget %.0f MiB, prefix cache %.0f MiB", self.model_id,
                 self.info.dtype, self.info.device, backend.kind, self.kv_budget_bytes / 2**20,
                 self.prefix_cache_bytes / 2**20)
        if self.config.warmup:
            await warmup.warm_up(self)
        self.cold_start_s = time.perf_counter() - t0

    async def _start_loop(self):
        """Build the KV backend on the loaded model and start the generation loop; the backend, or None
        when a concurrent start got there first."""
        spec, draft = self.config.speculative, None
        if spec is not None:
            from .spec import build as spec_build

            if spec.method == "draft":  # its KV shares the budget: loaded before the pool is sized
                cfg = self.config
                draft = await asyncio.to_thread(spec_build.load_draft, spec, self._tokenizer, cfg.kv_bits,
                                                cfg.kv_group_size, cfg.kv_block_size)
        backend = await asyncio.to_thread(kv_backend.build, self._model, self.config, kv_budget=self.kv_budget_bytes,
                                          kv_bytes_per_token=self.info.kv_bytes_per_token,
                                          prefix_bytes=self.prefix_cache_bytes,
                                          extra_block_bytes=draft.block_bytes if draft is not None else 0)
        if self._sched is not None:
            return None
        if spec is not None:
            backend.spec = await asyncio.to_thread(spec_build.build, backend, spec, draft)
        self._sched = Scheduler(backend, self.config, self.kv_budget_bytes)
        if self.lora is not None and backend.kind == "paged":  # rows of many adapters in one batch
            backend.lora, self._sched.lora = self.lora.slots.state, self.lora.slots
        self._sched.start()
        return backend

    # -- sleep and wake (vLLM's /sleep and /wake_up) -----------------------------------------
    async def sleep(self, grace_s: Optional[float] = None) -> dict:
        """Close admission (new requests: Unavailable, 503 + Retry-After), give running and queued requests
        ``grace_s`` (default ``sleep_grace_s``) to finish, end the rest with Unavailable, stop the loop and
        release the KV pool, the prefix cache, the adapters and the weights (MLX's memory and its buffer
        cache). The tokenizer stays; health still passes. Idempotent."""
        grace = self.config.sleep_grace_s if grace_s is None else grace_s
        await asyncio.to_thread(self._sleep_lock.acquire)
        try:
            if self._state == "asleep" or self._sched is None:
                return self.sleep_state()
            t0 = time.perf_counter()
            before = memory.mlx_memory()
            self._state = "sleeping"
            deadline = time.monotonic() + grace
            while self._inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            left, sched = len(self._inflight), self._sched
            sched.stop(Unavailable(f"model {self.model_id} went to sleep before this request finished "
                                   f"(grace {grace:g} s); retry, on another replica while it sleeps",
                                   retry_after=self.config.sleep_retry_after_s))
            if not await asyncio.to_thread(sched.thread.join, 60) and sched.thread.is_alive():
                log.warning("the generation loop did not stop within 60 s of going to sleep")
            self._sched = sched = None  # the loop held the backend, its KV pool and the model
            await asyncio.to_thread(self._release_model)
            after = memory.mlx_memory()
            self._state = "asleep"
            self._sleep_facts = {"memory_before_sleep_bytes": before, "memory_asleep_bytes": after,
                                 "released_bytes": before - after, "cancelled": left,
                                 "sleep_s": round(time.perf_counter() - t0, 3)}
            log.info("asleep: released %.0f MiB of MLX memory (%.0f MiB left), %d unfinished request(s) ended",
                     (before - after) / 2**20, after / 2**20, left)
            return self.sleep_state()
        except BaseException:
            if self._state == "sleeping" and self._sched is not None:
                self._state = "awake"  # the loop still runs: serve on
            raise
        finally:
            self._sleep_lock.release()

    def _release_model(self) -> None:
        """Drop every reference to the model and its arrays, collect them, and empty MLX's buffer cache."""
        self._model, self.lora = None, None
        gc.unfreeze()  # load() froze the model's objects: a frozen cycle would never be collected
        gc.collect()
        mx.clear_cache()

    async def wake_up(self) -> dict:
        """Reload the weights from the cache, rebuild the KV pool, start the loop and admit again (then the
        warm-up, as at start). Idempotent."""
        await asyncio.to_thread(self._sleep_lock.acquire)
        try:
            if self._state != "asleep":
                return self.sleep_state()
            t0 = time.perf_counter()
            self._state = "waking"
            try:
                await asyncio.to_thread(self._reload_model)
                await self._start_loop()
            except BaseException:
                self._state = "asleep"
                raise
            self._state = "awake"
            if self.config.warmup:
                await warmup.warm_up(self)
            self._sleep_facts["wake_s"] = round(time.perf_counter() - t0, 3)
            self._sleep_facts["memory_awake_bytes"] = memory.mlx_memory()
            log.info("awake again in %.2f s (cold start %s s)", self._sleep_facts["wake_s"],
                     f"{self.cold_start_s:.2f}" if self.cold_start_s else "?")
            return self.sleep_state()
        finally:
            self._sleep_lock.release()

    def _reload_model(self) -> None:
        model, _, info = loader.load(self._model_arg)
        if info.weights_bytes != self.info.weights_bytes or info.vocab_size != self.info.vocab_size:
            raise EngineFault(f"model {self.model_id} changed on the cache while asleep ({info.weights_bytes} bytes of "
                              f"weights, were {self.info.weights_bytes}); restart the replica to serve the new one")
        if self.config.max_loras:
            self.lora = lora.Store(model, info.path, self.config.max_loras)
        self._model = model
        gc.freeze()

    def sleep_state(self) -> dict:
        """{"sleeping", "state", "memory_bytes" (MLX's active + cache, this process), "cold_start_s", and what
        the last sleep and wake measured}."""
        return {"sleeping": self._state != "awake", "state": self._state, "memory_bytes": memory.mlx_memory(),
                "cold_start_s": self.cold_start_s, **self._sleep_facts}

    def _check_awake(self) -> None:
        if self._state != "awake":
            raise Unavailable(f"model {self.model_id} is asleep (POST /wake_up wakes it); retry later or on "
                              "another replica", retry_after=self.config.sleep_retry_after_s)

    async def reset_counters(self) -> None:
        """Zero the loop's counters (after the warm-up); the prefix cache keeps its entries."""
        done = self._sched.reset_counters()
        if not await asyncio.to_thread(done.wait, 60):
            raise EngineFault("the generation loop did not answer after the warm-up; restart the replica")

    async def shutdown(self) -> None:
        self._shutdown = True
        sched = self._sched
        if sched is None or not sched.thread.is_alive():
            return
        sched.stop()
        await asyncio.to_thread(sched.thread.join, 60)
        if not sched.thread.is_alive():  # give the memory back, as sleep does (an in-process caller goes on)
            self._final_stats = dict(sched.published)
            self._sched = sched = None  # the loop held the batch: its KV pool, the prefix cache's blocks, a draft
            await asyncio.to_thread(self._release_model)

    def check_health(self) -> None:
        sched = self._sched
        if self._shutdown:
            raise EngineFault("the engine is shutting down")
        if self._state != "awake":  # asleep on purpose (or on the way): healthy, so Serve keeps the replica
            return
        if sched is None:
            raise EngineFault("the engine is not started")
        if not sched.thread.is_alive():
            cause = f" ({type(sched.error).__name__}: {sched.error})" if sched.error else ""
            raise EngineFault(f"the generation loop is dead{cause}; restart the replica")
        stalled = time.monotonic() - sched.heartbeat
        if stalled > self.config.health_timeout_s:
            raise EngineFault(f"the generation loop made no progress for {stalled:.0f} s (wedged); restart the replica")

    def stats(self) -> dict:
        sched = self._sched
        out = dict(sched.published) if sched is not None else dict(self._final_stats)
        # Live sizes (len() of the loop's containers is atomic); the rest is as of the last step.
        out["running"] = len(sched.active) if sched is not None else 0
        out["waiting"] = len(sched.waiting) if sched is not None else 0
        out["inflight"] = len(self._inflight)
        out["kv_budget_bytes"] = self.kv_budget_bytes
        out["sleeping"] = self._state != "awake"
        return out

    # -- requests -----------------------------------------------------------------------
    def adapters(self) -> list[str]:
        if self.lora is None and self.config.max_loras and self.info is not None:  # asleep: from the cache
            from .. import adapters as layout

            return [n for n, _ in layout.list_adapters(self.info.path)]
        return self.lora.names() if self.lora is not None else []

    def _adapter(self, name: str) -> lora.Adapter:
        """Find, check and (unless loaded) read adapter ``name``: blocking, off the event loop."""
        if self.lora is None:
            raise BadRequest(f"this engine serves no LoRA adapters (max_loras=0); '{name}' cannot be used",
                             param="model")
        if self._sched is not None and self._sched.lora is None:
            raise BadRequest(f"LoRA adapters need the paged KV cache, which model {self.model_id} does not use "
                             f"here; '{name}' cannot be served", param="model")
        return self.lora.prepare(name)

    async def cancel(self, request_id: str) -> None:
        sched = self._sched
        if sched is not None and request_id in self._inflight:
            sched.cancel(request_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        self._check_awake()
        s, grammar, adapter = request.sampling, None, None
        if s.grammar is not None and not s.ignore_eos and self.grammars is not None:
            # llguidance's compile and matcher take ms to seconds: off the event loop (also the HTTP loop)
            grammar = await asyncio.to_thread(lambda: self.grammars.processor(self.grammars.compile(s.grammar)))
        if request.adapter is not None:  # reading an adapter's files: off the event loop and the generation loop
            adapter = await asyncio.to_thread(self._adapter, request.adapter)
        handle = self._admit(request, grammar, adapter)
        try:
            while True:
                ev = await handle.queue.get()
                yield ev
                if isinstance(ev, FinishEvent):
                    return
        finally:
            sched = self._sched
            if not handle.finished and sched is not None:  # the consumer went away: free the row
                sched.cancel(request.request_id)

    def _admit(self, request: GenerationRequest, grammar=None, adapter: Optional[lora.Adapter] = None) -> _Handle:
        """Validate and submit, or raise before the first event (``grammar``: the processor, built already;
        ``adapter``: the request's LoRA adapter, checked already)."""
        self._check_awake()
        self.check_health()
        cfg, info, s = self.config, self.info, request.sampling
        rid = request.request_id
        if rid in self._inflight:
            raise BadRequest(f"request id {rid!r} is already running; use unique ids", param="request_id")
        prompt = request.prompt_token_ids
        if not prompt:
            raise BadRequest("the prompt is empty; send at least one token", param="prompt")
        if any(not isinstance(t, int) or t < 0 or t >= info.vocab_size for t in prompt):
            raise BadRequest(f"prompt token ids must be in [0, {info.vocab_size})", param="prompt")
        sampling.validate(s, info.vocab_size)
        if s.grammar is not None:
            if s.ignore_eos:
                raise BadRequest("ignore_eos cannot be combined with constrained decoding (a complete answer "
                                 "ends with EOS)", param="ignore_eos")
            if grammar is None:
                grammar = self.grammars.processor(self.grammars.compile(s.grammar))
        need = len(prompt) + s.max_tokens
        if need > info.max_model_len:
            raise ContextOverflow(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({s.max_tokens}) exceeds the context of "
                f"{info.max_model_len} tokens; shorten the prompt or lower max_tokens", param="max_tokens")
        if not self._sched.backend.fits_alone(need):
            raise ContextOverflow(
                f"prompt plus max_tokens ({need} tokens) needs more KV cache than the engine's budget of "
                f"{self.kv_budget_bytes / 2**20:.0f} MiB; lower max_tokens or raise kv_budget_bytes", param="max_tokens")
        # Full: every row and queue slot taken, or (when the KV budget holds fewer rows than
        # max_num_seqs) the loop reports its queue full.
        waiting = len(self._sched.waiting)
        if len(self._inflight) >= cfg.max_num_seqs + cfg.max_queue or (waiting and waiting >= cfg.max_queue):
            raise Overloaded(f"the engine is full ({len(self._inflight) - waiting} running, {waiting} waiting, "
                             f"queue limit {cfg.max_queue}); retry later", retry_after=1.0)

        loop = asyncio.get_running_loop()
        handle = _Handle()
        tok = self._tokenizer
        stops = set(s.stop_token_ids) | (set() if s.ignore_eos else set(tok.eos_token_ids))
        seq = Seq(
            req=request,
            loop=loop,
            deliver=lambda ev: self._deliver(rid, handle, ev),
            text=TextStream(tok.detokenizer, s.stop),
            sampler=sampling.make_sampler(s, cfg.seed),
            processors=sampling.make_logits_processors(s, len(prompt)) + ([grammar] if grammar else []),
            stop_ids=stops,
            reserve=need,
            release=lambda: self._release(rid, handle),
            adapter=adapter,
        )
        self._inflight[rid] = handle
        self._sched.submit(seq)
        return handle

    def _release(self, rid: str, handle: _Handle) -> None:
        """Runs on the loop thread as the request finishes (dict operations are atomic)."""
        if self._inflight.get(rid) is handle:
            self._inflight.pop(rid, None)

    def _deliver(self, rid: str, handle: _Handle, ev: Event) -> None:
        """Runs on the consumer's event loop."""
        if isinstance(ev, FinishEvent):
            handle.finished = True
            self._release(rid, handle)
        handle.queue.put_nowait(ev)
