"""The router's metrics, per arm, through Ray's metrics (as the rest of mlx-ray exports them).

On Ray's metrics endpoint they appear with Ray's ``ray_`` prefix (``ray_mlx_ray_router_requests_total``).
Outside Ray (tests, a plain uvicorn) they are no-ops, as ``serve.metrics`` makes them.
"""

from __future__ import annotations

from ..serve.metrics import TTFT_BUCKETS, _metric

CIRCUIT_VALUE = {"closed": 0.0, "half_open": 0.5, "open": 1.0}


class RouterMetrics:
    """All metrics of one router replica, tagged with its public model name and, per sample, the arm."""

    def __init__(self, public_model: str):
        t = {"public_model": public_model, "arm": ""}
        self.requests = _metric("counter", "mlx_ray_router_requests_total",
                                "Requests sent to an arm, by route reason (primary, spill, ab, failover).",
                                {**t, "route": ""})
        self.spills = _metric("counter", "mlx_ray_router_spills_total", "Requests spilled to a secondary arm.", t)
        self.retries = _metric("counter", "mlx_ray_router_retries_total",
                               "Requests retried on this arm after another failed before its first byte.", t)
        self.failovers = _metric("counter", "mlx_ray_router_failovers_total",
                                 "Requests sent to this arm because the chosen arm's circuit was open.", t)
        self.errors = _metric("counter", "mlx_ray_router_errors_total",
                              "Failed attempts on an arm, by kind (connect, timeout, status, aborted, stream).",
                              {**t, "kind": ""})
        self.ttft = _metric("histogram", "mlx_ray_router_time_to_first_token_seconds",
                            "Time to first byte of an answer through the router, per arm.", t, TTFT_BUCKETS)
        self.circuit = _metric("gauge", "mlx_ray_router_circuit_state",
                               "An arm's circuit: 0 closed, 0.5 half-open, 1 open.", t)
        self.in_flight = _metric("gauge", "mlx_ray_router_requests_in_flight",
                                 "Requests this router replica has in flight on an arm.", t)

    def sent(self, arm: str, reason: str, retried: bool) -> None:
        self.requests.inc(1, tags={"arm": arm, "route": reason})
        if reason == "spill":
            self.spills.inc(1, tags={"arm": arm})
        if retried:
            self.retries.inc(1, tags={"arm": arm})
        elif reason == "failover":
            self.failovers.inc(1, tags={"arm": arm})

    def error(self, arm: str, kind: str) -> None:
        self.errors.inc(1, tags={"arm": arm, "kind": kind})

    def first_byte(self, arm: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"arm": arm})

    def arm_state(self, arm: str, circuit: str, in_flight: int) -> None:
        self.circuit.set(CIRCUIT_VALUE.get(circuit, 1.0), tags={"arm": arm})
        self.in_flight.set(in_flight, tags={"arm": arm})
