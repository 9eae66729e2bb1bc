"""``kv_cache="auto"`` takes the paged KV cache on this machine (Linux x86-64), where its CPU primitive is built and
verified: a silent fallback to the rectangular batch cache would hide a broken kernel behind green tests."""

from __future__ import annotations

import platform
import sys

import pytest
from fixtures_engine import collect, make_request, run_async, start_engine

EXPECTED_HERE = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


@pytest.mark.skipif(not EXPECTED_HERE, reason="the paged cache's CPU primitive is expected on Linux x86-64")
def test_auto_picks_the_paged_cache_here(mlx_f32, mlxlm_greedy):
    from mlx_ray.kernels import paged_attention as pa

    active, reason, _ = pa.cpu_state()
    assert active, f"the C++ paged attention is not active here: {reason}"
    e = start_engine(mlx_f32, kv_cache="auto", max_num_seqs=2, kv_budget_bytes=64 << 20, prefix_cache_bytes=0,
                     max_model_len=1024)
    try:
        assert e.stats()["kv_cache"] == "paged", e.stats()
        ids = e.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
        got = run_async(collect(e, make_request("auto", ids, max_tokens=8)))
        assert got[4].error is None and got[0] == mlxlm_greedy(ids, 8)
    finally:
        run_async(e.shutdown())
