"""The router over real HTTP, in front of two real mlx-ray servers (issue 31), without Ray.

The arms are ``tests/arm_server.py`` processes: the real engine and the real model behind mlx-ray's own
OpenAI app, one playing the cluster's primary (2 sequences at a time, a long queue, like vLLM, which
queues rather than refuse) and one playing the Mac (2 sequences, a short queue). The router runs in this
process under uvicorn; the clients are the official ``openai`` client. SIGSTOP and SIGCONT of the Mac's
process stand in for the Mac sleeping and waking (the process stops answering, its socket still
accepts), SIGKILL of the primary for the primary dying.

The same router deployed by Ray Serve on a two-node cluster, pinned to the head, is
``test_router_cluster.py``.
"""

from __future__ import annotations

import concurrent.futures as cf
import signal
import threading
import time

import httpx
import openai
import pytest

from fixtures_ray import free_ports
from fixtures_router import oai_client, router_health, running_router, start_arm, wait_arm_healthy, wait_until
from mlx_ray.router.hashing import pick
from mlx_ray.router.loads import parse_mlx_ray_report

MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def arms(mlx_f32, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arms")
    p1, p2 = free_ports(2)
    # the primary is the real engine with the tests' fault hooks: a request with WEDGE_TRIGGER as a stop string
    # never gets a first token (until it is cancelled)
    out = {"primary": start_arm("prim", mlx_f32, p1, 2, 64, tmp / "primary.log", "mlx_ray.serve.testing:FaultInjectingEngine"),
           "mac": start_arm("mac", mlx_f32, p2, 2, 4, tmp / "mac.log")}
    try:
        for a in out.values():
            wait_arm_healthy(a)
        yield out
    finally:
        for a in out.values():
            if a.proc.poll() is None:
                a.signal(signal.SIGCONT)
                a.proc.kill()
            a.proc.wait(30)


def router_config(arms, policy: str = "overflow", **kw) -> dict:
    p, m = arms["primary"], arms["mac"]
    return {"public_model": "chat", "policy": policy, "probe_interval_s": 0.5, "probe_timeout_s": 5.0,
            "cooldown_s": 2.0, "ttft_slo_s": 10.0,
            "arms": [{"name": "primary", "role": "primary", "base_url": p.url, "model": p.model, "max_waiting": 0,
                      "load": {"prometheus": p.root + "/metrics"}, **({"weight": 0.8} if policy == "ab" else {})},
                     {"name": "mac", "role": "secondary", "base_url": m.url, "model": m.model, "max_running": 2,
                      "load": {"mlx_ray": m.url + "/load"}, **({"weight": 0.2} if policy == "ab" else {})}],
            **kw}


def test_one_public_name_untouched_answers_and_streams(arms):
    with running_router(router_config(arms)) as (url, _):
        c = oai_client(url)
        assert [m.id for m in c.models.list().data] == ["chat"]
        # what the arm answers, through the router: the same tokens, logprobs and tool-less JSON, renamed only
        kw = dict(messages=MSG, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
        r = c.chat.completions.with_raw_response.create(model="chat", **kw)
        assert (r.headers["x-mlx-ray-arm"], r.headers["x-mlx-ray-route"]) == ("primary", "primary")
        via = r.parse()
        direct = oai_client(arms["primary"].root).chat.completions.create(model="prim", **kw)
        assert via.model == "chat" and direct.model == "prim"
        assert via.choices[0].message.content == direct.choices[0].message.content
        assert via.choices[0].logprobs.model_dump() == direct.choices[0].logprobs.model_dump()
        assert via.usage.completion_tokens == direct.usage.completion_tokens > 0
        # a stream passes through chunk by chunk, every chunk under the public name, ending with usage
        with c.chat.completions.with_streaming_response.create(
                model="chat", messages=MSG, max_tokens=12, temperature=0, stream=True,
                stream_options={"include_usage": True}) as resp:
            assert resp.headers["x-mlx-ray-arm"] == "primary"
            chunks = list(resp.parse())
        assert len(chunks) > 2 and {ch.model for ch in chunks} == {"chat"}
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            direct.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == direct.usage.completion_tokens
        # completions too
        comp = c.completions.with_raw_response.create(model="chat", prompt="The capital of France is", max_tokens=4)
        assert comp.parse().model == "chat" and comp.headers["x-mlx-ray-route"] == "primary"
        # an unknown model is 404 naming it; the arm's own 400s pass through as they are
        with pytest.raises(openai.NotFoundError, match="'gpt-4o' is not served here"):
            c.chat.completions.create(model="gpt-4o", messages=MSG)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="chat", messages=MSG, max_tokens=100_000)
        assert e.value.response.headers["x-mlx-ray-arm"] == "primary"
        # both load sources are read: the primary's vLLM gauges, the Mac's load report with measured rates
        h = router_health(url)
        assert h["status"] == "ok" and h["arms"]["primary"]["load"]["source"] == "prometheus", h
        assert h["arms"]["mac"]["load"]["source"] == "mlx_ray" and h["arms"]["mac"]["up"], h


def test_a_client_that_goes_away_cancels_the_arms_request(arms):
    with running_router(router_config(arms)) as (url, ing):
        body = {"model": "chat", "messages": MSG, "max_tokens": 900, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.headers["x-mlx-ray-arm"] == "primary"
            lines = r.iter_lines()
            assert next(ln for ln in lines if ln.startswith("data:"))
            assert _load(arms["primary"])["running"] == 1
        # the client left after its first event: the primary stops generating at once, not 900 tokens later
        wait_until(lambda: _load(arms["primary"])["running"] == 0, 5, "the primary kept generating")
        wait_until(lambda: not ing.router.arms["primary"].attempts, 5, "the router kept the attempt")
        # a client that leaves before any byte came (the primary never starts it): dropped there too, at once
        from mlx_ray.serve.testing import WEDGE_TRIGGER

        body = {**body, "max_tokens": 8, "stop": [WEDGE_TRIGGER]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.5))
        wait_until(lambda: not ing.router.arms["primary"].attempts, 5, "the router kept waiting for nobody")
        assert ing.router.arms["primary"].failures == 0  # the client's leaving is no fault of the arm


def test_no_first_token_in_time_is_retried_once_on_the_other_arm(arms):
    """The primary admits the stream but never sends a first token (a wedged step): after first_token_timeout_s
    the router cancels it there and the Mac answers; the client sees one clean stream."""
    from mlx_ray.serve.testing import WEDGE_TRIGGER

    with running_router(router_config(arms, first_token_timeout_s=3.0)) as (url, ing):
        t0 = time.monotonic()
        with oai_client(url).chat.completions.with_streaming_response.create(
                model="chat", messages=MSG, max_tokens=8, stream=True, stop=[WEDGE_TRIGGER]) as resp:
            assert (resp.headers["x-mlx-ray-arm"], resp.headers["x-mlx-ray-route"]) == ("mac", "failover")
            text = "".join(ch.choices[0].delta.content or "" for ch in resp.parse() if ch.choices)
        assert text and 3.0 <= time.monotonic() - t0 < 30
        assert ing.router.arms["primary"].failures == 1 and ing.router.arms["primary"].breaker.state == "closed"


def _load(arm) -> dict:
    return httpx.get(arm.url + "/load", timeout=10).json()


def _burst(url: str, prompts: list[str], max_tokens: int = 24, stream: bool = False) -> list[tuple[str, str]]:
    """All prompts at once; [(route, arm)] in order. Any failure fails the test."""
    c = oai_client(url)

    def one(p):
        r = c.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": p}],
                                                        max_tokens=max_tokens)
        assert r.parse().choices[0].message.content is not None
        return r.headers["x-mlx-ray-route"], r.headers["x-mlx-ray-arm"]

    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        return list(ex.map(one, prompts))


