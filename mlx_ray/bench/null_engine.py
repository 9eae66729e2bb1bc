"""A null engine for measuring the Serve path alone: the model's tokenizer, no model compute.

``bench/serve_overhead.py`` serves it (``engine_class: mlx_ray.bench.null_engine:NullEngine``)
so that the CPU time the Serve path spends per streamed token (replica, proxy,
client, Ray's daemons) can be read without the engine's compute beside it; on
2 vCPUs that compute's speed drifts more than the path costs. Every
``NULL_STEP_S`` seconds (default 0.11, a decode step of the fixture at 16
rows), plus ``NULL_STEP_PER_ROW_S`` (default 0) per running request, as a real
step grows with its batch, each running request gets one token: one thread ticks like the
generation loop and delivers through one ``call_soon_threadsafe`` per event
loop and step, as ``scheduler.py`` does. Never configure it for real traffic.
"""

from __future__ import annotations

import asyncio
import os
import threading

from ..engine.engine import MLXEngine
from ..engine.protocol import FinishEvent, TokenEvent


class NullEngine(MLXEngine):
    def __init__(self, model, config=None):
        super().__init__(model, config)
        self.step_s = float(os.environ.get("NULL_STEP_S", "0.11"))
        self.step_per_row_s = float(os.environ.get("NULL_STEP_PER_ROW_S", "0"))
        self._rows: dict[str, tuple] = {}  # request id -> (loop, queue, [generated, max_tokens])
        self._lock = threading.Lock()
        self._ticker = None
        self._stop = threading.Event()

    async def start(self) -> None:
        await asyncio.to_thread(self.load)  # the tokenizer (and, unused, the weights)
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="null-engine-tick", daemon=True)
            self._ticker.start()

    def check_health(self) -> None:
        pass

    def stats(self) -> dict:
        return {"inflight": len(self._rows), "running": len(self._rows), "waiting": 0}

    async def shutdown(self) -> None:
        self._stop.set()

    async def cancel(self, request_id: str) -> None:
        with self._lock:
            self._rows.pop(request_id, None)

    async def generate(self, request):
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._rows[request.request_id] = (asyncio.get_running_loop(), queue, [0, request.sampling.max_tokens])
        try:
            while True:
                ev = await queue.get()
                yield ev
                if isinstance(ev, FinishEvent):
                    return
        finally:
            with self._lock:
                self._rows.pop(request.request_id, None)

    def _tick(self) -> None:
        while not self._stop.wait(self.step_s + self.step_per_row_s * len(self._rows)):
            by_loop: dict = {}
            with self._lock:
                for rid, (loop, queue, st) in list(self._rows.items()):
                    st[0] += 1
                    done = st[0] >= st[1]
                    ev = FinishEvent("length", 1, st[1]) if done else TokenEvent([42], " tok")
                    by_loop.setdefault(loop, []).append((queue, ev))
                    if done:
                        del self._rows[rid]
            for loop, items in by_loop.items():
                loop.call_soon_threadsafe(_deliver_all, items)


def _deliver_all(items: list) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)
