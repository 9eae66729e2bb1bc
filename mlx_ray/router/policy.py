"""The routing decision, as a pure function of the request, the arms' states and the config.

``decide(request, states, config)`` returns a ``Route(arm, reason)`` or ``NoArm(retry_after)``:

- **overflow** (``policy: overflow``): the primary first (reason ``primary``). A request *spills* to a
  secondary (reason ``spill``) only when all of these hold:
    1. the primary is past its configured load (more than ``max_waiting`` queued, or ``max_running``
       running; without a load source, the router's own requests in flight);
    2. the secondary's circuit is closed and it has room (under its own thresholds, free KV blocks);
    3. the predicted time to first token there is within ``ttft_slo_s``: (prompt tokens queued ahead of
       it + this prompt's tokens) / the secondary's prefill rate (measured by its load report, else the
       configured ``prefill_tokens_per_s``).
  Otherwise the request waits for the primary, as it would without the secondary: a long prompt that a
  slow Mac would take a minute to start never spills.
- **ab** (``policy: ab``): the arm the request's sticky key hashes to among the weighted arms
  (rendezvous hashing, ``hashing.rank``; reason ``ab``).
- **failover**, in both: when the chosen arm's circuit does not admit a request, the next arm that does
  (reason ``failover``): overflow goes from the primary to a secondary whatever its load or SLO (a slow
  answer beats none); ab goes down the key's rendezvous order, so failed-over users stay together too.
- **nothing admits**: ``NoArm(retry_after)``; the router answers 503 with ``Retry-After`` rather than
  send to an arm whose circuit is open.

``retry_target(route, request, states, config)``: where the one retry goes when the attempt on
``route.arm`` failed before its first byte reached the client.

After ``decide``, the caller claims the arm's breaker (``Breaker.try_acquire``): in half-open that takes
the one trial. The states are snapshots (``arm_state``); this module keeps no state and reads no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Union

from .breaker import Breaker, CircuitState
from .config import ArmConfig, RouterConfig
from .hashing import rank
from .loads import ArmLoad, effective_load
from .request import RouteRequest

Reason = Literal["primary", "spill", "ab", "failover"]


@dataclass(frozen=True)
class ArmState:
    """What the policy knows of one arm now.

    ``circuit``/``admits``/``retry_after_s``: its breaker (``admits``: closed, or half-open with the trial
    free). ``load``: the last load its source reported (None: no source, or the last read failed).
    ``in_flight``: this router's requests there. ``queued_prompt_tokens``: prompt tokens of those that have
    not had their first token yet."""

    circuit: CircuitState = "closed"
    admits: bool = True
    retry_after_s: float = 0.0
    load: Optional[ArmLoad] = None
    in_flight: int = 0
    queued_prompt_tokens: int = 0


def arm_state(breaker: Breaker, load: Optional[ArmLoad] = None, in_flight: int = 0,
              queued_prompt_tokens: int = 0) -> ArmState:
    """A snapshot of one arm for ``decide``."""
    return ArmState(circuit=breaker.state, admits=breaker.admits(), retry_after_s=breaker.retry_after(),
                    load=load, in_flight=in_flight, queued_prompt_tokens=queued_prompt_tokens)


@dataclass(frozen=True)
class Route:
    """Send the request to ``arm``. ``reason``: primary, spill, ab or failover (the x-mlx-ray-route
    header). ``retried``: this is the one retry. ``predicted_ttft_s``: a spill's prediction."""

    arm: str
    reason: Reason
    retried: bool = False
    predicted_ttft_s: Optional[float] = None


@dataclass(frozen=True)
class NoArm:
    """No arm admits a request: answer 503 with ``Retry-After: retry_after`` (whole seconds, >= 1)."""

    retry_after: int


Decision = Union[Route, NoArm]
_CLOSED = ArmState()


def past_load(arm: ArmConfig, state: ArmState) -> bool:
    """Whether the arm is past its configured load (no threshold set: never).

    With ``max_running`` alone, queued requests count toward it too: they will run, and the router's own requests
    sent since the arm's last report are counted as queued (``loads.shifted``), so a burst decided between two
    reports cannot all pass a threshold that only looked at ``running``."""
    load = effective_load(state.load, state.in_flight, arm.max_running)
    if arm.max_waiting is not None and load.waiting > arm.max_waiting:
        return True
    if arm.max_running is None:
        return False
    busy = load.running if arm.max_waiting is not None else load.running + load.waiting
    return busy >= arm.max_running