def test_overflow_spills_short_prompts_within_the_slo_and_never_a_long_one(arms):
    # The SLO from the Mac's own measured prefill rate: 250 prompt tokens' worth. A short prompt (plus the
    # few queued ahead of it) fits; a 900-token prompt is 3.6 times over and must wait for the primary.
    for i in range(2):  # the Mac measures its rates on real requests (the warm-up's are not kept)
        oai_client(arms["mac"].root).chat.completions.create(model="mac", messages=MSG, max_tokens=4)
    report = parse_mlx_ray_report(httpx.get(arms["mac"].url + "/load", timeout=10).json())
    rate = report.prefill_tokens_per_s
    assert rate, f"the Mac's load report has no measured prefill rate yet: {report}"
    cfg = router_config(arms, ttft_slo_s=250 / rate)
    with running_router(cfg) as (url, ing):
        wait_until(lambda: router_health(url)["arms"]["mac"]["load"], 10, "the Mac's load was not read")
        # 3x the primary's capacity (2 sequences) at once: some spill, none fails
        routes = _burst(url, [f"Count from 1 to {i + 5}." for i in range(6)])
        assert all(r in ("primary", "spill") for r, _ in routes), routes
        assert sum(r == "spill" for r, _ in routes) >= 1, routes
        assert all(a == "mac" for r, a in routes if r == "spill"), routes
        # while the primary is busy, a long prompt still goes to the primary; short ones beside it spill
        long = "Summarize this text. " + "The quick brown fox jumps over the lazy dog. " * 80  # ~900 tokens
        assert ing.router.route_request({"messages": [{"role": "user", "content": long}]}, {}).prompt_tokens > 850
        routes = _burst(url, [long] + [f"Say {i} in French." for i in range(5)], max_tokens=16)
        assert routes[0] == ("primary", "primary"), routes
        assert any(r == "spill" for r, _ in routes[1:]), routes
        assert ing.router.arms["primary"].failures == 0 and ing.router.arms["mac"].failures == 0


