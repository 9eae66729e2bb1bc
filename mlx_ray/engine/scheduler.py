"""The generation loop: one thread that owns the model and the running batch.

Every iteration it takes commands (submit, cancel, stop), expires deadlines,
admits waiting requests while the batch has a free row and the backend says
the request's KV fits, and runs one step of the backend: one decode step for
every running row plus a prefill chunk (``prefill_chunk`` tokens) of the
prompts being processed, so a long prompt never stalls the others for more
than a chunk. Requests join and leave the batch at any step; prompt prefixes
come from the backend's prefix cache when they can.

Two backends, one interface (``try_insert``, ``remove``, ``step``, ``reset``,
``stats``): ``paged.PagedBatch`` (the engine's own step over a paged KV cache:
admission by the blocks a request needs) and ``batching.RectBatch`` (mlx-lm's
``BatchGenerator`` and its rectangular cache, for the models and devices the
paged cache does not serve).

The loop is the only code that touches MLX state after loading; the async
side (``engine.py``) talks to it through a command queue; events go back to
each request's event loop, one ``call_soon_threadsafe`` per loop and step.
A failed step (e.g. an allocation failure) fails the requests of that batch and
the loop continues with a fresh batch; a failure of one request's text
handling fails that request only.

The loop also measures each request's prefill rate (uncached prompt tokens over
the time from joining the batch to its first token, so under load it includes
the decode steps shared with others: what a new request would see) and decode
rate (tokens after the first over the time since it), and publishes their
running means for a router (``engine.stats()``, ``GET /v1/load``).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import queue
import threading
import time
from collections import deque
from itertools import islice
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Optional

import mlx.core as mx

from ..errors import DeadlineExceeded, EngineFault, MlxRayError
from .block_prefix import Prompt
from .lora import Adapter
from .protocol import EngineConfig, Event, FinishEvent, GenerationRequest, TokenEvent, TokenLogprob, finite_logprob
from .sampling import top_logprobs
from .textstream import TextStream

log = logging.getLogger(__name__)

IDLE_TICK_S = 0.25  # the idle loop still beats this often (health)
BACKFILL_LOOKAHEAD = 64  # waiting requests looked at behind a head that does not fit
# The measured rates (``prefill_tokens_per_s``, ``decode_tokens_per_s`` in ``published``) are
# exponentially weighted means of per-request samples with this weight on the newest; the first
# sample is taken as it is. A router reads them to predict a request's time to first token.
RATE_ALPHA = 0.2


@dataclass
class Seq:
    """One request as the loop sees it."""

    req: GenerationRequest
    loop: Any  # the consumer's asyncio loop
    deliver: Callable[[Event], None]  # runs on that loop
    text: TextStream
    sampler: Callable
    processors: list
    stop_ids: set[int]
    reserve: int  # tokens this row may grow to (prompt + max_tokens)
    # Runs on the loop thread when the request finishes: frees its admission slot even if the
    # consumer's event loop is gone (the FinishEvent then has nowhere to go).
    release: Callable[[], None] = lambda: None
    uid: Optional[int] = None
    cached: int = 0
    generated: int = 0
    done: bool = False
    skip_first: bool = True  # the generator's first response is the last prompt token
    buf_ids: list[int] = field(default_factory=list)
    buf_text: str = ""
    buf_lp: list[TokenLogprob] = field(default_factory=list)
    last_emit: float = 0.0
    adapter: Optional[Adapter] = None  # its LoRA adapter, checked (``lora.Store.prepare``); None: the base
    lora: int = 0  # the adapter's slot while it runs
    inserted_at: float = 0.0  # when it joined the running batch (monotonic)
    first_at: float = 0.0  # when its first generated token came (0.0: not yet)

    @cached_property
    def prompt(self) -> Prompt:
        """The prompt's tokens, which keep their prefix-cache keys: hashed once, however many passes it waits."""
        return Prompt(self.req.prompt_token_ids)


