"""The router's pure-Python layer (mlx_ray/router): config, rendezvous hashing, breaker, loads, policy.

No Ray, no HTTP, no model: each test runs in milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_ray.errors import BadRequest
from mlx_ray.router import hashing
from mlx_ray.router.breaker import Breaker
from mlx_ray.router.config import RouterConfig, load_config
from mlx_ray.router.loads import ArmLoad, InFlight, effective_load, parse_mlx_ray_report, parse_prometheus
from mlx_ray.router.policy import ArmState, NoArm, Route, arm_state, decide, predicted_ttft_s, retry_target
from mlx_ray.router.request import RouteRequest, estimate_prompt_tokens, route_request

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------

def overflow_cfg(**top) -> RouterConfig:
    arms = [
        {"name": "vllm", "role": "primary", "base_url": "http://vllm:8000/v1", "model": "llama-70b",
         "load": {"prometheus": "http://vllm:8000/metrics"}, "max_waiting": 0},
        {"name": "mac", "role": "secondary", "base_url": "http://mac:8000/v1", "model": "qwen-32b",
         "prefill_tokens_per_s": 100},
    ]
    return RouterConfig.validate_dict({"public_model": "chat", "policy": "overflow", "ttft_slo_s": 10, "arms": arms, **top})


def ab_cfg(w_secondary=0.2, w_primary=0.8) -> RouterConfig:
    return RouterConfig.validate_dict({"public_model": "chat", "policy": "ab", "arms": [
        {"name": "vllm", "role": "primary", "base_url": "http://vllm:8000/v1", "model": "a", "weight": w_primary},
        {"name": "mac", "role": "secondary", "base_url": "http://mac:8000/v1", "model": "b", "weight": w_secondary},
    ]})


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


BUSY = ArmState(load=ArmLoad(waiting=5, running=8, source="prometheus"))
IDLE = ArmState(load=ArmLoad(waiting=0, running=2, source="prometheus"))
OPEN = ArmState(circuit="open", admits=False, retry_after_s=3.2)


# -- config --------------------------------------------------------------------------------

def test_config_valid_and_defaults():
    cfg = overflow_cfg()
    assert cfg.primary.name == "vllm" and [a.name for a in cfg.secondaries] == ["mac"]
    assert cfg.probe_interval_s == 2 and cfg.sticky_header is None and cfg.failure_threshold >= 1
    assert cfg.arm("vllm").load.kind == "prometheus"


@pytest.mark.parametrize("change, words", [
    (lambda d: d["arms"][0].update(role="secondary"), "needs one arm with role: primary"),
    (lambda d: d["arms"][1].update(role="primary"), "takes one primary"),
    (lambda d: d["arms"][1].update(name="vllm"), "unique, repeated: vllm"),
    (lambda d: d["arms"][1].update(base_url="mac:8000"), "http:// or https://"),
    (lambda d: d["arms"][1].pop("base_url"), "base_url: Field required"),
    (lambda d: d["arms"][0].pop("max_waiting"), "neither max_waiting nor max_running"),
    (lambda d: d["arms"][0].pop("load"), "set max_running"),
    (lambda d: d["arms"][0].update(load={"prometheus": "http://x/metrics", "mlx_ray": "http://y/load"}), "exactly one of prometheus"),
    (lambda d: d.update(policy="roundrobin"), "policy"),
    (lambda d: d.update(extra_field=1), "extra_field"),
])
def test_config_errors_are_one_line(change, words):
    d = overflow_cfg().model_dump(exclude_none=True)
    change(d)
    with pytest.raises(BadRequest) as e:
        RouterConfig.validate_dict(d)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg


@pytest.mark.parametrize("weights, words", [
    ((0, 0), "sum to 0"),
    ((-0.2, 0.8), "greater than or equal to 0"),
    ((None, 0.8), "give every arm a weight"),
])
def test_ab_weight_errors(weights, words):
    d = ab_cfg().model_dump(exclude_none=True)
    for arm, w in zip(d["arms"][::-1], weights):
        arm.pop("weight")
        if w is not None:
            arm["weight"] = w
    with pytest.raises(BadRequest) as e:
        RouterConfig.validate_dict(d)
    assert words in str(e.value) and "\n" not in str(e.value)
    if weights[0] == -0.2:
        assert "arms[mac].weight" in str(e.value)  # the arm named, not its index


def test_ab_two_primaries_allowed_and_adapter_model():
    d = ab_cfg().model_dump(exclude_none=True)
    d["arms"][1]["role"] = "primary"
    d["arms"][1]["model"] = "qwen-32b:my-lora"
    assert RouterConfig.validate_dict(d).arm("mac").model == "qwen-32b:my-lora"


def test_load_config_yaml_json_and_errors(tmp_path):
    y = tmp_path / "router.yaml"
    y.write_text("public_model: chat\npolicy: ab\narms:\n"
                 "  - {name: a, role: primary, base_url: 'http://a/v1', model: m, weight: 1}\n"
                 "  - {name: b, role: secondary, base_url: 'http://b:8000/mac/v1/', model: m, weight: 0,\n"
                 "     load: {mlx_ray: 'http://b/load'}}\n")
    cfg = load_config(y)
    assert cfg.arm("b").base_url == "http://b:8000/mac/v1" and cfg.arm("b").load.url == "http://b/load"
    j = tmp_path / "router.json"
    j.write_text(json.dumps({"public_model": "chat", "policy": "overflow", "arms": [
        {"name": "a", "role": "secondary", "base_url": "http://a/v1", "model": "m"}]}))
    with pytest.raises(BadRequest, match="needs one arm with role: primary"):
        load_config(j)
    with pytest.raises(BadRequest, match="config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("arms: [\n")
    with pytest.raises(BadRequest, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_router_package_is_pure_python():
    """Importable on a stock head: no MLX, no Ray, no engine."""
    code = ("import sys, mlx_ray.router.policy, mlx_ray.router.config;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('mlx','mlx_lm','ray','numpy') or m.startswith('mlx_ray.engine')];"
            "print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)


# -- rendezvous hashing --------------------------------------------------------------------

KEYS = [f"user-{i}" for i in range(20_000)]


def test_hash_share_matches_weights():
    picks = [hashing.pick(k, [("vllm", 0.8), ("mac", 0.2)]) for k in KEYS]
    share = picks.count("mac") / len(KEYS)
    assert abs(share - 0.2) <= 0.01, share


def test_hash_is_sticky_and_order_free():
    for k in KEYS[:500]:
        a = hashing.pick(k, [("vllm", 0.8), ("mac", 0.2)])
        assert a == hashing.pick(k, [("mac", 0.2), ("vllm", 0.8)]) == hashing.pick(k, [("vllm", 0.8), ("mac", 0.2)])
    # a stable hash, not Python's salted hash(): a fixed value
    assert hashing.unit("user-1", "mac") == hashing.unit("user-1", "mac")
    out = subprocess.run([sys.executable, "-c", "from mlx_ray.router.hashing import unit; print(repr(unit('user-1', 'mac')))"],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert float(out.stdout) == hashing.unit("user-1", "mac")


def test_weight_change_moves_only_keys_that_must():
    before = {k: hashing.pick(k, [("vllm", 0.8), ("mac", 0.2)]) for k in KEYS}
    after = {k: hashing.pick(k, [("vllm", 0.7), ("mac", 0.3)]) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == "vllm" and after[k] == "mac" for k in moved)  # none leaves the arm that gained
    assert abs(len(moved) / len(KEYS) - 0.10) <= 0.01


def test_zero_weight_never_picked_but_ranked_last():
    assert all(hashing.pick(k, [("a", 1.0), ("b", 0.0)]) == "a" for k in KEYS[:200])
    assert hashing.rank("u", [("b", 0.0), ("a", 1.0)]) == ["a", "b"]
    with pytest.raises(ValueError):
        hashing.pick("u", [("a", 0.0)])


# -- breaker ------------------------------------------------------------------------------

def test_breaker_opens_after_threshold_then_half_open_then_closes():
    clock = FakeClock()
    b = Breaker(failure_threshold=3, cooldown_s=5, clock=clock)
    b.record_failure(); b.record_failure()
    assert b.state == "closed" and b.admits()
    b.record_success()  # resets: failures must be consecutive
    b.record_failure(); b.record_failure(); b.record_failure()
    assert b.state == "open" and not b.admits() and not b.try_acquire()
    assert b.retry_after() == pytest.approx(5)
    clock.t += 4.9
    assert b.state == "open"
    clock.t += 0.1
    assert b.state == "half_open" and b.admits()
    assert b.try_acquire() and not b.try_acquire()  # one trial only
    assert not b.admits()
    b.record_success()
    assert b.state == "closed" and b.try_acquire() and b.try_acquire()


def test_breaker_half_open_failure_reopens_and_release_frees_trial():
    clock = FakeClock()
    b = Breaker(failure_threshold=1, cooldown_s=5, clock=clock)
    b.record_failure()
    clock.t += 5
    assert b.try_acquire()
    b.release()  # the client left: no verdict
    assert b.state == "half_open" and b.try_acquire()
    b.record_failure()
    assert b.state == "open" and b.opened_count == 2 and b.retry_after() == pytest.approx(5)


def test_breaker_probes():
    clock = FakeClock()
    b = Breaker(failure_threshold=3, cooldown_s=5, clock=clock)
    b.record_probe(True)
    assert b.state == "closed"
    b.record_probe(False)  # one failed probe opens a closed circuit at once
    assert b.state == "open"
    b.record_probe(True)  # ignored while cooling down
    assert b.state == "open"
    clock.t += 5
    assert b.try_acquire()  # the probe claims the trial
    assert not b.admits()  # so no request is the trial too
    b.record_probe(False)
    assert b.state == "open"
    clock.t += 5
    assert b.try_acquire()
    b.record_probe(True)
    assert b.state == "closed"


# -- loads --------------------------------------------------------------------------------

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 7.0
vllm:num_requests_running{engine="1",model_name="llama"} 5.0
vllm:num_requests_running{engine="0",model_name="other"} 100.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 3.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 1.0
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{model_name="llama"} 12345.0
"""

