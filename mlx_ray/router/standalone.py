"""The router's app under uvicorn, without Ray: for benchmarks (``bench/router.py``) and for running the router
outside a Ray cluster.

    python -m mlx_ray.router.standalone --config router.yaml [--host 127.0.0.1] [--port 8000]

It is ``create_app(RouterIngress(cfg))``, the app the Serve deployment serves, with the probe loop started
before the port answers (as Serve's first health check starts it). One process, one replica.
"""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager


def main(argv=None) -> None:
    import uvicorn

    from .ingress import RouterIngress, create_app
    from .config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the router config (YAML, or JSON by suffix)")
    p.add_argument("--host", help="default: the config's host")
    p.add_argument("--port", type=int, help="default: the config's port")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    ingress = RouterIngress(cfg)
    app = create_app(ingress)

    @asynccontextmanager
    async def lifespan(_app):
        await ingress.router.start()
        yield
        await ingress.router.close()

    app.router.lifespan_context = lifespan
    uvicorn.run(app, host=a.host or cfg.host, port=a.port if a.port is not None else cfg.port, log_level=a.log_level)


if __name__ == "__main__":
    main()
