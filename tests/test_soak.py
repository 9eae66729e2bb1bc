"""The soak bench, half a minute, against the session's real Ray Serve app: its verdict must pass.

``bench/soak.py`` runs as users run it (its own process, a second Ray driver
for the samples, the load generator in a third process) against ``smol``
(admission limit 2 + 1, so 5 clients), mixing streamed, non-streamed,
client-cancelled and over-limit requests. What is asserted is correctness, not
speed: RSS flat after the warm-up (net of the prefix cache), every engine slot
back to 0, no 5xx, no hang, only the expected statuses, 429s reached, healthy
afterwards, the same replica throughout.

Not marked ``ray``: a second run on Ray 2.53.0 would test the same code of ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_serve import APP, LIMIT

pytestmark = [pytest.mark.slow]

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def test_half_minute_soak_verdict_passes(served, ray_cluster, tmp_path):
    url, _ = served
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(SOAK), "--url", url, "--ray-address", ray_cluster.address, "--app-name", APP,
           "--model-name", "smol", "--admission-limit", str(LIMIT["max_num_seqs"] + LIMIT["max_queue"]),
           "--minutes", "0.5", "--sample-s", "1.5", "--request-timeout", "60", "--json", str(out)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # the test cluster runs without token auth
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    print(proc.stdout)
    assert out.exists(), proc.stderr[-3000:]
    res = json.loads(out.read_text())
    v = res["verdict"]
    assert v["pass"] and proc.returncode == 0, (v, proc.stdout[-3000:])
    kinds = {r["kind"] for r in res["records"] if r["status"] == 200}
    assert kinds >= {"stream", "nonstream", "cancel"}, kinds  # each kind of real work got through
    assert res["after"]["inflight"] == res["after"]["running"] == res["after"]["waiting"] == 0


def _soak_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("soak", SOAK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rss_flatness_criterion():
    """The criterion itself, on made-up series: a plateau passes, a steady climb or too few samples do not."""
    soak = _soak_module()
    mib = soak.MIB

    def series(rss_at, prefix_at=lambda t: 0):
        return [{"t": t, "rss_bytes": int(rss_at(t)), "prefix_cache_bytes": int(prefix_at(t))} for t in range(0, 61, 2)]

    warm_then_flat = series(lambda t: (1000 + min(t, 10) * 20) * mib)  # +200 MiB warm-up, then flat
    assert soak.rss_flatness(warm_then_flat, 12, 10, 64)["ok"]
    cache_fills = series(lambda t: (1200 + 5 * t) * mib, prefix_at=lambda t: 5 * t * mib)  # the prefix cache, by design
    assert soak.rss_flatness(cache_fills, 12, 10, 64)["ok"]
    leak = series(lambda t: (1200 + 5 * t) * mib)  # 300 MiB/min
    r = soak.rss_flatness(leak, 12, 10, 64)
    assert not r["ok"] and 250 < r["slope_mib_per_min"] < 350
    assert not soak.rss_flatness(series(lambda t: 1000 * mib)[:7], 12, 10, 64)["ok"]  # 2 samples after warm-up