RAY_METRICS = """\
# TYPE ray_vllm_num_requests_running gauge
ray_vllm_num_requests_running{model_name="llama",ReplicaId="a"} 2.0
ray_vllm_num_requests_running{model_name="llama",ReplicaId="b"} 4.0
# TYPE ray_vllm_num_requests_waiting gauge
ray_vllm_num_requests_waiting{model_name="llama",ReplicaId="a"} 9.0
"""


def test_prometheus_vllm_gauges_summed_and_filtered():
    assert parse_prometheus(VLLM_METRICS, model_name="llama") == ArmLoad(waiting=4, running=12, source="prometheus")
    assert parse_prometheus(VLLM_METRICS).running == 112
    assert parse_prometheus(RAY_METRICS) == ArmLoad(waiting=9, running=6, source="prometheus")


def test_prometheus_errors_are_one_line():
    with pytest.raises(ValueError, match="model_name='nope' .seen: llama, other"):
        parse_prometheus(VLLM_METRICS, model_name="nope")
    with pytest.raises(ValueError, match="no vLLM gauge"):
        parse_prometheus("# TYPE up gauge\nup 1\n")


def test_mlx_ray_report_and_in_flight():
    load = parse_mlx_ray_report({"waiting": 2, "running": 3, "kv_blocks_free": 40, "prefill_tokens_per_s": 250.0,
                                 "decode_tokens_per_s": 0})
    assert load == ArmLoad(2, 3, 40, 250.0, None, "mlx_ray")
    with pytest.raises(ValueError):
        parse_mlx_ray_report({"running": 1})
    f = InFlight()
    f.start("mac", 1000); f.start("mac", 500)
    assert f.requests("mac") == 2 and f.queued_tokens("mac") == 1500
    f.first_token("mac", 1000)
    f.finish("mac")
    f.finish("mac", prompt_tokens=500)  # failed before its first token
    assert f.requests("mac") == 0 and f.queued_tokens("mac") == 0


