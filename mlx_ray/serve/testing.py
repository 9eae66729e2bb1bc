"""Test hook: an engine wrapper that can be told to fail like a dead generation loop.

An engine fault cannot be provoked from outside on a healthy MLXEngine, so the
end-to-end tests serve a second model with ``engine_class:
mlx_ray.serve.testing:FaultInjectingEngine``. It is the real MLXEngine, except
that a request carrying the stop string ``FAULT_TRIGGER`` marks the engine dead:
that request and every later one finish with ``EngineFault`` and ``check_health``
raises, exactly what a crashed loop does, so Serve's health check fails and it
replaces the replica (which comes back healthy). A request carrying
``WEDGE_TRIGGER`` instead behaves like a wedged step: it is admitted and then
nothing comes back until it is cancelled (``stats()["wedged"]`` counts those).
Never configure it in production.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from ..engine.protocol import EngineConfig, FinishEvent, GenerationRequest
from ..errors import EngineFault

FAULT_TRIGGER = "<<mlx-ray-inject-engine-fault>>"
WEDGE_TRIGGER = "<<mlx-ray-inject-wedged-step>>"


class FaultInjectingEngine:
    def __init__(self, model: str, config: Optional[EngineConfig] = None):
        from ..engine.engine import MLXEngine

        self.inner = MLXEngine(model, config)
        self.fault: Optional[str] = None
        self.wedged = 0

    def __getattr__(self, name):  # encode, encode_chat, tokenizer, max_model_len, ...
        return getattr(self.inner, name)

    async def start(self) -> None:
        await self.inner.start()

    async def generate(self, request: GenerationRequest):
        if FAULT_TRIGGER in request.sampling.stop:
            self.fault = "injected fault: the generation loop died"
        if self.fault:
            yield FinishEvent("error", len(request.prompt_token_ids), 0, error=EngineFault(self.fault))
            return
        if WEDGE_TRIGGER in request.sampling.stop:
            self.wedged += 1
            try:
                await asyncio.Event().wait()  # until the caller cancels this generator
            finally:
                self.wedged -= 1
        async for ev in self.inner.generate(request):
            yield ev

    async def cancel(self, request_id: str) -> None:
        await self.inner.cancel(request_id)

    def check_health(self) -> None:
        if self.fault:
            raise EngineFault(self.fault)
        self.inner.check_health()

    def stats(self) -> dict:
        return {**self.inner.stats(), "wedged": self.wedged}

    async def shutdown(self) -> None:
        await self.inner.shutdown()
