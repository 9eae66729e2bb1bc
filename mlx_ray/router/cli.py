"""`mlx-ray route`: run the router (one public model name in front of several OpenAI-compatible arms).

Like `mlx-ray serve`: without --address on an embedded Ray, with --address on an existing cluster (only
the router's application is deployed, and deleted again on Ctrl-C); `--print-config` prints the RayService
`serveConfigV2` block instead. A bad config is one line and exit 2, before anything starts.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Optional

from ..errors import BadRequest, EngineFault
from .ingress import APP_NAME, build_router_app, resolve_api_key, serve_config_v2
from .config import RouterConfig, load_config

READY_TIMEOUT_S = 120.0


def configure_parser(p) -> None:
    p.add_argument("--config", metavar="FILE", required=True,
                   help="the router config, YAML or JSON (public_model, policy, arms; see docs/router.md)")
    p.add_argument("--address", help="Ray cluster to deploy to (default: an embedded local Ray)")
    p.add_argument("--host", help="embedded Ray: HTTP bind address (default: the config's, 127.0.0.1)")
    p.add_argument("--port", type=int, help="embedded Ray: HTTP port (default: the config's, 8000; 0: a free one)")
    p.add_argument("--app-name", default=APP_NAME, help=f"Serve application name (default {APP_NAME})")
    p.add_argument("--route-prefix", default="/", help="HTTP route prefix of the application (default /)")
    p.add_argument("--print-config", action="store_true", help="print the serveConfigV2 application block and exit")
    p.add_argument("--json", action="store_true", help="with --print-config: JSON instead of YAML")
    p.add_argument("--package-uri", metavar="URI",
                   help="with --print-config: where the cluster fetches `mlx-ray package`'s zip, for a head without mlx-ray")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for the router to answer")


def main(args) -> int:
    cfg = load_config(args.config)
    if args.host is not None:
        cfg.host = args.host
    if args.port is not None:
        cfg.port = args.port
    if not args.route_prefix.startswith("/"):
        raise BadRequest(f"--route-prefix must start with '/', got {args.route_prefix!r}")
    if args.print_config:
        block = serve_config_v2(cfg, app_name=args.app_name, route_prefix=args.route_prefix,
                                package_uri=args.package_uri)
        if args.json:
            print(json.dumps(block, indent=2))
        else:
            import yaml

            print(yaml.safe_dump(block, sort_keys=False), end="")
        return 0
    if args.package_uri:
        raise BadRequest("--package-uri goes with --print-config (a deploy from here ships the code itself)")
    resolve_api_key(cfg)
    return run(cfg, args.address, args.app_name, args.route_prefix, args.ready_timeout)


def run(cfg: RouterConfig, address: Optional[str], app_name: str = APP_NAME, route_prefix: str = "/",
        ready_timeout: float = READY_TIMEOUT_S) -> int:
    import ray
    from ray import serve

    from ..serve.cli import block_until_stopped, connect_ray_plain, free_port, serve_http_port, tear_down

    if cfg.port == 0:
        cfg.port = free_port(cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1")

    def _stop(*_):
        raise KeyboardInterrupt

    connect_ray_plain(address)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    deployed = None
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port},
                    **({} if address else {"proxy_location": "HeadOnly"}))
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        url = f"http://{host}:{serve_http_port(default=cfg.port)}{route_prefix.rstrip('/')}"
        say(f"mlx-ray route: deploying the router for {cfg.public_model!r} ({cfg.policy}, arms: "
            f"{', '.join(a.name for a in cfg.arms)}; Ray {ray.__version__}) ...")
        serve.run(build_router_app(cfg.model_dump(mode="json")), name=app_name, route_prefix=route_prefix,
                  blocking=False)
        deployed = app_name
        _wait_ready(url, ready_timeout)
        print(f"mlx-ray route: ready at {url}/v1 (model {cfg.public_model!r}); arms: {url}/health", flush=True)
        block_until_stopped()
    except KeyboardInterrupt:  # while deploying
        pass
    finally:
        tear_down("route", address, deployed)
    return 0


def _wait_ready(url: str, timeout: float) -> None:
    """Until /health answers (200: some arm can take requests; 503: the router runs, every arm is down)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code == 503:
                print(f"mlx-ray route: the router runs, but no arm answers yet: {e.read()[:500].decode()}",
                      file=sys.stderr, flush=True)
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise EngineFault(f"the router did not answer {url}/health within {timeout:.0f}s; see `serve status`")


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main as _main

    sys.exit(_main(["route", *sys.argv[1:]]))