def test_effective_load():
    assert effective_load(None, 5, max_running=3) == ArmLoad(waiting=2, running=3, source="in_flight")
    assert effective_load(None, 5) == ArmLoad(waiting=0, running=5, source="in_flight")
    scraped = ArmLoad(waiting=1, running=2, source="prometheus")
    assert effective_load(scraped, 2) == scraped
    assert effective_load(scraped, 6).waiting == 4  # sent since the scrape


# -- policy: overflow ---------------------------------------------------------------------

def req(tokens=100, key=None, rid="r1"):
    return RouteRequest(prompt_tokens=tokens, sticky_key=key, request_id=rid)


def test_overflow_primary_when_not_busy():
    assert decide(req(), {"vllm": IDLE, "mac": ArmState()}, overflow_cfg()) == Route("vllm", "primary")


def test_overflow_spills_when_primary_busy_and_slo_holds():
    r = decide(req(500), {"vllm": BUSY, "mac": ArmState()}, overflow_cfg())
    assert r.arm == "mac" and r.reason == "spill" and r.predicted_ttft_s == pytest.approx(5.0)


def test_long_prompt_that_would_break_the_slo_never_spills():
    cfg = overflow_cfg()  # 100 tok/s, SLO 10 s
    assert decide(req(1001), {"vllm": BUSY, "mac": ArmState()}, cfg) == Route("vllm", "primary")
    assert decide(req(1000), {"vllm": BUSY, "mac": ArmState()}, cfg).reason == "spill"


