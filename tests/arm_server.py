"""A real mlx-ray OpenAI server in a process of its own, without Ray: the router tests' arms.

The app is ``mlx-ray serve``'s one-model ingress (``LLMServerIngress`` over the real engine and the real
model) under uvicorn, so the router talks to it over real HTTP, and the tests can kill, stop (SIGSTOP) and
resume it like a Mac going to sleep, without a Ray node around it.

    python tests/arm_server.py MODEL_DIR PORT NAME MAX_NUM_SEQS MAX_QUEUE [ENGINE_CLASS]

ENGINE_CLASS: e.g. ``mlx_ray.serve.testing:FaultInjectingEngine``, the real engine with the tests' fault hooks.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager


def main(model: str, port: int, name: str, max_num_seqs: int, max_queue: int, engine_class: str = "") -> None:
    import uvicorn

    from mlx_ray.serve.config import ServeConfig
    from mlx_ray.serve.ingress import create_app
    from mlx_ray.serve.local import LLMServerIngress

    cfg = ServeConfig.from_args({"models": [{"model": model, "name": name, "engine": {
        "max_num_seqs": max_num_seqs, "max_queue": max_queue, "max_model_len": 1024},
        **({"engine_class": engine_class} if engine_class else {})}]})
    ingress = LLMServerIngress(cfg.models[0].model_dump(mode="json"), cfg.stream_batching_interval_ms, cfg.to_args())
    app = create_app(ingress)

    @asynccontextmanager
    async def load(_app):  # the model loads before the port answers, as at a replica's first health check
        await ingress.check_health()
        yield

    app.router.lifespan_context = load

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    m, p, n, s, q = sys.argv[1:6]
    main(m, int(p), n, int(s), int(q), *sys.argv[6:7])