def has_room(arm: ArmConfig, state: ArmState) -> bool:
    """Whether the arm can take one more request now: under its own thresholds, and not out of KV blocks."""
    load = state.load
    if load is not None and load.free_kv_blocks is not None and load.free_kv_blocks <= 0:
        return False
    return not past_load(arm, state)


def predicted_ttft_s(request: RouteRequest, arm: ArmConfig, state: ArmState) -> float:
    """(prompt tokens queued ahead + this prompt's tokens) / the arm's prefill rate, in seconds.

    The queue ahead is what this router sent there and has not had a first token yet; other clients'
    requests are seen only through the arm's load (``has_room``)."""
    measured = state.load.prefill_tokens_per_s if state.load is not None else None
    rate = measured or arm.prefill_tokens_per_s
    return (state.queued_prompt_tokens + request.prompt_tokens) / rate


def decide(request: RouteRequest, states: Mapping[str, ArmState], config: RouterConfig) -> Decision:
    """Where this request goes now (see the module's docstring). An arm missing from ``states`` counts
    as closed with no load known."""
    if config.policy == "ab":
        return _ab(request, states, config)
    return _overflow(request, states, config)


def retry_target(route: Route, request: RouteRequest, states: Mapping[str, ArmState],
                 config: RouterConfig) -> Optional[Route]:
    """Where to retry a request whose attempt on ``route.arm`` failed before its first byte reached the
    client (refused, timed out, 5xx, 429, no first token in ``first_token_timeout_s``): another arm that
    admits, as a ``failover``; None if this was already the retry or no other arm admits."""
    if route.retried:
        return None
    others = [a for a in config.arms if a.name != route.arm and _st(states, a).admits]
    if not others:
        return None
    if config.policy == "ab":
        order = rank(request.hash_key, [(a.name, a.weight or 0.0) for a in others])
        return Route(order[0], "failover", retried=True)
    primary = config.primary
    if primary is not None and any(a.name == primary.name for a in others):
        return Route(primary.name, "failover", retried=True)
    best = _fastest(request, [a for a in others if a.role == "secondary"], states)
    return Route(best.name, "failover", retried=True) if best is not None else None


# -- the policies --------------------------------------------------------------------------

def _st(states: Mapping[str, ArmState], arm: ArmConfig) -> ArmState:
    return states.get(arm.name, _CLOSED)


def _fastest(request: RouteRequest, arms: list[ArmConfig], states: Mapping[str, ArmState]) -> Optional[ArmConfig]:
    """The arm with the lowest predicted TTFT (config order breaks ties)."""
    return min(arms, key=lambda a: predicted_ttft_s(request, a, _st(states, a)), default=None)


def _overflow(request: RouteRequest, states: Mapping[str, ArmState], config: RouterConfig) -> Decision:
    primary = config.primary
    assert primary is not None  # the config's validation guarantees it
    ps = _st(states, primary)
    secondaries = config.secondaries
    if not ps.admits:
        best = _fastest(request, [a for a in secondaries if _st(states, a).admits], states)
        return Route(best.name, "failover") if best is not None else _no_arm(states, config)
    if past_load(primary, ps):
        spill = []
        for a in secondaries:
            st = _st(states, a)
            if st.circuit == "closed" and has_room(a, st):
                ttft = predicted_ttft_s(request, a, st)
                if ttft <= config.ttft_slo_s:
                    spill.append((ttft, a.name))
        if spill:
            ttft, name = min(spill, key=lambda s: s[0])
            return Route(name, "spill", predicted_ttft_s=ttft)
    return Route(primary.name, "primary")


def _ab(request: RouteRequest, states: Mapping[str, ArmState], config: RouterConfig) -> Decision:
    order = rank(request.hash_key, [(a.name, a.weight or 0.0) for a in config.arms])
    weights = {a.name: a.weight or 0.0 for a in config.arms}
    sticky = next(n for n in order if weights[n] > 0)  # validation guarantees a positive weight
    if states.get(sticky, _CLOSED).admits:
        return Route(sticky, "ab")
    for name in order:  # weight-0 arms rank last: failover targets, never A/B picks
        if name != sticky and states.get(name, _CLOSED).admits:
            return Route(name, "failover")
    return _no_arm(states, config)


def _no_arm(states: Mapping[str, ArmState], config: RouterConfig) -> NoArm:
    """Retry-After: until the first open circuit goes half-open (1 s when an arm's trial is merely out)."""
    waits = [_st(states, a).retry_after_s for a in config.arms]
    return NoArm(retry_after=max(1, math.ceil(min(waits, default=1.0))))
