"""A Metal command-buffer failure (GPU out of memory, the watchdog's timeout) fails the batch, never the replica.

MLX before 0.32 threw these from Metal's completion handler, where nothing can
catch them, and the process aborted (mlx #3224, #3317, #3390). MLX 0.32.0 (PR
#3523) saves the error and raises it at the next safe point (a synchronization,
command encoding) as a ``RuntimeError`` in the calling thread: the engine's
step. pyproject's floor is 0.32 for that reason. No Metal here: the engine's
test hook raises the same error, with Metal's own words, inside a real step.
"""

from __future__ import annotations

import pytest

from fixtures_engine import collect, make_request, run_async, start_engine
from mlx_ray.engine.protocol import TokenEvent
from mlx_ray.errors import EngineFault

METAL_ERRORS = [
    "[METAL] Command buffer execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "[METAL] Command buffer execution failed: Caused GPU Timeout Error (00000002:kIOGPUCommandBufferCallbackErrorTimeout)",
]


@pytest.fixture(scope="module")
def engine(mlx_f32):
    e = start_engine(mlx_f32, max_num_seqs=4, max_queue=4, max_model_len=512, warmup=False)
    yield e
    run_async(e.shutdown())


@pytest.mark.parametrize("message", METAL_ERRORS)
def test_a_failed_command_buffer_fails_its_batch_and_the_engine_keeps_serving(engine, message):
    ids = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    before = run_async(collect(engine, make_request("pre", ids, max_tokens=6)))[0]
    failures = engine.stats().get("batch_failures", 0)

    async def main():
        gens = [engine.generate(make_request(f"m{i}", ids, max_tokens=40)) for i in range(2)]
        for g in gens:
            assert isinstance(await g.__anext__(), TokenEvent)
        engine._sched.inject_fault = RuntimeError(message)
        ends = []
        for g in gens:
            async for ev in g:
                if not isinstance(ev, TokenEvent):
                    ends.append(ev)
        return ends

    ends = run_async(main())
    assert [x.finish_reason for x in ends] == ["error", "error"]
    assert all(isinstance(x.error, EngineFault) and "Command buffer" in str(x.error) for x in ends)
    engine.check_health()
    after = run_async(collect(engine, make_request("post", ids, max_tokens=6)))
    assert after[4].error is None and after[0] == before
    assert engine.stats()["batch_failures"] == failures + 1
    assert engine.stats()["inflight"] == 0


def test_the_mlx_floor_has_catchable_command_buffer_errors():
    """pyproject admits no MLX release whose Metal errors abort the process (0.31.2 was built before #3523)."""
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    mlx = [d for d in deps if d.startswith("mlx>") or d.startswith("mlx[cpu]>")]
    assert mlx and all(">=0.32" in d for d in mlx), mlx
