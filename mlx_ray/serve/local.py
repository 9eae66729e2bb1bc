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
from typing import Any

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
    """What ``.remote()`` returns: awaitable for a coroutine, async-iterable and cancellable for a stream."""

    def __init__(self, result: Any):
        self.result = result

    def __await__(self):
        return self.result.__await__()

    def __aiter__(self):
        return self.result.__aiter__()

    def cancel(self) -> None:
        """Close the stream now (a Serve stream's cancel stops the replica's generator the same way)."""
        if inspect.isasyncgen(self.result):
            asyncio.ensure_future(self.result.aclose())
        elif inspect.iscoroutine(self.result):
            self.result.close()


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
