"""Prometheus metrics through ``ray.serve.metrics`` (exported by Ray's metrics agent).

Outside a Serve replica (unit tests, plain use) Ray's metric objects still work
once Ray is initialised; without Ray they are replaced by no-ops so the server
class stays usable on its own.
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("mlx_ray.serve")

TTFT_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]
TPOT_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]


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
