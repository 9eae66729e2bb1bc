"""Application builders: the only place Serve decorators are applied.

``build_app(args)`` is a Ray Serve application builder (``import_path:
mlx_ray.serve:app`` or ``mlx_ray.serve:build_app``, with ``args`` or env vars):
one ``LLMServer`` deployment per model, each placed on the custom resource
(``gpu_apple_mps`` by default) with ``max_ongoing_requests`` equal to its
engine's admission limit, behind one ``OpenAIIngress`` FastAPI deployment.
"""

from __future__ import annotations

from typing import Any, Optional

from ..blas import runtime_env_vars
from .config import ServeConfig
from .ingress import OpenAIIngress, fastapi_app_for_class
from .server import LLMServer

APP_NAME = "mlx-ray"
IMPORT_PATH = "mlx_ray.serve:app"
INGRESS_NAME = "OpenAIIngress"


def worker_runtime_env(extra_env: Optional[dict] = None) -> dict:
    """runtime_env of the model replicas: on Linux, MLX needs the OpenBLAS preload at process start."""
    env = {**runtime_env_vars(), **(extra_env or {})}
    return {"env_vars": env} if env else {}


def build_app(args: Optional[dict] = None):
    """Serve application builder: `args` is the serve config's `args` (or {} to read env vars)."""
    return build_from_config(ServeConfig.from_args(args))


def build_from_config(cfg: ServeConfig, runtime_env: Optional[dict] = None):
    from ray import serve

    runtime_env = worker_runtime_env() if runtime_env is None else runtime_env
    servers: dict[str, Any] = {}
    for m in cfg.models:
        dep = serve.deployment(LLMServer).options(**m.deployment_options(runtime_env))
        servers[m.name] = dep.bind(m.model_dump(mode="json"), cfg.stream_batching_interval_ms)
    ingress_cls = serve.ingress(fastapi_app_for_class(cfg, OpenAIIngress))(OpenAIIngress)
    ingress = serve.deployment(ingress_cls).options(
        name=INGRESS_NAME,
        num_replicas=cfg.ingress_num_replicas,
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(servers, cfg.to_args())


def serve_config_v2(cfg: ServeConfig, app_name: str = APP_NAME) -> dict:
    """The `serveConfigV2` application block for a RayService (or `serve deploy`).

    The API key itself is never printed: an inline key is replaced by reading env API_KEY,
    which the operator sets from a Kubernetes secret.
    """
    args = cfg.model_dump(mode="json", exclude_defaults=True, exclude={"api_key", "host", "port"})
    deployments = []
    for m in cfg.models:
        opts = m.deployment_options()
        deployments.append({k: v for k, v in opts.items() if k in (
            "name", "num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests",
            "ray_actor_options", "health_check_period_s", "health_check_timeout_s")})
    deployments.append({"name": INGRESS_NAME, "num_replicas": cfg.ingress_num_replicas,
                        "max_ongoing_requests": cfg.ingress_max_ongoing_requests})
    env = dict(runtime_env_vars())
    if cfg.api_key is not None and cfg.api_key_file is None:
        env["API_KEY"] = "<set from a secret>"
    block = {"name": app_name, "route_prefix": "/", "import_path": IMPORT_PATH,
             "runtime_env": {"env_vars": env}, "args": args, "deployments": deployments}
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
