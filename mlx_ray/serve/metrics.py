"""Prometheus metrics through ``ray.serve.metrics`` (exported by Ray's metrics agent), and the load
a router reads: ``load_report`` (``GET /v1/load``) and vLLM's gauges (``GET /metrics``).

Outside a Serve replica (unit tests, plain use) Ray's metric objects still work
once Ray is initialised; without Ray they are replaced by no-ops so the server
class stays usable on its own.

vLLM's gauge names have a colon (``vllm:num_requests_waiting``). Ray 2.53 and 2.60 both accept a
colon in ``ray.util.metrics`` (its name pattern is Prometheus's, ``[a-zA-Z_:][a-zA-Z0-9_:]*``) but
warn that it "is no longer allowed" (a FutureWarning, "an error in the future"), and their default
OpenTelemetry export (``RAY_enable_open_telemetry``, on in both) registers the instrument as
``ray_<name>``, which OpenTelemetry's name rule (``[a-zA-Z][-_./a-zA-Z0-9]*``) refuses with a colon.
So Ray's side uses ``vllm_num_requests_waiting``: Ray's metrics port shows it as
``ray_vllm_num_requests_waiting``, the name Ray Serve LLM's vLLM metrics have (vLLM's Ray stat
logger replaces the colon the same way) and the name a router reads after the colon form. The
ingress's own ``/metrics`` has no Ray in between and uses vLLM's names as they are.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger("mlx_ray.serve")

TTFT_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]
TPOT_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]


# vLLM's gauges (v1 names), each with a ``model_name`` label: name -> help.
VLLM_GAUGES = {
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
}


# Speculative decoding's stats (``engine.stats()``, ``engine/spec/``) exported as ``mlx_ray_<key>`` gauges.
SPEC_GAUGES = {
    "spec_drafted_tokens": "Tokens drafted for verification since start.",
    "spec_accepted_tokens": "Drafted tokens the target accepted since start.",
    "spec_acceptance_rate": "Accepted / drafted tokens since start.",
    "spec_steps": "Steps that verified drafts.",
    "spec_rows_planned": "Row-steps the controller let draft.",
    "spec_rows_off": "Row-steps the controller decoded without drafting.",
    "spec_probes": "Row-steps drafting one token to re-measure a row left out.",
    "spec_probes_skipped": "Row-steps not probed: at the batch's size even a well-drafting row would not pay.",
    "spec_draft_forward_s": "Seconds of one draft-model forward of one row, as the controller predicts it.",
    "spec_delivered_ratio": "Tokens/s planned verify steps delivered over what the controller's model promised (EWMA).",
}


def ray_metric_name(vllm_name: str) -> str:
    """The name to give Ray for a vLLM gauge: no colon (see the module's docstring); Ray adds ``ray_``."""
    return vllm_name.replace(":", "_")


def load_counts(s: dict) -> tuple[int, int]:
    """(waiting, running) from ``engine.stats()``. A request the engine accepted that the loop has not
    taken in yet (``inflight`` beyond the loop's rows and queue) waits too."""
    running = int(s.get("running", 0))
    return max(int(s.get("waiting", 0)), int(s.get("inflight", 0)) - running), running


def kv_cache_usage(s: dict) -> float:
    """KV-cache usage in 0..1, as vLLM's ``kv_cache_usage_perc``: paged, 1 - free blocks / blocks (a
    prefix-cache block nobody holds counts free, as in vLLM); otherwise KV bytes / the KV budget."""
    total = s.get("kv_blocks_total")
    if s.get("kv_cache") == "paged" and total:
        used = 1.0 - s.get("kv_blocks_free", total) / total
    else:
        budget = s.get("kv_budget_bytes") or 0
        used = (s.get("kv_bytes_used") or 0) / budget if budget else 0.0
    return min(1.0, max(0.0, used))


def vllm_gauges(s: dict) -> dict[str, float]:
    """vLLM's gauges (``VLLM_GAUGES``) from ``engine.stats()``."""
    waiting, running = load_counts(s)
    return {"vllm:num_requests_waiting": waiting, "vllm:num_requests_running": running,
            "vllm:kv_cache_usage_perc": kv_cache_usage(s)}


def load_report(model: str, s: dict, max_num_seqs: int) -> dict[str, Any]:
    """``GET /v1/load``'s body, from ``engine.stats()`` (what ``router.loads.parse_mlx_ray_report``
    reads). The rates are the engine loop's measured means (0.0: not measured yet); ``max_num_seqs``
    is the engine's (the configured one if its stats do not say)."""
    waiting, running = load_counts(s)
    return {"model": model, "waiting": waiting, "running": running,
            "free_kv_blocks": s.get("kv_blocks_free"), "kv_blocks_total": s.get("kv_blocks_total"),
            "prefill_tokens_per_s": float(s.get("prefill_tokens_per_s") or 0.0),
            "decode_tokens_per_s": float(s.get("decode_tokens_per_s") or 0.0),
            "max_num_seqs": int(s.get("max_num_seqs") or max_num_seqs)}


def prometheus_text(models: dict[str, dict]) -> tuple[bytes, str]:
    """(body, content type) of a Prometheus text exposition (format 0.0.4, what vLLM serves) of
    ``VLLM_GAUGES`` for each model's ``engine.stats()`` (model name -> stats), from a registry of its
    own (not the process's global one)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    values = {name: vllm_gauges(s) for name, s in models.items()}

    class Collector:
        def collect(self):
            for gauge, help_ in VLLM_GAUGES.items():
                family = GaugeMetricFamily(gauge, help_, labels=["model_name"])
                for name, v in values.items():
                    family.add_metric([name], v[gauge])
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8"


class _Noop:
    def inc(self, *a, **k): ...
    def observe(self, *a, **k): ...
    def set(self, *a, **k): ...


def _metric(kind: str, name: str, description: str, tags: dict, buckets: Optional[list] = None):
    try:
        import ray
        from ray.serve import metrics as m

        if not ray.is_initialized():
            return _Noop()
        keys = tuple(tags)
        tags = dict(tags)  # Serve's set_default_tags adds its own tags to the dict it is given
        if kind == "counter":
            obj = m.Counter(name, description=description, tag_keys=keys)
        elif kind == "gauge":
            obj = m.Gauge(name, description=description, tag_keys=keys)
        else:
            obj = m.Histogram(name, description=description, boundaries=buckets, tag_keys=keys)
        obj.set_default_tags(tags)
        return obj
    except Exception as e:  # metrics must never take serving down
        log.warning("metric %s disabled: %s: %s", name, e.__class__.__name__, e)
        return _Noop()


class ServerMetrics:
    """All metrics of one model's LLMServer replica, tagged with the served model name."""

    def __init__(self, model: str):
        t = {"model": model}
        self.requests = _metric("counter", "mlx_ray_requests_total", "Requests finished, by status.", {**t, "status": ""})
        self.prompt_tokens = _metric("counter", "mlx_ray_prompt_tokens_total", "Prompt tokens processed.", t)
        self.generation_tokens = _metric("counter", "mlx_ray_generation_tokens_total", "Tokens generated.", t)
        self.cached_tokens = _metric("counter", "mlx_ray_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.", t)
        self.ttft = _metric("histogram", "mlx_ray_time_to_first_token_seconds", "Time to first token.", t, TTFT_BUCKETS)
        # Observed once per request, as vLLM's request_time_per_output_token and TGI's
        # time_per_token: a Ray histogram observe per streamed token cost the replica's event
        # loop GIL time that the engine's loop thread waited for (py-spy under load).
        self.tpot = _metric("histogram", "mlx_ray_request_time_per_output_token_seconds",
                            "Mean time between output tokens of a request (after the first).", t, TPOT_BUCKETS)
        self.running = _metric("gauge", "mlx_ray_requests_running", "Sequences in the running batch.", t)
        self.waiting = _metric("gauge", "mlx_ray_requests_waiting", "Requests waiting for admission (queue depth).", t)
        self.kv_usage = _metric("gauge", "mlx_ray_kv_cache_usage_ratio", "KV-cache bytes used / budget.", t)
        self.prefix_hits = _metric("gauge", "mlx_ray_prefix_cache_hits", "Prefix-cache hits since start.", t)
        self.prefix_misses = _metric("gauge", "mlx_ray_prefix_cache_misses", "Prefix-cache misses since start.", t)
        self.kv_blocks_used = _metric("gauge", "mlx_ray_kv_cache_blocks_used", "Paged KV blocks held by running sequences.", t)
        self.kv_blocks_free = _metric("gauge", "mlx_ray_kv_cache_blocks_free", "Paged KV blocks free (including evictable prefix-cache blocks).", t)
        self.kv_blocks_cached = _metric("gauge", "mlx_ray_kv_cache_blocks_cached", "Paged KV blocks kept by the prefix cache.", t)
        # Speculative decoding (engine/spec/): what was drafted, accepted, and what the controller decided
        self.spec = {k: _metric("gauge", f"mlx_ray_{k}", help_, t) for k, help_ in SPEC_GAUGES.items()}
        # vLLM's gauges beside ours, for dashboards and routers that read vLLM (ray_vllm_...: see above)
        self.vllm = {g: _metric("gauge", ray_metric_name(g), help_, {"model_name": model})
                     for g, help_ in VLLM_GAUGES.items()}

    def request_done(self, status: str) -> None:
        self.requests.inc(1, tags={"status": status})

    def finished(self, ev, first_token_at: Optional[float] = None, last_token_at: Optional[float] = None) -> None:
        if first_token_at is not None and last_token_at is not None and ev.completion_tokens > 1:
            self.tpot.observe((last_token_at - first_token_at) / (ev.completion_tokens - 1))
        if ev.prompt_tokens > 0:
            self.prompt_tokens.inc(ev.prompt_tokens)
        if ev.completion_tokens > 0:
            self.generation_tokens.inc(ev.completion_tokens)
        if ev.cached_tokens > 0:
            self.cached_tokens.inc(ev.cached_tokens)

    def observe_stats(self, s: dict) -> None:
        self.running.set(s.get("running", 0))
        self.waiting.set(s.get("waiting", 0))
        budget = s.get("kv_budget_bytes") or 0
        self.kv_usage.set((s.get("kv_bytes_used", 0) / budget) if budget else 0.0)
        self.prefix_hits.set(s.get("prefix_hits", 0))
        self.prefix_misses.set(s.get("prefix_misses", 0))
        if s.get("kv_cache") == "paged":
            self.kv_blocks_used.set(s.get("kv_blocks_used", 0))
            self.kv_blocks_free.set(s.get("kv_blocks_free", 0))
            self.kv_blocks_cached.set(s.get("kv_blocks_cached", 0))
        for g, v in vllm_gauges(s).items():
            self.vllm[g].set(v)
        for k, g in self.spec.items():
            if k in s:
                g.set(s[k])