def test_queue_ahead_counts_in_the_prediction():
    mac = ArmState(queued_prompt_tokens=800)
    assert predicted_ttft_s(req(300), overflow_cfg().arm("mac"), mac) == pytest.approx(11.0)
    assert decide(req(300), {"vllm": BUSY, "mac": mac}, overflow_cfg()) == Route("vllm", "primary")


def test_measured_prefill_rate_wins_over_the_configured_one():
    mac = ArmState(load=ArmLoad(0, 0, prefill_tokens_per_s=1000.0, source="mlx_ray"))
    assert decide(req(5000), {"vllm": BUSY, "mac": mac}, overflow_cfg()).reason == "spill"


def test_no_spill_to_unhealthy_or_full_secondary():
    cfg = overflow_cfg()
    half = ArmState(circuit="half_open", admits=True)
    assert decide(req(), {"vllm": BUSY, "mac": half}, cfg) == Route("vllm", "primary")
    assert decide(req(), {"vllm": BUSY, "mac": OPEN}, cfg) == Route("vllm", "primary")
    no_kv = ArmState(load=ArmLoad(0, 1, free_kv_blocks=0, source="mlx_ray"))
    assert decide(req(), {"vllm": BUSY, "mac": no_kv}, cfg) == Route("vllm", "primary")
    d = cfg.model_dump(exclude_none=True)
    d["arms"][1]["max_running"] = 2
    full = ArmState(in_flight=2)
    assert decide(req(), {"vllm": BUSY, "mac": full}, RouterConfig.validate_dict(d)) == Route("vllm", "primary")


def test_primary_without_load_source_uses_in_flight():
    d = overflow_cfg().model_dump(exclude_none=True)
    d["arms"][0].pop("load"); d["arms"][0].pop("max_waiting"); d["arms"][0]["max_running"] = 4
    cfg = RouterConfig.validate_dict(d)
    assert decide(req(), {"vllm": ArmState(in_flight=3)}, cfg).reason == "primary"
    assert decide(req(), {"vllm": ArmState(in_flight=4)}, cfg).reason == "spill"


def test_primary_circuit_open_fails_over_first():
    """With the primary's circuit open a request does not go to it first, whatever its prompt."""
    cfg = overflow_cfg()
    assert decide(req(50_000), {"vllm": OPEN, "mac": ArmState()}, cfg) == Route("mac", "failover")
    trial_out = ArmState(circuit="half_open", admits=False)
    assert decide(req(), {"vllm": trial_out, "mac": ArmState()}, cfg) == Route("mac", "failover")


def test_every_circuit_open_is_no_arm_with_retry_after():
    cfg = overflow_cfg()
    assert decide(req(), {"vllm": OPEN, "mac": ArmState(circuit="open", admits=False, retry_after_s=1.5)}, cfg) == NoArm(2)
    assert decide(req(), {"vllm": ArmState(circuit="half_open", admits=False), "mac": OPEN}, cfg) == NoArm(1)


def test_retry_target_overflow():
    cfg = overflow_cfg()
    both = {"vllm": IDLE, "mac": ArmState()}
    assert retry_target(Route("vllm", "primary"), req(50_000), both, cfg) == Route("mac", "failover", retried=True)
    assert retry_target(Route("mac", "spill"), req(), both, cfg) == Route("vllm", "failover", retried=True)
    assert retry_target(Route("mac", "failover", retried=True), req(), both, cfg) is None  # only one retry
    assert retry_target(Route("vllm", "primary"), req(), {"vllm": IDLE, "mac": OPEN}, cfg) is None