def test_ab_split_is_sticky_by_user_and_moves_only_who_must(arms):
    """Every user lands where the weighted rendezvous hash puts it (``hashing.pick``, the same on every router
    replica, no shared state), stays there, and a weight change moves only users towards the arm that gained.
    The split's share over many users is the hash's property: checked on 20,000 users below, on the same
    function the router was just shown to follow."""
    users = [f"user-{i}" for i in range(150)]

    def arm_of(url: str, us: list[str]) -> dict[str, str]:
        c = oai_client(url)

        def one(u):
            r = c.completions.with_raw_response.create(model="chat", prompt="Hi", max_tokens=1, user=u)
            assert r.headers["x-mlx-ray-route"] == "ab"
            return u, r.headers["x-mlx-ray-arm"]

        # 4 at once: even all on the Mac arm fit its 2 rows + 4 queued, so no 429 turns an A/B pick into a failover
        # (with 8, a run of Mac users under CI's contention overflowed its queue: route "failover", not "ab")
        with cf.ThreadPoolExecutor(4) as ex:
            return dict(ex.map(one, us))

    split = [("primary", 0.8), ("mac", 0.2)]
    with running_router(router_config(arms, policy="ab")) as (url, _):
        first = arm_of(url, users)
        again = arm_of(url, users[::5])
    assert first == {u: pick(u, split) for u in users}
    assert all(first[u] == a for u, a in again.items())  # 100% sticky
    assert 0.1 < sum(a == "mac" for a in first.values()) / len(users) < 0.3
    many = [f"user-{i}" for i in range(20_000)]
    assert abs(sum(pick(u, split) == "mac" for u in many) / len(many) - 0.2) <= 0.03
    # 0.2 -> 0.3: users move only from the primary to the Mac, about a tenth of them
    cfg = router_config(arms, policy="ab")
    cfg["arms"][0]["weight"], cfg["arms"][1]["weight"] = 0.7, 0.3
    with running_router(cfg) as (url, _):
        after = arm_of(url, users)
    moved = [u for u in users if after[u] != first[u]]
    assert all(first[u] == "primary" and after[u] == "mac" for u in moved)
    assert 0.05 <= len(moved) / len(users) <= 0.15, len(moved)


def test_an_arm_that_does_not_answer_is_reported_down_and_skipped(arms):
    cfg = router_config(arms)
    (dead,) = free_ports(1)
    cfg["arms"][1].update(base_url=f"http://127.0.0.1:{dead}/v1", load={"mlx_ray": f"http://127.0.0.1:{dead}/v1/load"})
    with running_router(cfg) as (url, _):
        h = router_health(url)
        assert h["status"] == "ok" and not h["arms"]["mac"]["up"] and h["arms"]["mac"]["circuit"] != "closed", h
        assert "Cannot connect" in h["arms"]["mac"]["probe_error"], h
        routes = _burst(url, [f"Count to {i + 3}." for i in range(5)], max_tokens=8)
        assert {a for _, a in routes} == {"primary"}, routes


