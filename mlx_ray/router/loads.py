"""How busy an arm is: its load, read from the arm or counted by the router.

Three sources, best first:

- **Prometheus gauges** (``parse_prometheus``): vLLM never answers 429 when it is busy, so the router
  reads its queue instead: ``vllm:num_requests_waiting`` and ``vllm:num_requests_running`` (Ray Serve LLM
  exports the same as ``ray_vllm_num_requests_...``). These are the names the Kubernetes inference
  gateway's model-server protocol reads too. Samples are summed over label sets (several engines or
  replicas behind one endpoint), optionally only those with one ``model_name`` label.
- **An mlx-ray load report** (``parse_mlx_ray_report``): the same counts plus free KV blocks and the
  arm's measured prefill and decode rates, which make the TTFT prediction honest.
- **The router's own count** (``InFlight``): requests it sent and that have not finished, and the prompt
  tokens of those still waiting for their first token. Used alone when an arm has no load source, and as
  a floor for a scraped load, which is up to a probe interval old (``effective_load``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

WAITING, RUNNING = "num_requests_waiting", "num_requests_running"
_PREFIXES = ("vllm:", "ray_vllm_")  # vLLM's own names first; Ray Serve LLM's only when those are absent


@dataclass(frozen=True)
class ArmLoad:
    """One arm's load at one moment. ``waiting``: requests queued for a slot; ``running``: requests being
    prefilled or decoded. The rest is known only from an mlx-ray report. ``source``: "prometheus",
    "mlx_ray" or "in_flight"."""

    waiting: int
    running: int
    free_kv_blocks: Optional[int] = None
    prefill_tokens_per_s: Optional[float] = None
    decode_tokens_per_s: Optional[float] = None
    source: str = "in_flight"


def parse_prometheus(text: str, model_name: Optional[str] = None) -> ArmLoad:
    """The vLLM gauges in a Prometheus text exposition, as an ``ArmLoad``.

    Raises ``ValueError`` (one line) if the text does not parse, holds neither gauge, or, with
    ``model_name``, holds no sample for that model.
    """
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, dict[str, float]] = {p: {} for p in _PREFIXES}
    models: set[str] = set()
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                for prefix in _PREFIXES:
                    if s.name.startswith(prefix) and s.name[len(prefix):] in (WAITING, RUNNING):
                        label = s.labels.get("model_name")
                        if label is not None:
                            models.add(label)
                        if model_name is not None and label != model_name:
                            continue
                        gauge = s.name[len(prefix):]
                        sums[prefix][gauge] = sums[prefix].get(gauge, 0.0) + float(s.value)
    except ValueError as e:
        raise ValueError(f"not a Prometheus text exposition: {' '.join(str(e).split())}") from None
    for prefix in _PREFIXES:
        if sums[prefix]:
            got = sums[prefix]
            return ArmLoad(waiting=int(got.get(WAITING, 0)), running=int(got.get(RUNNING, 0)), source="prometheus")
    if model_name is not None and models:
        raise ValueError(f"no vLLM gauge with model_name={model_name!r} (seen: {', '.join(sorted(models))})")
    raise ValueError(f"no vLLM gauge ({_PREFIXES[0]}{WAITING} or {_PREFIXES[1]}{WAITING}) in the metrics")


def parse_mlx_ray_report(report: dict[str, Any]) -> ArmLoad:
    """An mlx-ray load report (JSON object) as an ``ArmLoad``. Keys: ``waiting``, ``running``, and
    optionally ``free_kv_blocks`` (or the engine stats' ``kv_blocks_free``), ``prefill_tokens_per_s``,
    ``decode_tokens_per_s``. Raises ``ValueError`` if waiting or running is missing or not a count."""
    try:
        waiting, running = int(report["waiting"]), int(report["running"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("an mlx-ray load report needs integer 'waiting' and 'running'") from None
    if waiting < 0 or running < 0:
        raise ValueError("an mlx-ray load report's 'waiting' and 'running' must be >= 0")
    free = report.get("free_kv_blocks", report.get("kv_blocks_free"))
    return ArmLoad(waiting=waiting, running=running,
                   free_kv_blocks=None if free is None else int(free),
                   prefill_tokens_per_s=_rate(report.get("prefill_tokens_per_s")),
                   decode_tokens_per_s=_rate(report.get("decode_tokens_per_s")),
                   source="mlx_ray")


def _rate(v: Any) -> Optional[float]:
    """A measured rate, or None when absent or not yet measured (0)."""
    try:
        r = float(v)
    except (TypeError, ValueError):
        return None
    return r if r > 0 else None


class InFlight:
    """The router's own count per arm: requests sent and not finished, and prompt tokens of those that
    have not had their first token yet (the queue ahead of a new request, as far as this router knows)."""

    def __init__(self) -> None:
        self._requests: dict[str, int] = {}
        self._queued_tokens: dict[str, int] = {}

    def start(self, arm: str, prompt_tokens: int) -> None:
        """A request was sent to ``arm``."""
        self._requests[arm] = self._requests.get(arm, 0) + 1
        self._queued_tokens[arm] = self._queued_tokens.get(arm, 0) + prompt_tokens

    def first_token(self, arm: str, prompt_tokens: int) -> None:
        """Its first token came: its prompt no longer queues ahead of others."""
        self._queued_tokens[arm] = max(0, self._queued_tokens.get(arm, 0) - prompt_tokens)

    def finish(self, arm: str, prompt_tokens: int = 0) -> None:
        """It ended. ``prompt_tokens``: pass the prompt's tokens if no first token came (failed, cancelled)."""
        self._requests[arm] = max(0, self._requests.get(arm, 0) - 1)
        if prompt_tokens:
            self.first_token(arm, prompt_tokens)

    def requests(self, arm: str) -> int:
        return self._requests.get(arm, 0)

    def queued_tokens(self, arm: str) -> int:
        return self._queued_tokens.get(arm, 0)


def shifted(load: ArmLoad, delta: int) -> ArmLoad:
    """A reported load moved by this router's own change since the report: ``delta`` = its requests in flight
    there now minus at the report. Requests sent since then wait; requests finished since then free their slots
    (the queue first: a freed slot takes a waiting request). So a report up to a probe interval old does not keep a drained arm looking full."""
    if delta > 0:
        return replace(load, waiting=load.waiting + delta)
    if delta < 0:  # a finished request's slot goes to a waiting one, if any: the queue shrinks first
        total = max(0, load.waiting + load.running + delta)
        running = min(load.running, total)
        return replace(load, running=running, waiting=total - running)
    return load


def effective_load(load: Optional[ArmLoad], in_flight: int, max_running: Optional[int] = None) -> ArmLoad:
    """The load to decide on. Without a reported ``load``: the router's ``in_flight`` count, the first
    ``max_running`` of them counted running and the rest waiting. With one: the report, but never fewer
    requests than this router has in flight there (those sent since the report count as waiting)."""
    if load is None:
        running = in_flight if max_running is None else min(in_flight, max_running)
        return ArmLoad(waiting=in_flight - running, running=running, source="in_flight")
    extra = in_flight - (load.waiting + load.running)
    return replace(load, waiting=load.waiting + extra) if extra > 0 else load
