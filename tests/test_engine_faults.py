"""Admission control, deadlines, failure isolation and the health probe, on the real float32 fixture."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fixtures_engine import collect, make_request, run_async, start_engine

from mlx_ray.engine.protocol import TokenEvent
from mlx_ray.errors import ContextOverflow, DeadlineExceeded, EngineFault, Overloaded

KV_PER_TOKEN_F32 = 2 * 30 * 3 * 64 * 4  # SmolLM2-135M: layers * kv heads * head dim, K and V, float32
MAX_LEN = 480  # the longest sequence that budget holds (15 blocks of 32): the engine refuses to start otherwise


@pytest.fixture(scope="module")
def small_engine(mlx_f32):
    """4 rows, 1 queue slot, and a KV budget that fits only two 256-token rows."""
    engine = start_engine(mlx_f32, max_num_seqs=4, max_queue=1, kv_budget_bytes=2 * 256 * KV_PER_TOKEN_F32 + 1024,
                          prefix_cache_bytes=0, health_timeout_s=2.0, max_model_len=MAX_LEN)
    yield engine
    run_async(engine.shutdown())


def _chat(engine, q):
    return engine.encode_chat([{"role": "user", "content": q}])


async def _wait_for(pred, timeout=30.0):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.02)


def test_kv_budget_limits_the_batch_and_a_full_queue_refuses(small_engine):
    e = small_engine
    assert e.info.kv_bytes_per_token == KV_PER_TOKEN_F32
    ids = _chat(e, "Count from one to one hundred.")

    async def main():
        gens = {k: e.generate(make_request(k, ids, max_tokens=150)) for k in ("r1", "r2", "r3")}
        firsts = {k: asyncio.ensure_future(g.__anext__()) for k, g in gens.items()}
        await asyncio.wait([firsts["r1"], firsts["r2"]])
        await _wait_for(lambda: e.stats()["waiting"] == 1)
        assert e.stats()["running"] == 2  # max_num_seqs is 4, but the KV budget holds two rows
        assert not firsts["r3"].done()
        with pytest.raises(Overloaded):  # the one queue slot is taken
            await e.generate(make_request("r4", ids, max_tokens=150)).__anext__()
        await e.cancel("r1")
        first3 = await firsts["r3"]  # r1's row went to r3
        assert isinstance(first3, TokenEvent)
        late = await collect(e, make_request("r4", ids, max_tokens=4))  # accepted now
        for g in gens.values():
            await g.aclose()
        return late

    late = run_async(main())
    assert late[4].error is None and late[4].completion_tokens == 4
    with pytest.raises(ContextOverflow, match="exceeds the context"):  # one row of ~640 tokens cannot fit at all
        run_async(e.generate(make_request("huge", ids, max_tokens=600)).__anext__())


# Errors a step can raise on a Mac. MLX's allocator raises the first while a step is built; the other two are
# failed Metal command buffers (GPU out of memory, the watchdog), which MLX before 0.32 threw from Metal's
# completion handler where nothing catches them (the process aborted: mlx #3224, #3317, #3390), and 0.32.0 (PR
# #3523; pyproject's floor) raises at the next synchronization in the stepping thread. None can be provoked
# here (on Linux CPU, MLX aborts on a failed allocation), so the step raises them, in Metal's own words,
# through the engine's test hook.
STEP_ERRORS = [
    "[metal::malloc] Attempting to allocate 9999999999 bytes (simulated)",
    "[METAL] Command buffer execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "[METAL] Command buffer execution failed: Caused GPU Timeout Error (00000002:kIOGPUCommandBufferCallbackErrorTimeout)",
]


@pytest.mark.parametrize("message", STEP_ERRORS)
def test_failed_step_fails_its_batch_and_the_engine_keeps_serving(small_engine, message):
    e = small_engine
    ids = _chat(e, "What is the capital of France?")
    before = run_async(collect(e, make_request("pre", ids, max_tokens=8)))[0]
    failures = e.stats().get("batch_failures", 0)

    async def main():
        gens = [e.generate(make_request(f"f{i}", ids, max_tokens=40)) for i in range(2)]
        for g in gens:
            assert isinstance(await g.__anext__(), TokenEvent)
        e._sched.inject_fault = RuntimeError(message)
        ends = []
        for g in gens:
            async for ev in g:
                if not isinstance(ev, TokenEvent):
                    ends.append(ev)
        return ends

    ends = run_async(main())
    assert [x.finish_reason for x in ends] == ["error", "error"]
    assert all(isinstance(x.error, EngineFault) and message.split("]")[0] in str(x.error) for x in ends)
    e.check_health()
    after = run_async(collect(e, make_request("post", ids, max_tokens=8)))
    assert after[4].error is None and after[0] == before
    assert e.stats()["batch_failures"] == failures + 1


def test_the_mlx_floor_has_catchable_command_buffer_errors():
    """pyproject admits no MLX whose Metal command-buffer errors abort the process (0.31.2 was built before #3523)."""
    import re
    from pathlib import Path

    # (a regex, not tomllib: pyproject admits Python 3.10, which has no tomllib)
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)  # [project]'s
    mlx = re.findall(r'"(mlx(?:\[cpu\])?\s*>[^"]*)"', deps)
    assert mlx and all(">=0.32" in d for d in mlx), mlx