def test_arm_state_from_breaker():
    clock = FakeClock()
    b = Breaker(failure_threshold=1, cooldown_s=5, clock=clock)
    b.record_failure()
    s = arm_state(b, in_flight=2)
    assert (s.circuit, s.admits, s.retry_after_s, s.in_flight) == ("open", False, 5.0, 2)


# -- policy: A/B ---------------------------------------------------------------------------

def test_ab_sticky_and_share():
    cfg = ab_cfg()
    routes = [decide(req(key=f"user-{i}"), {}, cfg) for i in range(5000)]
    assert {r.reason for r in routes} == {"ab"}
    share = sum(r.arm == "mac" for r in routes) / len(routes)
    assert abs(share - 0.2) <= 0.02
    assert all(decide(req(key=f"user-{i}", rid="other"), {}, cfg) == routes[i] for i in range(200))


def test_ab_failover_when_sticky_arm_open():
    cfg = ab_cfg()
    user = next(f"u{i}" for i in range(1000) if decide(req(key=f"u{i}"), {}, cfg).arm == "mac")
    assert decide(req(key=user), {"mac": OPEN}, cfg) == Route("vllm", "failover")
    assert decide(req(key=user), {"mac": OPEN, "vllm": OPEN}, cfg) == NoArm(4)
    assert retry_target(Route("mac", "ab"), req(key=user), {}, cfg) == Route("vllm", "failover", retried=True)


def test_ab_zero_weight_arm_is_only_a_failover_target():
    cfg = ab_cfg(w_secondary=0.0, w_primary=1.0)
    assert all(decide(req(key=f"u{i}"), {}, cfg).arm == "vllm" for i in range(300))
    assert decide(req(key="u1"), {"vllm": OPEN}, cfg) == Route("mac", "failover")


def test_anonymous_requests_split_by_request_id():
    cfg = ab_cfg(0.5, 0.5)
    arms = {decide(req(rid=f"req-{i}"), {}, cfg).arm for i in range(50)}
    assert arms == {"vllm", "mac"}


# -- request -------------------------------------------------------------------------------

def test_request_estimate_and_sticky_key():
    body = {"messages": [{"role": "user", "content": "x" * 400},
                         {"role": "user", "content": [{"type": "text", "text": "y" * 40}, {"type": "image_url"}]}],
            "user": "alice"}
    assert estimate_prompt_tokens(body) == 4 + 100 + 4 + 10
    assert estimate_prompt_tokens({"prompt": "你好世界"}) == 4
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}) == 3
    assert route_request(body, {}, None, "r").sticky_key == "alice"
    assert route_request(body, {"X-User": "bob"}, "x-user", "r").sticky_key == "bob"
    assert route_request({"messages": []}, {}, "x-user", "r").hash_key == "r"


def test_a_reported_load_moves_with_the_routers_own_requests_since_the_report():
    from mlx_ray.router.loads import shifted

    load = ArmLoad(waiting=1, running=2, source="mlx_ray")
    assert (shifted(load, 2).waiting, shifted(load, 2).running) == (3, 2)  # sent since: they queue
    assert (shifted(load, -1).waiting, shifted(load, -1).running) == (0, 2)  # a slot freed: the queued one runs
    assert (shifted(load, -3).waiting, shifted(load, -3).running) == (0, 0)
    assert (shifted(load, -9).waiting, shifted(load, -9).running) == (0, 0)
    assert shifted(load, 0) is load


def test_a_burst_between_two_load_reports_never_overfills_a_secondary():
    """The Mac reported itself idle; the router then sends requests one after the other before the next report:
    only max_running of them spill, the rest wait for the primary (CI once saw 4 spill onto 2 slots)."""
    from mlx_ray.router.loads import shifted

    d = overflow_cfg().model_dump(exclude_none=True)
    d["arms"][1]["max_running"] = 2
    cfg = RouterConfig.validate_dict(d)
    idle = ArmLoad(waiting=0, running=0, free_kv_blocks=100, prefill_tokens_per_s=1000.0, source="mlx_ray")
    busy_primary = ArmState(load=ArmLoad(waiting=5, running=2, source="prometheus"))
    spilled = 0
    for _ in range(6):
        mac = ArmState(load=shifted(idle, spilled), in_flight=spilled)
        d = decide(RouteRequest(prompt_tokens=20), {"vllm": busy_primary, "mac": mac}, cfg)
        spilled += d.reason == "spill"
    assert spilled == cfg.arm("mac").max_running
