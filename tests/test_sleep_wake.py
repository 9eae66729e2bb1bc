"""Sleep and wake (vLLM's /sleep, /wake_up, /is_sleeping) and `mlx-ray finetune --sleep-serving`.

In process, on an engine of its own (the real fixture): under load, every request gets an answer
(finished within the grace, or ended with Unavailable); asleep, new requests get Unavailable with a
Retry-After, health passes, and MLX's own counters show the memory given back; awake again, greedy
answers are the same, and waking took less than twice the cold start.

On the session's served application (real HTTP, the official openai client): the same through
POST /sleep and POST /wake_up, with 503 + Retry-After for requests while asleep, a 503 load report
(the router's probe fails over) and a 200 health (Serve keeps the replica). Then `finetune`'s side:
the refusal names the served model holding the memory, and --sleep-serving wakes the replicas when
the job fails.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from fixtures_engine import make_request, run_async, start_engine

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


async def _answer(engine, rid, ids, **sampling):
    """(token ids, finish event) of one request; an admission error is returned as the finish's error."""
    from mlx_ray.engine.protocol import FinishEvent, TokenEvent
    from mlx_ray.errors import MlxRayError

    got = []
    try:
        async for ev in engine.generate(make_request(rid, ids, **sampling)):
            if isinstance(ev, TokenEvent):
                got += ev.token_ids
            elif isinstance(ev, FinishEvent):
                return got, ev
    except MlxRayError as e:
        return got, FinishEvent("error", len(ids), 0, error=e)
    raise AssertionError(f"{rid}: the stream ended without a FinishEvent")


def test_engine_sleeps_under_load_releases_memory_and_wakes_identical(mlx_f32):
    import mlx.core as mx

    from mlx_ray.engine.memory import mlx_memory
    from mlx_ray.errors import Unavailable

    import gc

    gc.collect()  # what earlier tests' engines left for the collector goes first, or it is freed mid-test
    mx.clear_cache()
    baseline = mlx_memory()
    engine = start_engine(mlx_f32, max_num_seqs=4, max_queue=4, kv_budget_bytes=96 << 20,
                          prefix_cache_bytes=16 << 20, max_model_len=512, sleep_retry_after_s=7)
    try:
        ids = engine.encode_chat(QUESTION)

        async def scenario():
            before = [(await _answer(engine, f"ref-{i}", ids, max_tokens=12))[0] for i in range(2)]
            done = engine.stats()["generation_tokens_total"]
            # under load: two short requests finish within the grace, two long ones cannot
            load = [asyncio.ensure_future(_answer(engine, f"short-{i}", ids, max_tokens=3)) for i in range(2)]
            load += [asyncio.ensure_future(_answer(engine, f"long-{i}", ids, max_tokens=450, ignore_eos=True))
                     for i in range(2)]
            while engine.stats()["generation_tokens_total"] < done + 4:
                await asyncio.sleep(0.01)
            held = mlx_memory() - baseline
            state = await engine.sleep(grace_s=1.0)
            answered = await asyncio.wait_for(asyncio.gather(*load), 10)
            during = await _answer(engine, "asleep", ids, max_tokens=4)
            asleep = (held, state, mlx_memory(), engine.stats(), engine.sleep_state())
            engine.check_health()  # asleep on purpose: healthy
            woke = await engine.wake_up()
            after = [(await _answer(engine, f"again-{i}", ids, max_tokens=12))[0] for i in range(2)]
            return before, answered, during, asleep, woke, after

        before, answered, during, (held, state, mem_asleep, stats, sleeping), woke, after = run_async(scenario())
    finally:
        run_async(engine.shutdown())

    # every request of the load got an answer: finished, or ended by the sleep with a 503's error
    reasons = {}
    for (_, fin), rid in zip(answered, ["short-0", "short-1", "long-0", "long-1"]):
        reasons[rid] = fin.finish_reason if fin.error is None else type(fin.error).__name__
    assert reasons["short-0"] == reasons["short-1"] == "length", reasons
    assert reasons["long-0"] == reasons["long-1"] == "Unavailable", reasons
    assert state["sleeping"] and state["state"] == "asleep" and state["cancelled"] == 2
    # asleep: new requests get Unavailable with the configured Retry-After; health passes; stats say so
    assert isinstance(during[1].error, Unavailable) and during[1].error.retry_after == 7
    assert sleeping["sleeping"] and stats["sleeping"] and stats["running"] == stats["waiting"] == 0
    # MLX's counters: >= 90% of what the engine held is given back
    released = state["memory_before_sleep_bytes"] - mem_asleep
    assert held > 400e6 and released >= 0.9 * held, (held, released, mem_asleep - baseline)
    # awake again: identical greedy answers, and within 2x the cold start
    assert not woke["sleeping"] and after == before
    assert woke["wake_s"] < 2 * woke["cold_start_s"], woke


