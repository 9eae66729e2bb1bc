"""One model, one replica: the engine's own replica answers HTTP (one Ray hop fewer).

With several models, the ingress is its own deployment and reaches each model's
``LLMServer`` through Serve handles: every streamed batch crosses Ray twice
(replica -> ingress -> proxy). With one model (the usual Mac: one 32B model),
``LLMServerIngress`` is both: the routes of ``OpenAIIngress`` over an
``LLMServer`` in the same process, through ``LocalHandle``, which has a Serve
handle's shape. Serve's proxy then talks to the replica directly, and the
ingress's process, and its share of 2-12 cores, is gone. (The trade: HTTP and
SSE formatting now share the engine's process and GIL. Measured on 2 loaded
cores, two A/B runs went opposite ways; see the README.)
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Optional

from .ingress import OpenAIIngress
from .config import STREAM_MESSAGES_PER_S
from .server import LLMServer


class LocalHandle:
    """A Serve ``DeploymentHandle``'s shape over an object in this process:
    ``.options(stream=True).method.remote(...)`` calls ``method`` directly."""

    def __init__(self, target: Any):
        self.target = target

    def options(self, **_):
        return self

    def __getattr__(self, name: str):
        fn = getattr(self.target, name)
        return type("Remote", (), {"remote": staticmethod(lambda *a, **kw: _LocalCall(fn(*a, **kw)))})


class _LocalCall:
    """What ``.remote()`` returns: awaitable for a coroutine, async-iterable and cancellable for a stream.

    ``cancel`` may come while another task is inside the stream's ``__anext__`` (the ingress reads
    the next batch in a task of its own). An async generator cannot be closed then ("aclose():
    asynchronous generator is already running" on Python 3.10 and 3.11), so that step is cancelled,
    as a Serve stream's cancel does, and the generator is closed once the step has ended.
    """

    def __init__(self, result: Any):
        self.result = result
        self._stepper: Optional[asyncio.Task] = None  # the task inside the generator's __anext__
        self._step_done: Optional[asyncio.Future] = None
        self._cancelled = False

    def __await__(self):
        return self.result.__await__()

    def __aiter__(self):
        return self if inspect.isasyncgen(self.result) else self.result.__aiter__()

    async def __anext__(self):
        if self._cancelled:
            raise StopAsyncIteration
        self._stepper = asyncio.current_task()
        self._step_done = done = asyncio.get_running_loop().create_future()
        try:
            return await self.result.__anext__()
        finally:
            self._stepper = self._step_done = None
            done.set_result(None)

    def cancel(self) -> None:
        """Close the stream now (a Serve stream's cancel stops the replica's generator the same way)."""
        if inspect.isasyncgen(self.result):
            if self._cancelled:
                return
            self._cancelled = True
            stepper, step_done = self._stepper, self._step_done
            if stepper is not None and stepper is not asyncio.current_task() and not stepper.done():
                stepper.cancel()
            asyncio.ensure_future(self._close(step_done))
        elif inspect.iscoroutine(self.result):
            self.result.close()

    async def _close(self, step_done: Optional[asyncio.Future]) -> None:
        if step_done is not None:
            await step_done
        await self.result.aclose()


class LLMServerIngress(OpenAIIngress):
    """The OpenAI routes and one model's LLMServer in one replica (plain class: the builder decorates it)."""

    def __init__(self, model_config: dict, stream_batching_interval_ms: float, config: dict,
                 stream_messages_per_s: float = STREAM_MESSAGES_PER_S):
        self.server = LLMServer(model_config, stream_batching_interval_ms, stream_messages_per_s=stream_messages_per_s)
        super().__init__({self.server.cfg.name: LocalHandle(self.server)}, config)

    # what Serve and the tests call on the model's replica, as on an LLMServer deployment
    async def check_health(self) -> None:
        await self.server.check_health()

    async def info(self) -> dict:
        return await self.server.info()

    async def stats(self) -> dict:
        return await self.server.stats()

    async def sleep(self, grace_s: Optional[float] = None, node_id: Optional[str] = None) -> dict:
        return await self.server.sleep(grace_s, node_id)

    async def wake_up(self, node_id: Optional[str] = None) -> dict:
        return await self.server.wake_up(node_id)

    async def replica_state(self) -> dict:
        return await self.server.replica_state()