def test_deadlines_end_requests_with_deadline_exceeded(small_engine):
    e = small_engine
    ids = _chat(e, "Tell me a long story.")
    past = run_async(collect(e, make_request("late0", ids, max_tokens=50, deadline=time.monotonic() - 1)))
    assert past[4].finish_reason == "error" and isinstance(past[4].error, DeadlineExceeded)
    assert past[4].completion_tokens == 0
    soon = run_async(collect(e, make_request("late1", ids, max_tokens=200, deadline=time.monotonic() + 1.5)))
    assert soon[4].finish_reason == "error" and isinstance(soon[4].error, DeadlineExceeded)
    # How many tokens fit in 1.5 s depends on the machine's load; that it stopped early does not.
    assert soon[4].completion_tokens < 200


def test_health_fails_while_the_loop_is_wedged_and_recovers(small_engine):
    e = small_engine
    e.check_health()
    gen_obj = e._sched.backend
    release, entered = threading.Event(), threading.Event()
    real_next = gen_obj.step

    def stuck():  # a step that never returns (a hung device call) until released
        entered.set()
        release.wait(30)
        return real_next()

    def unhealthy() -> bool:
        try:
            e.check_health()
        except EngineFault as err:
            assert "no progress" in str(err), err
            return True
        return False

    gen_obj.step = stuck
    try:
        async def main():
            task = asyncio.ensure_future(collect(e, make_request("wedge", _chat(e, "Hi"), max_tokens=4)))
            await _wait_for(entered.is_set)  # the loop is inside the hung step
            t0 = time.monotonic()
            await _wait_for(unhealthy)  # health fails once health_timeout_s passes without progress
            assert time.monotonic() - t0 < e.config.health_timeout_s + 5
            assert not task.done()
            release.set()
            return await task

        result = run_async(main())
    finally:
        release.set()
        gen_obj.step = real_next
    assert result[4].error is None
    e.check_health()


def test_health_fails_when_the_loop_dies(mlx_f32):
    class Fatal(BaseException):  # not an Exception: escapes the per-step handler like a real crash
        pass

    e = start_engine(mlx_f32, max_num_seqs=2, max_queue=2, kv_budget_bytes=64 << 20, prefix_cache_bytes=0,
                     max_model_len=1024)
    try:
        e.check_health()
        ids = _chat(e, "Hi")

        async def main():
            g = e.generate(make_request("dies", ids, max_tokens=50))
            assert isinstance(await g.__anext__(), TokenEvent)
            e._sched.inject_fault = Fatal("device lost")
            async for ev in g:
                if not isinstance(ev, TokenEvent):
                    return ev

        end = run_async(main())
        assert end.finish_reason == "error" and isinstance(end.error, EngineFault)
        e._sched.thread.join(10)
        with pytest.raises(EngineFault, match="dead.*device lost"):
            e.check_health()
        with pytest.raises(EngineFault):
            run_async(e.generate(make_request("after", ids, max_tokens=2)).__anext__())
    finally:
        run_async(e.shutdown())


def test_a_dying_loop_answers_every_queued_request(mlx_f32):
    """Requests submitted while a step hangs sit in the command queue; when the loop then dies
    each of them ends with EngineFault, and so does one that slips in after the death."""
    class Fatal(BaseException):
        pass

    e = start_engine(mlx_f32, max_num_seqs=2, max_queue=4, kv_budget_bytes=64 << 20, prefix_cache_bytes=0,
                     max_model_len=1024)
    try:
        ids = _chat(e, "Hi")
        gen_obj = e._sched.backend
        release, entered = threading.Event(), threading.Event()

        def stuck_then_crash():
            entered.set()
            release.wait(30)
            raise Fatal("device lost")

        async def main():
            first = asyncio.ensure_future(collect(e, make_request("running", ids, max_tokens=50)))
            await _wait_for(lambda: e.stats()["running"] == 1)
            gen_obj.step = stuck_then_crash
            await _wait_for(entered.is_set)  # the loop is now inside the hung step (however long the last one took)
            queued = [asyncio.ensure_future(collect(e, make_request(f"queued{i}", ids, max_tokens=4)))
                      for i in range(3)]
            await _wait_for(lambda: e._sched.cmds.qsize() == 3)  # submitted, and not applied: the loop is stuck
            assert entered.is_set() and not release.is_set()
            release.set()
            ends = await asyncio.wait_for(asyncio.gather(first, *queued), 30)
            e._sched.thread.join(10)
            e.check_health = lambda: None  # the race: health passed just before the loop died
            late = await asyncio.wait_for(collect(e, make_request("late", ids, max_tokens=2)), 10)
            return ends, late

        ends, late = run_async(main())
        for events in [*ends, late]:
            fin = events[-1]
            assert fin.finish_reason == "error" and isinstance(fin.error, EngineFault), fin
        assert e.stats()["inflight"] == 0
    finally:
        release.set()
        run_async(e.shutdown())


def test_a_finished_request_frees_its_slot_even_if_its_event_loop_is_gone(small_engine):
    """The slot is freed by the loop thread, not by the FinishEvent reaching the consumer."""
    e = small_engine
    ids = _chat(e, "Hi")
    loop = asyncio.new_event_loop()

    async def start_and_leave():
        g = e.generate(make_request("orphan", ids, max_tokens=8))
        await g.__anext__()  # admitted and running; then this loop goes away mid-stream
        return g

    g = loop.run_until_complete(start_and_leave())
    assert e.stats()["inflight"] == 1
    loop.close()  # its FinishEvent now has nowhere to go
    deadline = time.monotonic() + 30
    while e.stats()["inflight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert e.stats()["inflight"] == 0 and e.stats()["running"] == 0
    del g