@pytest.mark.ray
def test_http_sleep_under_load_503_then_wake_identical(served):
    import httpx
    import openai
    from concurrent.futures import ThreadPoolExecutor

    from fixtures_serve import engine_stats, serve_handle

    url, _ = served
    oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def greedy():
        r = oa.chat.completions.create(model="smol", messages=QUESTION, max_tokens=12, temperature=0)
        return r.choices[0].message.content

    def long_stream():
        got, error = "", None
        try:
            for chunk in oa.chat.completions.create(model="smol", messages=QUESTION, max_tokens=400, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True}):
                got += chunk.choices[0].delta.content or "" if chunk.choices else ""
        except openai.APIError as e:
            error = e
        return got, error

    pid = serve_handle("smol").info.remote().result(timeout_s=60)["pid"]
    reference = greedy()
    with ThreadPoolExecutor(2) as pool:
        streams = []
        for n in (1, 2):  # one at a time: the app admits 2 running + 1 waiting, and a burst can see 429
            streams.append(pool.submit(long_stream))
            deadline = time.monotonic() + 60
            while engine_stats("smol")["running"] < n:
                assert time.monotonic() < deadline, engine_stats("smol")
                time.sleep(0.05)
        slept = httpx.post(url + "/sleep", params={"model": "smol", "grace_s": 0.5}, timeout=120)
        assert slept.status_code == 200 and slept.json()["is_sleeping"], slept.text
        try:
            ended = [f.result(timeout=60) for f in streams]
            # each stream got an answer: ended by an error event naming the sleep (no stream just cut)
            assert all(e is not None and "sleep" in str(e) for _, e in ended), ended
            with pytest.raises(openai.APIStatusError) as e:
                greedy()
            assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
            load = httpx.get(url + "/v1/load", params={"model": "smol"}, timeout=30)
            assert load.status_code == 503 and "asleep" in load.text and load.headers["retry-after"]
            assert httpx.get(url + "/health", timeout=30).status_code == 200
            asleep = httpx.get(url + "/is_sleeping", params={"model": "smol"}, timeout=30).json()
            assert asleep["is_sleeping"] and asleep["memory_bytes"] < 0.1 * asleep["memory_before_sleep_bytes"]
        finally:
            woke = httpx.post(url + "/wake_up", params={"model": "smol"}, timeout=300)
    assert woke.status_code == 200 and not woke.json()["is_sleeping"], woke.text
    assert greedy() == reference
    assert serve_handle("smol").info.remote().result(timeout_s=60)["pid"] == pid  # the same replica, never restarted


@pytest.fixture
def tiny_job(mlx_f32, model_cache, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "waterdeep"}]}) + "\n"
                            for _ in range(4)))
    # max_seq_length as short as its rows (about 30 tokens): the memory check sizes activations by it, and at the
    # default 2048 it asked for 6.1 GB, refused when the test pass beside it held the machine's memory (CI)
    return dict(model=str(mlx_f32.relative_to(model_cache)), data=str(data), name="sleepy", iters=2, batch_size=2,
                max_seq_length=64, cache_dir=str(model_cache), resources={"gpu_apple_mps": 0.5},
                storage_path=str(tmp_path / "runs"))


def _huge_estimate(monkeypatch):
    from mlx_ray.train import memory

    real = memory.estimate
    monkeypatch.setattr(memory, "estimate", lambda *a, **kw: real(*a, **kw).__class__(1 << 50, 0, 0, 1 << 50))


@pytest.mark.ray
def test_finetune_refusal_names_the_served_model_and_exits_2(served, tiny_job, monkeypatch, capsys):
    from mlx_ray.cli import main as cli

    _huge_estimate(monkeypatch)
    argv = ["finetune", "--model", tiny_job["model"], "--data", tiny_job["data"], "--name", "sleepy",
            "--cache-dir", tiny_job["cache_dir"], "--resources", json.dumps(tiny_job["resources"])]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "the served model smol (replica on node " in err and "stop them or pass --sleep-serving" in err, err


@pytest.mark.ray
def test_sleep_serving_wakes_the_replicas_when_the_job_fails(served, tiny_job, monkeypatch):
    from fixtures_serve import serve_handle
    from mlx_ray.errors import EngineFault
    from mlx_ray.train import FinetuneConfig, finetune, job

    seen = {}

    def failing_train(cfg, prep, *a, **kw):
        seen.update({m: serve_handle(m).replica_state.remote().result(timeout_s=30) for m in ("smol", "smol-faulty")})
        raise EngineFault("the training job failed: the worker died")

    monkeypatch.setattr(job, "train", failing_train)
    said = []
    with pytest.raises(EngineFault, match="worker died"):
        finetune(FinetuneConfig(**tiny_job, sleep_serving=True), say=said.append)
    assert all(s["sleeping"] for s in seen.values()), seen  # both replicas on the Mac slept for the job
    after = {m: serve_handle(m).replica_state.remote().result(timeout_s=30) for m in ("smol", "smol-faulty")}
    assert not any(s["sleeping"] for s in after.values()), after  # and woke although it failed
    assert any("put smol " in line for line in said) and any("woke smol " in line for line in said), said


def test_refusal_line_names_the_served_replicas(mlx_f32):
    from mlx_ray.train.memory import estimate, shortfall
    from mlx_ray.train.serving import Replica

    est = estimate(mlx_f32, rank=8, num_layers=16, batch_size=4, max_seq_length=2048, grad_checkpoint=False)
    node = {"host": "waterdeep", "working_set": 36 << 30, "available": 2 << 30, "holders": []}
    qwen = Replica("mlx-ray", "LLMServer:qwen", "qwen", "r1", "ab" * 28, 4242, int(30.5e9), False)
    why = shortfall(est, node, [qwen, Replica("mlx-ray", "x", "other", "r2", "cd" * 28, 1, 1, True)])
    assert "\n" not in why and why.endswith(
        "the served model qwen (replica on node abababababab) holds 30.5 GB; stop it or pass --sleep-serving")