def test_the_mac_sleeps_under_load_and_is_used_again_when_it_wakes(arms):
    """SIGSTOP of the Mac's process under a steady mixed load: no non-streaming request fails, no stream that
    had not started fails, running streams end with an error event (never a hang), the circuit opens within
    a probe interval and its timeout; after SIGCONT the Mac serves again, without a restart."""
    cfg = router_config(arms, policy="ab", probe_interval_s=1.0, probe_timeout_s=2.0, cooldown_s=2.0)
    cfg["arms"][0]["weight"], cfg["arms"][1]["weight"] = 0.5, 0.5
    mac = arms["mac"]
    results: list[dict] = []
    stop = threading.Event()

    def worker(k: int) -> None:
        c = oai_client(url)
        i = 0
        while not stop.is_set():
            i += 1
            user, stream = f"w{k}-{i}", (i + k) % 2 == 0
            rec = {"user": user, "stream": stream, "t0": time.monotonic(), "chunks": 0, "error": None, "arm": None}
            try:
                if stream:
                    with c.chat.completions.with_streaming_response.create(
                            model="chat", messages=MSG, max_tokens=48, stream=True, user=user) as resp:
                        rec["arm"] = resp.headers["x-mlx-ray-arm"]
                        for _ in resp.parse():
                            rec["chunks"] += 1
                else:
                    r = c.chat.completions.with_raw_response.create(model="chat", messages=MSG, max_tokens=24, user=user)
                    rec["arm"] = r.headers["x-mlx-ray-arm"]
            except openai.APIError as e:
                rec["error"] = f"{type(e).__name__}: {e}"
            rec["t1"] = time.monotonic()
            results.append(rec)

    with running_router(cfg) as (url, ing):
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: any(r["arm"] == "mac" for r in results), 60, "no request reached the Mac")
            wait_until(lambda: ing.router.arms["mac"].attempts, 30, "nothing in flight on the Mac", step=0.01)
            mac.signal(signal.SIGSTOP)
            t_stop = time.monotonic()
            opened = wait_until(lambda: router_health(url)["arms"]["mac"]["circuit"] != "closed" and time.monotonic(), 15,
                              "the Mac's circuit did not open")
            time.sleep(4)
            mac.signal(signal.SIGCONT)
            t_cont = time.monotonic()
            wait_until(lambda: any(r["arm"] == "mac" and r["t0"] > t_cont and not r["error"] for r in results), 30,
                     "the Mac was not used again after it woke")
        finally:
            mac.signal(signal.SIGCONT)
            stop.set()
            for t in threads:
                t.join(120)
    assert opened - t_stop <= cfg["probe_interval_s"] + cfg["probe_timeout_s"] + 1.0, opened - t_stop
    failed = [r for r in results if r["error"]]
    # only streams that had already started may fail, and they end (with the error event) rather than hang
    assert all(r["stream"] and r["chunks"] > 0 and r["arm"] == "mac" for r in failed), failed
    assert all(r["t1"] - t_stop <= cfg["probe_interval_s"] + cfg["probe_timeout_s"] + 2.0 for r in failed), failed
    assert any(r["t0"] < t_stop < r["t1"] and not r["error"] and r["arm"] == "primary" for r in results)
    assert len([r for r in results if not r["error"]]) >= 10


def test_when_the_primary_dies_everything_goes_to_the_mac_at_once(arms):
    """Runs last in this module: it kills the primary."""
    cfg = router_config(arms, cooldown_s=30.0)
    with running_router(cfg) as (url, ing):
        c = oai_client(url)
        assert c.chat.completions.with_raw_response.create(model="chat", messages=MSG, max_tokens=4) \
                .headers["x-mlx-ray-arm"] == "primary"
        arms["primary"].proc.kill()
        arms["primary"].proc.wait(30)
        wait_until(lambda: router_health(url)["arms"]["primary"]["circuit"] == "open", 10, "the primary's circuit did not open")
        failures = ing.router.arms["primary"].failures
        for _ in range(4):
            r = c.chat.completions.with_raw_response.create(model="chat", messages=MSG, max_tokens=4)
            assert (r.headers["x-mlx-ray-arm"], r.headers["x-mlx-ray-route"]) == ("mac", "failover")
            assert r.parse().model == "chat"
        # with its circuit open, no request tried the dead primary first
        assert ing.router.arms["primary"].failures == failures


def test_an_arm_may_name_an_adapter_of_its_model(arms, mlx_f32):
    """The A/B of a fine-tune against the primary (issue 32): the Mac's arm names ``<model>:<adapter>``, which
    its multi-LoRA engine loads from the cache on first use. The router sends that name, the user sees the
    public one, and the tokens are the adapter's own."""
    import shutil

    from mlx_ray import adapters as layout
    from mlx_ray.bench.adapters import write_random_adapter

    write_random_adapter(mlx_f32, "ft", rank=8, scale=20.0, num_layers=16, seed=1)
    try:
        cfg = router_config(arms, policy="ab")
        cfg["arms"][0]["weight"], cfg["arms"][1]["weight"] = 0.0, 1.0  # every user on the fine-tune
        cfg["arms"][1]["model"] = "mac:ft"
        kw = dict(messages=MSG, max_tokens=12, temperature=0)
        with running_router(cfg) as (url, _):
            r = oai_client(url).chat.completions.with_raw_response.create(model="chat", user="u-1", **kw)
        assert r.headers["x-mlx-ray-arm"] == "mac"
        via = r.parse()
        direct = oai_client(arms["mac"].root).chat.completions.create(model="mac:ft", **kw)
        base = oai_client(arms["mac"].root).chat.completions.create(model="mac", **kw)
        assert via.model == "chat" and direct.model == "mac:ft"
        assert via.choices[0].message.content == direct.choices[0].message.content
        assert direct.choices[0].message.content != base.choices[0].message.content  # the adapter answered
    finally:
        shutil.rmtree(layout.adapters_root(mlx_f32), ignore_errors=True)
