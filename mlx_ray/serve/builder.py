"""Application builders: the only place Serve decorators are applied.

``build_app(args)`` is a Ray Serve application builder (``import_path:
mlx_ray.serve:app`` or ``mlx_ray.serve:build_app``, with ``args`` or env vars):
one ``LLMServer`` deployment per model, each placed on the custom resource
(``gpu_apple_mps`` by default) with ``max_ongoing_requests`` equal to its
engine's admission limit, behind one ``OpenAIIngress`` FastAPI deployment.

Where each part runs (see ``package.py``): the build and the ingress need only
mlx-ray's pure-Python code, so a stock Ray head runs them from the application's
``py_modules``; the model replicas run the Mac worker's own install.
"""

from __future__ import annotations

from typing import Any, Optional

from ..blas import runtime_env_vars
from ..errors import BadRequest
from .config import ServeConfig, env_form
from .ingress import OpenAIIngress, asgi_app_builder
from .package import check_package_uri
from .local import LLMServerIngress
from .server import LLMServer

APP_NAME = "mlx-ray"
IMPORT_PATH = "mlx_ray.serve:app"
INGRESS_NAME = "OpenAIIngress"


def replica_runtime_env(extra_env: Optional[dict] = None) -> dict:
    """runtime_env of the model replicas: on Linux, MLX needs the OpenBLAS preload at process start.

    They also inherit the application's py_modules (Serve merges runtime_envs and
    Ray 2.53-2.60 accept no way to opt out in a config); the package's
    ``__init__`` then hands over to the worker's own install (``package.py``).
    """
    env = {**runtime_env_vars(), **(extra_env or {})}
    return {"env_vars": env} if env else {}


def build_app(args: Optional[dict] = None):
    """Serve application builder: `args` is the serve config's `args` (or {} to read env vars)."""
    return build_from_config(ServeConfig.from_args(args))


def build_from_config(cfg: ServeConfig, runtime_env: Optional[dict] = None):
    from ray import serve

    if cfg.api_key is not None:
        raise BadRequest("api_key: an inline key would be stored in Ray's GCS with the deployment; "
                         "use api_key_file or api_key_env (read where the ingress runs)")
    runtime_env = replica_runtime_env() if runtime_env is None else runtime_env
    if cfg.direct_ingress and len(cfg.models) == 1:  # the model's replica serves HTTP itself (local.py)
        (m,) = cfg.models
        cls = serve.ingress(asgi_app_builder(cfg.to_args()))(LLMServerIngress)
        return serve.deployment(cls).options(**direct_options(cfg, runtime_env)).bind(
            m.model_dump(mode="json"), cfg.stream_batching_interval_ms, cfg.to_args(), cfg.stream_messages_per_s)
    servers: dict[str, Any] = {}
    for m in cfg.models:
        dep = serve.deployment(LLMServer).options(**m.deployment_options(runtime_env))
        servers[m.name] = dep.bind(m.model_dump(mode="json"), cfg.stream_batching_interval_ms,
                                   stream_messages_per_s=cfg.stream_messages_per_s)
    ingress_cls = serve.ingress(asgi_app_builder(cfg.to_args()))(OpenAIIngress)
    ingress = serve.deployment(ingress_cls).options(
        name=INGRESS_NAME,
        num_replicas=cfg.ingress_num_replicas,
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(servers, cfg.to_args())


def direct_options(cfg: ServeConfig, runtime_env: Optional[dict] = None) -> dict:
    """Deployment options of the one-model app: the model's, but HTTP requests reach the engine,
    whose admission control answers 429 + Retry-After itself (Serve's proxy would drop or 503)."""
    opts = cfg.models[0].deployment_options(runtime_env)
    opts["max_ongoing_requests"] = max(opts["max_ongoing_requests"], cfg.ingress_max_ongoing_requests)
    opts.pop("max_queued_requests", None)
    return opts


def serve_config_v2(cfg: ServeConfig, app_name: str = APP_NAME, route_prefix: str = "/",
                    package_uri: Optional[str] = None, env_vars: bool = False) -> dict:
    """The `serveConfigV2` application block for a RayService (or `serve deploy`).

    ``package_uri``: where the cluster fetches `mlx-ray package`'s zip, for a head
    without mlx-ray (the app's ``py_modules``).
    ``env_vars``: name the model with ``MODEL_ID``, ``MAX_MODEL_LEN``, ... in the
    app's ``runtime_env`` instead of ``args``, as many clusters' configs do.
    The API key itself is never printed: name a file (api_key_file) or an env var
    (api_key_env) that exists where the ingress runs, e.g. from a Kubernetes Secret.
    """
    args = cfg.model_dump(mode="json", exclude_defaults=True, exclude={"api_key", "host", "port"})
    env: dict[str, str] = {}
    if env_vars:
        env, args = env_form(args), {}
    direct = cfg.direct_ingress and len(cfg.models) == 1
    deployments = []
    for m in cfg.models:
        opts = direct_options(cfg, replica_runtime_env()) if direct else m.deployment_options(replica_runtime_env())
        deployments.append({k: v for k, v in opts.items() if k in (
            "name", "num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests",
            "ray_actor_options", "health_check_period_s", "health_check_timeout_s")})
    if not direct:
        deployments.append({"name": INGRESS_NAME, "num_replicas": cfg.ingress_num_replicas,
                            "max_ongoing_requests": cfg.ingress_max_ongoing_requests})
    runtime_env: dict[str, Any] = {}
    if package_uri:
        runtime_env["py_modules"] = [check_package_uri(package_uri)]
    if env:
        runtime_env["env_vars"] = env
    block = {"name": app_name, "route_prefix": route_prefix, "import_path": IMPORT_PATH,
             **({"runtime_env": runtime_env} if runtime_env else {}), "args": args, "deployments": deployments}
    return {"applications": [block]}


def placement_problems(cfg: ServeConfig) -> list[str]:
    """Why replicas cannot be placed now (needs a connected Ray): one clear line per model."""
    import ray

    total = ray.cluster_resources()
    out = []
    for m in cfg.models:
        need = m.placement.ray_actor_options()
        res = m.placement.resource
        if res and total.get(res, 0) < m.placement.resource_amount:
            out.append(f"model '{m.name}' waits for a node offering resource '{res}' and none has joined the cluster; "
                       f"start one with `ray start --address <head> --resources '{{\"{res}\": 1}}'` "
                       f"(or `mlx-ray worker`), or set placement.resource to null")
        elif total.get("CPU", 0) < need.get("num_cpus", 0):
            out.append(f"model '{m.name}' needs {need['num_cpus']} CPUs per replica; the cluster has {total.get('CPU', 0)}")
    return out