class Scheduler:
    def __init__(self, backend, cfg: EngineConfig, kv_budget: int):
        self.backend = backend  # paged.PagedBatch or batching.RectBatch, built by the engine
        self.lora = None  # lora.Slots when the engine serves adapters (the paged backend only)
        self.cfg = cfg
        self.kv_budget = kv_budget
        self.cmds: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Seq] = deque()
        self.active: dict[int, Seq] = {}
        self.heartbeat = time.monotonic()
        self.error: Optional[BaseException] = None
        self.inject_fault: Optional[BaseException] = None  # test hook: raised inside the next step
        self.counters = dict(prompt_tokens_total=0, generation_tokens_total=0, steps=0, requests_finished=0,
                             requests_failed=0, batch_failures=0, requests_backfilled=0)
        # Measured on the loop, per request (see _on_token, _finish): 0.0 until the first sample.
        self.rates = dict(prefill_tokens_per_s=0.0, decode_tokens_per_s=0.0)
        self.published: dict[str, Any] = {}
        self._outbox: dict[Any, list] = {}  # loop -> [(deliver, event)] of this iteration
        self.thread = threading.Thread(target=self._run, name="mlx-ray-engine-loop", daemon=True)
        self._closed = False  # set (under _close_lock) once the loop has ended: submits fail at once
        self._stop_reason: Optional[MlxRayError] = None  # what a stop answers the requests left
        self._close_lock = threading.Lock()
        self._publish()

    # -- called from other threads -------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, seq: Seq) -> None:
        with self._close_lock:
            if not self._closed:
                self.cmds.put(("submit", seq))
                return
        # the loop is gone (it died or shut down between the caller's health check and now)
        self._finish(seq, "error", EngineFault("the generation loop is not running; retry on another replica"))
        self._send()

    def cancel(self, request_id: str) -> None:
        self.cmds.put(("cancel", request_id))

    def stop(self, reason: Optional[MlxRayError] = None) -> None:
        """End the loop; what is still running or queued ends with ``reason`` (default: an EngineFault)."""
        self.cmds.put(("stop", reason))

    def reset_counters(self) -> threading.Event:
        """Zero every counter (the backend's too) and the measured rates, on the loop; the event is set
        once done. For the warm-up: its requests pay one-time costs (first calls, compiles, an empty
        prefix cache), so their rates would understate the server until a few real requests wore them
        off; the rates read 0.0 (not measured yet) until the first real request instead."""
        done = threading.Event()
        self.cmds.put(("reset_counters", done))
        return done

    def _reset_counters(self, done: threading.Event) -> None:
        self.counters = dict.fromkeys(self.counters, 0)
        self.rates = dict.fromkeys(self.rates, 0.0)
        self.backend.reset_counters()
        self._publish()
        done.set()

    # -- the loop --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._drain(block=not self.active and not self.waiting):
                self._expire(time.monotonic())
                self._admit()
                if self.active:
                    self._step()
                self._publish()  # before the events: a caller that sees its finish sees its stats
                self._send()
                self.heartbeat = time.monotonic()
            reason = self._stop_reason or EngineFault("the engine shut down; retry on another replica")
        except BaseException as e:  # the loop itself broke: health must say so
            log.exception("generation loop died")
            self.error = e
            reason = EngineFault(f"generation loop died ({type(e).__name__}: {e})")
        with self._close_lock:  # from here on submit() answers by itself
            self._closed = True
        queued = []  # commands that arrived but were never applied: answer those too
        while True:
            try:
                kind, arg = self.cmds.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                queued.append(arg)
        for seq in list(self.active.values()) + list(self.waiting) + queued:
            self._finish(seq, "error", reason)
        self.active.clear()
        self.waiting.clear()
        self._send()
        try:
            self.backend.close()
        except Exception:  # a broken batch may not close cleanly; nothing is waiting on it now
            log.debug("closing the batch failed", exc_info=True)
        self._publish()

    def _drain(self, block: bool) -> bool:
        """Apply pending commands; False once asked to stop."""
        try:
            cmd = self.cmds.get(timeout=IDLE_TICK_S) if block else self.cmds.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, arg = cmd
            if kind == "stop":
                self._stop_reason = arg
                return False
            if kind == "submit":
                self.waiting.append(arg)
            elif kind == "cancel":
                self._cancel(arg)
            elif kind == "reset_counters":
                self._reset_counters(arg)
            try:
                cmd = self.cmds.get_nowait()
            except queue.Empty:
                return True

    def _cancel(self, request_id: str) -> None:
        for seq in self.waiting:
            if seq.req.request_id == request_id:
                self.waiting.remove(seq)
                self._finish(seq, "cancelled")
                return
        for uid, seq in list(self.active.items()):
            if seq.req.request_id == request_id:
                self._remove([uid])
                self._finish(seq, "cancelled")
                return

    def _expire(self, now: float) -> None:
        late = [s for s in self.waiting if s.req.deadline is not None and s.req.deadline <= now]
        for seq in late:
            self.waiting.remove(seq)
            self._finish(seq, "error", DeadlineExceeded("the request passed its deadline while waiting; retry with a longer timeout"))
        late = [s for s in self.active.values() if s.req.deadline is not None and s.req.deadline <= now]
        if late:
            self._remove([s.uid for s in late])
            for seq in late:
                self._finish(seq, "error", DeadlineExceeded(
                    f"the request passed its deadline after {seq.generated} tokens; retry with a longer timeout or fewer max_tokens"))

    def _admit(self) -> None:
        """FIFO admission while a row is free and the backend has room for the request's KV; then backfilling.

        When the head of the queue waits for KV, the paged backend may start requests behind it
        that cannot delay it (``PagedBatch.try_backfill``), up to ``BACKFILL_LOOKAHEAD`` deep, with
        one row kept for the head. ``admission="fifo"`` turns that off."""
        while self.waiting and len(self.active) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            got = self._insert(seq, self.backend.try_insert)
            if got is False:
                continue
            if got is None:  # its KV (or a LoRA slot for its adapter) is not free yet
                break
        else:
            return
        reservation = getattr(self.backend, "reservation", None)
        if self.cfg.admission != "backfill" or reservation is None or len(self.waiting) < 2:
            return
        head = self.waiting[0]
        res = reservation(head.prompt, head.req.sampling.max_tokens,
                          *((head.adapter.prefix_root,) if head.adapter is not None else ()))
        # A head waiting for a LoRA slot must not be passed by rows that keep slots busy; a head whose
        # adapter is loaded keeps it (backfilled rows do not evict it).
        head_slot = None if head.adapter is None else self.lora.slot_for(head.adapter, self._busy_slots())
        pinned = set() if head.adapter is None or head_slot is None else {head_slot}
        for seq in list(islice(self.waiting, 1, 1 + BACKFILL_LOOKAHEAD)):
            if len(self.active) >= self.cfg.max_num_seqs - 1:
                return
            if seq.adapter is not None and head.adapter is not None and head_slot is None:
                continue
            self._insert(seq, lambda *a: self.backend.try_backfill(res, *a), backfill=True, pinned=pinned)

    def _busy_slots(self) -> set[int]:
        """The LoRA slots that running rows use (never evicted under them)."""
        return {s.lora for s in self.active.values() if s.lora}

    def _insert(self, seq: Seq, insert, backfill: bool = False, pinned: frozenset = frozenset()) -> Any:
        """Start a waiting request: True, None (no room yet), False (it failed and was answered).

        A request with an adapter first needs a LoRA slot (``lora.Slots.slot_for``: its own, a free one,
        or the least recently used one no running row uses): without one it waits as for KV, never fails.
        The adapter is loaded into the slot only once the row is in."""
        prompt, lora = seq.prompt, ()
        try:
            if seq.adapter is not None:
                slot = self.lora.slot_for(seq.adapter, self._busy_slots() | pinned)
                if slot is None:
                    return None
                lora = (slot, seq.adapter.prefix_root)
            got = insert(prompt, seq.req.sampling.max_tokens, seq.sampler, seq.processors, *lora)
            if got is not None and lora:
                try:
                    self.lora.commit(seq.adapter, lora[0])
                except BaseException:
                    self.backend.remove([got[0]])
                    raise
        except Exception as e:
            self.waiting.remove(seq)
            if not isinstance(e, MlxRayError):
                log.exception("could not insert request %s", seq.req.request_id)
                e = EngineFault(f"could not start the request ({type(e).__name__}: {e})")
            self._finish(seq, "error", e)
            return False
        if got is None:
            return None
        self.waiting.remove(seq)
        if lora:
            seq.lora, seq.adapter = lora[0], dataclasses.replace(seq.adapter, tensors=None)  # the host copy can go
        seq.uid, seq.cached = got
        seq.inserted_at = time.monotonic()
        seq.skip_first = self.backend.first_is_prompt
        self.active[seq.uid] = seq
        self.counters["prompt_tokens_total"] += len(prompt)
        self.counters["requests_backfilled"] += backfill
        return True

    def _remove(self, uids: list[int], keep_cache: bool = False) -> None:
        self.backend.remove(uids, keep_cache=keep_cache)

    def _step(self) -> None:
        try:
            if self.inject_fault is not None:
                fault, self.inject_fault = self.inject_fault, None
                raise fault
            responses = self.backend.step()
        except Exception as e:
            self._fail_batch(e)
            return
        self.counters["steps"] += 1
        fresh = []
        for r in responses:
            seq = self.active.get(r.uid)
            if seq is not None and seq.skip_first:  # the prompt's last token, computed in this step
                seq.skip_first = False
            elif seq is not None:
                fresh.append((seq, r))
        # Logprobs of every request that asked, evaluated together. A speculative step gives a row several
        # responses in order; those after one that finished it (a stop, the limit) are dropped.
        lazy = {}
        for i, (seq, r) in enumerate(fresh):
            if seq.req.sampling.logprobs:
                n = seq.req.sampling.top_logprobs
                lazy[i] = (r.logprobs[r.token], *(top_logprobs(r.logprobs, n) if n else ()))
        if lazy:
            mx.eval(list(lazy.values()))
        stopped_here = []
        now = time.monotonic()
        for i, (seq, r) in enumerate(fresh):
            if seq.done:
                continue
            self.counters["generation_tokens_total"] += 1
            try:
                reason = self._on_token(seq, r, lazy.get(i), now)
            except Exception as e:  # this request's text handling broke: fail it alone
                log.exception("request %s failed", seq.req.request_id)
                if r.finish_reason is None:
                    self._remove([r.uid])
                self._finish(seq, "error", EngineFault(f"request failed while streaming ({type(e).__name__}: {e})"))
                continue
            if reason is None:
                continue
            if r.finish_reason is None:  # a stop token or string: the backend does not know yet
                stopped_here.append(r.uid)
            self._finish(seq, reason)
        if stopped_here:
            self._remove(stopped_here, keep_cache=self.backend.prefix_enabled)

    def _on_token(self, seq: Seq, r, lp, now: float) -> Optional[str]:
        seq.generated += 1
        if seq.generated == 1:  # the prompt's uncached part was computed between insertion and now
            seq.first_at = now
            self._rate("prefill_tokens_per_s", len(seq.req.prompt_token_ids) - seq.cached, now - seq.inserted_at)
        if r.token in seq.stop_ids:  # EOS or a stop token id: not part of the text
            text, reason = seq.text.finish(), "stop"
        else:
            text = seq.text.add(r.token)
            reason = "stop" if seq.text.stopped else None
            if reason is None and r.finish_reason == "length":
                text, reason = text + seq.text.finish(), "length"
        seq.buf_ids.append(r.token)
        seq.buf_text += text
        if lp is not None:
            top = [(t, finite_logprob(v)) for t, v in zip(lp[1].tolist(), lp[2].tolist())] if len(lp) > 1 else []
            seq.buf_lp.append(TokenLogprob(r.token, finite_logprob(lp[0].item()), top))
        if reason is None and (now - seq.last_emit) * 1000.0 >= self.cfg.stream_interval_ms:
            self._flush(seq, now)
        return reason

    def _flush(self, seq: Seq, now: float) -> None:
        if seq.buf_ids:
            ev = TokenEvent(seq.buf_ids, seq.buf_text, seq.buf_lp if seq.req.sampling.logprobs else None)
            seq.buf_ids, seq.buf_text, seq.buf_lp = [], "", []
            seq.last_emit = now
            self._deliver(seq, ev)

    def _finish(self, seq: Seq, reason: str, error: Optional[MlxRayError] = None) -> None:
        if seq.done:
            return
        seq.done = True
        seq.release()
        if seq.uid is not None:
            self.active.pop(seq.uid, None)
        if error is None:
            now = time.monotonic()
            self._flush(seq, now)
            if seq.generated > 1 and reason != "cancelled":  # a cancel comes between steps: not a decode time
                self._rate("decode_tokens_per_s", seq.generated - 1, now - seq.first_at)
        self.counters["requests_finished"] += 1
        self.counters["requests_failed"] += error is not None
        self._deliver(seq, FinishEvent(reason, len(seq.req.prompt_token_ids), seq.generated, seq.cached, error))

    def _rate(self, name: str, tokens: int, seconds: float) -> None:
        """Fold one request's measured rate into the running mean (EWMA, first sample as it is)."""
        if tokens <= 0 or seconds <= 0:
            return
        sample, old = tokens / seconds, self.rates[name]
        self.rates[name] = sample if old == 0.0 else old + RATE_ALPHA * (sample - old)

    def _deliver(self, seq: Seq, ev: Event) -> None:
        self._outbox.setdefault(seq.loop, []).append((seq.deliver, ev))

    def _send(self) -> None:
        """Hand this iteration's events to their loops: one wake-up per loop, not per event."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_run_all, items)
            except RuntimeError:  # the consumer's event loop is closed; nothing to tell
                log.debug("dropped %d events for a closed event loop", len(items))

    def _fail_batch(self, e: Exception) -> None:
        """A step failed (e.g. allocation failure): fail the running rows, start a fresh batch."""
        log.error("generation step failed, dropping %d running requests: %s", len(self.active), e)
        self.counters["batch_failures"] += 1
        err = EngineFault(f"generation step failed ({type(e).__name__}: {e}); the batch was dropped, retry the request")
        for seq in list(self.active.values()):
            self._finish(seq, "error", err)
        self.active.clear()
        self.backend.reset()
        gc.collect()
        mx.clear_cache()

    def _publish(self) -> None:
        self.published = dict(self.counters, **self.rates, running=len(self.active), waiting=len(self.waiting),
                              max_num_seqs=self.cfg.max_num_seqs, kv_budget_bytes=self.kv_budget,
                              **self.backend.stats(), **(self.lora.stats() if self.lora is not None else {}))


def _run_all(items: list) -> None:
    for deliver, ev in items:
        deliver(ev)
