"""A router in front of several OpenAI-compatible *arms* (issue 31).

One public model name for the cluster's clients; behind it, the cluster's vLLM primary and the Mac's
mlx-ray (or any OpenAI-compatible servers). This package's first layer is pure Python, with no Ray,
no HTTP and no clock of its own, so every decision is unit-testable:

- ``config``: the validated router config (``RouterConfig``, ``load_config``).
- ``hashing``: weighted rendezvous hashing, so A/B users stick to one arm (``pick``, ``rank``).
- ``breaker``: one circuit breaker per arm (``Breaker``).
- ``loads``: what an arm's load is (``ArmLoad``), parsed from vLLM's Prometheus gauges or an mlx-ray
  load report, or counted from the router's own requests in flight (``InFlight``).
- ``request``: what routing needs from a request (``RouteRequest``, ``route_request``).
- ``policy``: the decision itself, a pure function (``decide``, ``retry_target``).

The Serve application, the HTTP proxying and the CLI are built on top of these.
"""


def app(args: dict):
    """The ready import path ``mlx_ray.router:app``: Serve calls it with the config's ``args`` (the router
    config, or ``{"config_file": PATH}``)."""
    from .ingress import build_router_app

    return build_router_app(args)
