"""The router as an HTTP app and as a Ray Serve application.

``create_app(router)``: the Starlette app over one ``Router`` (no Serve: tests, a plain uvicorn).
``build_router_app(args)``: the Serve application builder behind ``import_path: mlx_ray.router:app``. Its one
deployment, ``Router``, runs where the cluster's control plane runs (``placement: head``, Ray's
``node:__internal_head__`` resource), never on the Mac: the Mac's sleep must not take the router with it.
Ray 2.53's Serve takes no label selector, so the head resource is the placement that works on both
Rays this project supports. ``serve_config_v2(cfg)``: the RayService ``serveConfigV2`` block.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (routed), ``GET /v1/models`` (the public
name only), ``GET /health`` (open; every arm's circuit, probe and load; 503 when no arm can take a request).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any, Callable, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import BadRequest
from ..serve.ingress import _APIKeyMiddleware, _endpoint, _json, error_response
from .config import RouterConfig

APP_NAME = "router"
IMPORT_PATH = "mlx_ray.router:app"
DEPLOYMENT = "Router"
HEAD_RESOURCE = "node:__internal_head__"  # every Ray head offers it (Serve's controller is pinned by it)
MAX_BODY_BYTES = 64 << 20  # the arms enforce their own context limits; this only bounds what the router buffers


class RouterIngress:
    """One router replica. Plain class: ``serve.ingress`` is applied by the builder."""

    def __init__(self, config: "dict | RouterConfig"):
        from .metrics import RouterMetrics
        from .proxy import Router

        self.cfg = config if isinstance(config, RouterConfig) else RouterConfig.validate_dict(config)
        self.router = Router(self.cfg, metrics=RouterMetrics(self.cfg.public_model))

    async def check_health(self) -> None:
        """Serve's health check (every few seconds from the replica's start): starts the probe loop."""
        await self.router.start()

    async def chat_completions(self, request: Request) -> Response:
        return await self._route("/chat/completions", request)

    async def completions(self, request: Request) -> Response:
        return await self._route("/completions", request)

    async def _route(self, path: str, request: Request) -> Response:
        try:
            await self.router.start()
            body = await _json(request, MAX_BODY_BYTES)
            return await _unless_client_leaves(request, self.router.handle(path, body, request.headers))
        except Exception as e:  # noqa: BLE001 - every error becomes an OpenAI error body
            return error_response(e)

    async def list_models(self, request: Request) -> Response:
        return JSONResponse(self.router.models())

    async def health(self, request: Request) -> Response:
        await self.router.start()
        ok, report = self.router.health()
        report["node_id"] = _node_id()
        return JSONResponse(report, status_code=200 if ok else 503)


def _node_id() -> Optional[str]:
    """The Ray node this replica runs on (None outside Ray): where the router is, for operators and tests."""
    ray = sys.modules.get("ray")  # never imported for this: outside Ray there is no node
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - a report, never a failure
        return None


async def _unless_client_leaves(request: Request, work) -> Response:
    """``work``'s response; cancelled if the client disconnects first (uvicorn does not cancel a handler
    whose client left, and until an arm's first byte nothing is streaming yet that would notice). Cancelling
    closes the arm's connection, so the arm drops the request instead of queueing and prefilling it for
    nobody. Under Serve, its proxy cancels the replica's handler itself; this changes nothing there."""
    task = asyncio.ensure_future(work)

    async def left() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return
            if not msg.get("more_body"):  # a server that hands the body out again: nothing more to learn here
                await asyncio.Event().wait()

    watch = asyncio.ensure_future(left())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled itself (Serve's proxy saw the client go)
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return Response(status_code=499)  # nobody reads it: the client is gone (nginx's "client closed request")


ROUTES = {
    "/v1/chat/completions": ("chat_completions", ["POST"]),
    "/v1/completions": ("completions", ["POST"]),
    "/v1/models": ("list_models", ["GET"]),
    "/health": ("health", ["GET"]),
}


def resolve_api_key(cfg: RouterConfig) -> Optional[str]:
    """The key clients must send, read where the router runs (None: no key)."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise BadRequest(f"api_key_env {cfg.api_key_env}: the variable is not set (or empty) where the router runs")
    return key


def _app(cfg: RouterConfig, resolve: Callable[[], RouterIngress]) -> Starlette:
    """A plain Starlette app, not FastAPI: the router has four routes and no request models, and FastAPI's
    routing and middleware took a fifth of the router's CPU per streamed request (py-spy, 16 concurrent)."""
    app = Starlette()
    key = resolve_api_key(cfg)
    if key is not None:
        app.add_middleware(_APIKeyMiddleware, key=key)
    for path, (name, methods) in ROUTES.items():
        app.add_route(path, _endpoint(resolve, name), methods=methods)
    return app


def create_app(ingress: RouterIngress) -> Starlette:
    """The app over one router replica (no Serve)."""
    return _app(ingress.cfg, lambda: ingress)


def _replica() -> RouterIngress:
    from ray import serve

    return serve.get_replica_context().servable_object


def asgi_app_builder(config: dict) -> Callable[[], Starlette]:
    """What ``serve.ingress`` wraps: a function that builds the app inside the replica (see
    ``serve.ingress.asgi_app_builder`` for why a function and not an app object)."""

    def build_asgi_app() -> Starlette:
        return _app(RouterConfig.validate_dict(config), _replica)

    return build_asgi_app


def deployment_options(cfg: RouterConfig) -> dict:
    actor: dict[str, Any] = {"num_cpus": 0}
    if cfg.placement == "head":
        actor["resources"] = {HEAD_RESOURCE: 0.001}
    return {"name": DEPLOYMENT, "num_replicas": cfg.num_replicas, "max_ongoing_requests": cfg.max_ongoing_requests,
            "ray_actor_options": actor, "health_check_period_s": 2}


def config_from_args(args: Optional[dict]) -> RouterConfig:
    """The config from a Serve ``args`` dict: the config itself, or ``{"config_file": PATH}`` (+ overrides)."""
    from ..serve.config import read_config_file

    args = dict(args or {})
    if "config_file" in args:
        base = read_config_file(args.pop("config_file"))
        base.update(args)
        args = base
    return RouterConfig.validate_dict(args, source="args")


def build_router_app(args: Optional[dict] = None):
    """Serve application builder: ``args`` is the router config (or ``{"config_file": PATH}``)."""
    from ray import serve

    cfg = config_from_args(args)
    resolve_api_key(cfg)  # a missing key fails the build in one line, not a replica later
    data = cfg.model_dump(mode="json")
    cls = serve.ingress(asgi_app_builder(data))(RouterIngress)
    return serve.deployment(cls).options(**deployment_options(cfg)).bind(data)


def serve_config_v2(cfg: RouterConfig, app_name: str = APP_NAME, route_prefix: str = "/",
                    package_uri: Optional[str] = None) -> dict:
    """The router's ``serveConfigV2`` application block (``package_uri``: `mlx-ray package`'s zip, for a
    head without mlx-ray installed)."""
    from ..serve.package import check_package_uri

    args = cfg.model_dump(mode="json", exclude_defaults=True, exclude={"host", "port"})
    args = {"public_model": cfg.public_model, "policy": cfg.policy,
            "arms": [a.model_dump(mode="json", exclude_defaults=True) for a in cfg.arms], **args}
    opts = deployment_options(cfg)
    dep = {k: opts[k] for k in ("name", "num_replicas", "max_ongoing_requests", "ray_actor_options")}
    block: dict[str, Any] = {"name": app_name, "route_prefix": route_prefix, "import_path": IMPORT_PATH}
    if package_uri:
        block["runtime_env"] = {"py_modules": [check_package_uri(package_uri)]}
    block.update(args=args, deployments=[dep])
    return {"applications": [block]}
