"""`mlx-ray serve`: serve models through Ray Serve with an OpenAI-compatible API.

Without --address it starts an embedded local Ray (declaring the placement
resource on this node so the default placement works); with --address it
deploys to an existing cluster (token auth through RAY_AUTH_TOKEN /
RAY_AUTH_TOKEN_PATH, which Ray reads itself). It blocks until Ctrl-C / SIGTERM
and then tears the application down. `--print-config` prints the RayService
`serveConfigV2` block instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Optional

from ..errors import BadRequest, EngineFault
from .builder import APP_NAME, build_from_config, placement_problems, serve_config_v2
from .config import ServeConfig, read_config_file
from .package import stage_module_dir

READY_TIMEOUT_S = 600.0


def configure_parser(p) -> None:
    p.add_argument("--model", action="append", default=[], metavar="M",
                   help="model to serve (path, cache name or hub id); repeat for several")
    p.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                   help="name clients use in `model` (one per --model, in order; default: the --model value)")
    p.add_argument("--config", metavar="FILE", help="YAML/JSON serve config (see mlx_ray.serve.config.ServeConfig)")
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--address", help="Ray cluster to deploy to (default: an embedded local Ray)")
    p.add_argument("--app-name", default=APP_NAME, help=f"Serve application name (default {APP_NAME})")
    p.add_argument("--route-prefix", default="/",
                   help="HTTP route prefix of the application (default /; use another one next to existing apps)")
    p.add_argument("--api-key-file", metavar="F", help="require this bearer key (first line of F, read where the ingress runs)")
    p.add_argument("--api-key-env", metavar="VAR", help="require the bearer key in env var VAR (read where the ingress runs)")
    p.add_argument("--max-model-len", type=int, help="context limit for every model")
    p.add_argument("--max-num-seqs", type=int, help="sequences decoded together per model")
    p.add_argument("--max-queue", type=int, help="requests waiting for admission per model")
    p.add_argument("--kv-cache", choices=("auto", "paged", "batch"),
                   help="KV cache per model: paged (block pool) where verified, batch (mlx-lm's), auto (default)")
    p.add_argument("--kv-bits", choices=("auto", "model", "8", "4"),
                   help="KV cache precision: auto (default: the model's dtype when the memory plan fits it, else 8), "
                        "model (never quantize), 8 or 4")
    p.add_argument("--admission", choices=("backfill", "fifo"),
                   help="backfill (default): while the oldest request waits for KV, start later ones that cannot "
                        "delay it; fifo: strictly in arrival order")
    p.add_argument("--speculative", "--speculative-config", dest="speculative", metavar="JSON",
                   help="speculative decoding per model (paged KV cache), vLLM's speculative_config as JSON: "
                        "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' (method ngram|draft, draft_model, "
                        "prompt_lookup_min, prompt_lookup_max, auto); 'off': none (the default)")
    p.add_argument("--kv-budget-mib", type=int, help="KV-cache MiB per model (default: from device memory)")
    p.add_argument("--prefix-cache-mib", type=int, help="prefix-cache MiB per model (0 disables)")
    p.add_argument("--resource", help="custom Ray resource replicas need (default gpu_apple_mps; 'none' for none)")
    p.add_argument("--num-cpus", type=float, help="CPUs per model replica")
    p.add_argument("--print-config", action="store_true", help="print the serveConfigV2 application block and exit")
    p.add_argument("--json", action="store_true", help="with --print-config: JSON instead of YAML")
    p.add_argument("--package-uri", metavar="URI",
                   help="with --print-config: where the cluster fetches `mlx-ray package`'s zip (https://, s3://, "
                        "gs://, file://), for a head without mlx-ray")
    p.add_argument("--env-vars", action="store_true",
                   help="with --print-config: name the model with env vars (MODEL_ID, MAX_MODEL_LEN, ...) instead of args")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for the app to be healthy")


def config_from_args(args) -> ServeConfig:
    data = read_config_file(args.config) if args.config else {}
    if args.model:
        names = args.served_model_name
        if names and len(names) != len(args.model):
            raise BadRequest("--served-model-name: give one per --model")
        base = (data.get("models") or [{}])[0]
        base = {k: v for k, v in base.items() if k not in ("model", "name")}
        data["models"] = [{**json.loads(json.dumps(base)), "model": m, **({"name": names[i]} if names else {})}
                          for i, m in enumerate(args.model)]
    elif not data.get("models"):
        raise BadRequest("no model given: pass --model M (or --config FILE with models)")
    for m in data["models"]:
        eng = m.setdefault("engine", {})
        for key in ("max_model_len", "max_num_seqs", "max_queue", "kv_cache", "admission"):
            if getattr(args, key) is not None:
                eng[key] = getattr(args, key)
        if getattr(args, "speculative", None) is not None:  # JSON text: EngineConfig parses and validates it
            eng["speculative"] = args.speculative
        if args.kv_bits is not None:  # the flag's words -> EngineConfig's values
            eng["kv_bits"] = {"auto": "auto", "model": None, "8": 8, "4": 4}[args.kv_bits]
        for key, mib in (("kv_budget_bytes", args.kv_budget_mib), ("prefix_cache_bytes", args.prefix_cache_mib)):
            if mib is not None:
                eng[key] = mib << 20
        pl = m.setdefault("placement", {})
        if args.resource is not None:
            pl["resource"] = None if args.resource.lower() in ("none", "") else args.resource
        if args.num_cpus is not None:
            pl["num_cpus"] = args.num_cpus
    for key in ("host", "port", "api_key_file", "api_key_env"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    return ServeConfig.validate_dict(data, source=args.config or "arguments")


def main(args) -> int:
    cfg = config_from_args(args)
    if not args.route_prefix.startswith("/"):
        raise BadRequest(f"--route-prefix must start with '/', got {args.route_prefix!r}")
    if args.print_config:
        block = serve_config_v2(cfg, app_name=args.app_name, route_prefix=args.route_prefix,
                                package_uri=args.package_uri, env_vars=args.env_vars)
        if args.json:
            print(json.dumps(block, indent=2))
        else:
            import yaml

            print(yaml.safe_dump(block, sort_keys=False), end="")
        return 0
    if args.package_uri or args.env_vars:
        raise BadRequest("--package-uri and --env-vars go with --print-config (a deploy from here ships the code itself)")
    cfg.resolve_api_key()  # a missing key file or env var fails here, in one line, not in a replica
    return run(cfg, address=args.address, ready_timeout=args.ready_timeout, app_name=args.app_name,
               route_prefix=args.route_prefix)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def connect_ray(cfg: ServeConfig, address: Optional[str]) -> None:
    connect_ray_plain(address, {m.placement.resource: max(1.0, m.placement.resource_amount)
                                for m in cfg.models if m.placement.resource},
                      cfg.ray_event_stats, cfg.control_loop_interval_s)


def connect_ray_plain(address: Optional[str], resources: Optional[dict] = None, ray_event_stats: bool = False,
                      control_loop_interval_s: float = 0.5) -> None:
    """Join the cluster at ``address`` (shipping mlx-ray's code with the job), or start an embedded Ray
    declaring ``resources`` on this node."""
    import ray

    if address:
        use_token_auth(os.environ)
        # The ingress may land on a node without mlx-ray (a stock head): ship our pure-Python
        # code with the job (Ray uploads it at init); where mlx-ray is installed it hands over
        # to that install (package.py).
        with tempfile.TemporaryDirectory(prefix="mlx-ray-pkg-") as tmp:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False,
                     runtime_env={"py_modules": [str(stage_module_dir(tmp))]})
        return
    # The embedded raylet starts replicas at nice 15 unless told otherwise (worker/command.py).
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Serve's controller polls every 0.1 s by default; on this one machine the controller and the GCS answering
    # it then take 0.06 cores idle (0.025 at 0.5 s) from the engine: 0.5 s raised Serve / engine throughput
    # in 10 of 12 paired runs (README, "Embedded control plane"). Health checks run every 10 s either way.
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", f"{control_loop_interval_s:g}")
    # Every Ray process times each handler of its event loops (event stats, for `ray debug` dumps) and the
    # main service exports per-handler metrics; with a stream message per Ray RPC that is ~0.3 ms of CPU per
    # streamed token across the proxy, the replica and Ray's daemons (README, "Ray's own instrumentation").
    # Application metrics (Serve's, ours) do not use them.
    if not ray_event_stats:
        os.environ.setdefault("RAY_event_stats", "0")
        os.environ.setdefault("RAY_emit_main_service_metrics", "0")
    ray.init(address="local", include_dashboard=False, resources=resources or {}, logging_level="WARNING",
             log_to_driver=False)


def use_token_auth(env) -> bool:
    """Token auth (Ray >= 2.52): Ray reads RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH itself, but only
    in RAY_AUTH_MODE=token; turn that on when a token is given. Returns whether it is on."""
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.path.isfile(os.path.expanduser(path)):
        raise BadRequest(f"RAY_AUTH_TOKEN_PATH={path} does not exist; point it at the cluster's token file")
    if env.get("RAY_AUTH_TOKEN") or path:
        env.setdefault("RAY_AUTH_MODE", "token")
    return env.get("RAY_AUTH_MODE") == "token"


def deploy(cfg: ServeConfig, app_name: str = APP_NAME, route_prefix: str = "/",
           proxy_location: Optional[str] = None) -> str:
    """Start Serve's proxy on cfg.host:cfg.port and deploy without waiting; returns the base URL.

    On a cluster where Serve already runs (a RayService, say), ``serve.start``
    keeps that instance's HTTP options: the URL then uses the port Serve really
    listens on, and a route prefix already taken is refused with a hint."""
    from ray import serve

    opts = {"proxy_location": proxy_location} if proxy_location else {}
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, **opts)
    host, port = cfg.host, serve_http_port(default=cfg.port)
    app = build_from_config(cfg)
    try:
        try:
            serve._run(app, name=app_name, route_prefix=route_prefix, _blocking=False)
        except (AttributeError, TypeError):  # should a future Ray drop the private entry point
            serve.run(app, name=app_name, route_prefix=route_prefix, blocking=False)
    except Exception as e:  # noqa: BLE001 - Serve wraps its refusal in a RayTaskError
        if "is being used by application" in str(e):
            raise BadRequest(f"route prefix {route_prefix} is already used by another Serve application on this "
                             "cluster; pass --route-prefix /another (and --app-name)") from None
        raise
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def serve_http_port(default: int) -> int:
    """The port Serve's proxies listen on (an already running Serve keeps its own, whatever we asked).

    Serve has no public getter for it; the controller client's ``http_config``
    (Ray 2.53-2.60) holds it. Falls back to ``default``."""
    try:
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    except Exception:  # noqa: BLE001
        return default


def wait_ready(cfg: ServeConfig, url: str, app_name: str = APP_NAME, timeout: float = READY_TIMEOUT_S,
               say=print) -> None:
    """Wait until the app is RUNNING and /health answers 200; say why when it is stuck."""
    from ray import serve

    t0 = time.monotonic()
    told: set[str] = set()
    while time.monotonic() - t0 < timeout:
        app = serve.status().applications.get(app_name)
        status = str(getattr(app, "status", "")) if app else ""
        if "DEPLOY_FAILED" in status or "UNHEALTHY" in status:
            raise EngineFault(f"deployment failed: {' '.join((app.message or status).split())[:500]}")
        if "RUNNING" in status and _health_ok(url):
            return
        if time.monotonic() - t0 > 5:
            for msg in placement_problems(cfg):
                if msg not in told:
                    told.add(msg)
                    say(f"waiting: {msg}")
        time.sleep(1.0)
    raise EngineFault(f"the application was not healthy after {timeout:.0f}s; see `serve status` and the Ray logs")


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def curl_example(cfg: ServeConfig, url: str) -> str:
    auth = ' -H "Authorization: Bearer $API_KEY"' if cfg.has_api_key else ""
    body = json.dumps({"model": cfg.models[0].name, "messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": 32})
    return f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


def run(cfg: ServeConfig, address: Optional[str] = None, ready_timeout: float = READY_TIMEOUT_S,
        app_name: str = APP_NAME, route_prefix: str = "/") -> int:
    import ray

    if cfg.port == 0:
        cfg.port = free_port(cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1")

    def _stop(*_):
        raise KeyboardInterrupt

    connect_ray(cfg, address)
    deployed = None
    # after ray.init, so ours replace Ray's fatal-signal logger; SIGINT too, since a
    # shell starting us in the background leaves SIGINT ignored
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        url = deploy(cfg, app_name=app_name, route_prefix=route_prefix,
                     proxy_location=None if address else "HeadOnly")
        deployed = app_name
        say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        if not url.startswith(f"http://{cfg.host}:{cfg.port}") and cfg.host not in ("0.0.0.0", "::"):
            say(f"mlx-ray serve: Serve already runs on this cluster; its HTTP options stand ({url}), not --port")
        say(f"mlx-ray serve: deploying {', '.join(m.name for m in cfg.models)} (Ray {ray.__version__}) ...")
        wait_ready(cfg, url, app_name=app_name, timeout=ready_timeout, say=say)
        print(f"mlx-ray serve: ready at {url}/v1 (models: {', '.join(m.name for m in cfg.models)})", flush=True)
        print(f"try:\n  {curl_example(cfg, url)}", flush=True)
        block_until_stopped()
    except KeyboardInterrupt:  # while deploying
        pass
    finally:
        tear_down("serve", address, deployed)
    return 0


def block_until_stopped() -> None:
    """Wait for Ctrl-C or SIGTERM (the handlers raise KeyboardInterrupt)."""
    print("Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def tear_down(command: str, address: Optional[str], deployed: Optional[str]) -> None:
    """Embedded Ray: stop Serve; a cluster: delete only our application (the cluster and its other apps stay up)."""
    from ray import serve
    import ray

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the teardown finish
    if deployed or not address:
        print(f"mlx-ray {command}: shutting down", file=sys.stderr, flush=True)
    try:
        if not address:
            serve.shutdown()
        elif deployed:
            serve.delete(deployed)
    finally:
        ray.shutdown()


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main as _main

    sys.exit(_main(["serve", *sys.argv[1:]]))
