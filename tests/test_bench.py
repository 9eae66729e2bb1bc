"""``mlx-ray bench`` (MLX against torch on the fixture, --quick) and ``bench compare``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_ray.bench.measure import batch_tokens, memory_bandwidth_gbs
from mlx_ray.bench.runner import hf_source_for
from mlx_ray.cli import main as cli_main


@pytest.fixture(autouse=True)
def _no_blas_reexec(monkeypatch):
    """cli.main re-execs the process to preload OpenBLAS; inside pytest that would restart the run."""
    monkeypatch.setenv("MLX_RAY_BLAS_REEXEC", "1")


@pytest.fixture(scope="module")
def quick_run(mlx_f32, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # No --hf: the torch side comes from the conversion manifest of the cached model.
    rc = cli_main(["bench", "--model", str(mlx_f32), "--quick", "--device", "cpu", "--bandwidth-gbs", "20",
                   "--json", str(out / "a.json"), "--plot", str(out / "a.png")])
    return rc, out


def test_quick_bench_table_json_plot(quick_run, capsys):
    rc, out = quick_run
    assert rc == 0
    r = json.loads((out / "a.json").read_text())
    assert set(r["backends"]) == {"mlx", "torch"}
    assert r["backends"]["mlx"]["dtype"] == "float32" and r["backends"]["torch"]["dtype"] == "float32"
    assert [(x["backend"], x["prompt_len"], x["batch"]) for x in r["rows"]] == \
        [("mlx", 32, 1), ("mlx", 32, 2), ("torch", 32, 1), ("torch", 32, 2)]
    for row in r["rows"]:
        for k in ("prefill_tok_s", "decode_tok_s", "ttft_s"):
            assert 0 < row[k]["min"] <= row[k]["median"] <= row[k]["max"]
        assert row["peak_bytes"] > 0 and row["roofline_fraction"] > 0
    h = r["headline"]
    assert (h["prompt_len"], h["batch"]) == (32, 1)
    assert h["decode_ratio"] == pytest.approx(h["mlx_decode_tok_s"] / h["torch_decode_tok_s"])
    assert r["bandwidth_gbs"] == 20 and r["environment"]["mlx_blas"]
    assert (out / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_compare(quick_run, capsys):
    _, out = quick_run
    r = json.loads((out / "a.json").read_text())
    for row in r["rows"]:
        if row["backend"] == "mlx":
            row["decode_tok_s"]["median"] *= 2
    (out / "b.json").write_text(json.dumps(r))
    capsys.readouterr()
    assert cli_main(["bench", "compare", str(out / "a.json"), str(out / "b.json")]) == 0
    text = capsys.readouterr().out
    mlx_lines = [line for line in text.splitlines() if line.startswith("| mlx")]
    torch_lines = [line for line in text.splitlines() if line.startswith("| torch")]
    assert len(mlx_lines) == 2 and all("+100.0%" in line for line in mlx_lines)
    assert torch_lines and all("+100.0%" not in line for line in torch_lines)


def test_bench_bad_usage(mlx_f32, tmp_path, capsys):
    assert cli_main(["bench", "--model", str(mlx_f32), "--backends", "mlx,tpu"]) == 2
    assert cli_main(["bench", "--model", str(mlx_f32), "--prompt-lengths", "a,b"]) == 2
    assert cli_main(["bench", "--model", str(mlx_f32), "--prompt-lengths", "9000"]) == 2
    assert cli_main(["bench"]) == 2
    (tmp_path / "x.json").write_text("{}")
    assert cli_main(["bench", "compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(e.startswith("mlx-ray bench: error:") for e in err)


def test_batch_tokens_and_manifest_source(mlx_f32, smollm2_hf):
    t = batch_tokens([5, 6, 7], 10, 3)
    assert t.shape == (3, 10) and t.dtype == np.int32 and not np.array_equal(t[0], t[1])
    assert hf_source_for(mlx_f32) == str(smollm2_hf)


def test_memory_bandwidth_is_measured():
    assert memory_bandwidth_gbs(gib=1 / 16, repeats=2) > 0


def _workload_l():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("workload_l", Path(__file__).parent.parent / "bench" / "workload_l.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_workload_l_prompts_admission_report(mlx_f32, tmp_path):
    """bench/workload_l.py's parts without servers: exact distinct prompts, the in-process admission
    worker on this checkout's engine, the ratios and copy-per-request figures, the tables and the plot."""
    import asyncio

    from mlx_ray.bench.openai_load import RequestResult, summarize

    wl = _workload_l()
    maker = wl.PromptMaker(mlx_f32)
    prompts = maker.batch(4, 40, 90, [0, 1])
    lengths = [maker.length(p) for p in prompts]
    assert all(40 <= n <= 90 for n in lengths) and len(set(lengths)) == 4
    assert len({p[0]["content"].split()[0] for p in prompts}) == 4  # distinct from the first word on
    assert maker.batch(4, 40, 90, [0, 1]) != prompts  # never the same prompts twice in a run

    adm = asyncio.run(wl.admission_async({"model": str(mlx_f32), "prompts": prompts, "kv_budget_bytes": 64 << 20,
                                          "max_num_seqs": 4, "max_tokens": 4, "prefix_cache_bytes": 0,
                                          "max_s": 60, "kv_bits": None}))
    assert adm["stopped_by"] == "first finish" and 1 <= adm["peak_running"] <= 4, adm

    def run(tok_s: float, copied: int | None = None) -> dict:
        r = summarize([RequestResult(ok=True, ttft=0.5, latency=1.0, output_tokens=8, prompt_tokens=60,
                                     gaps=[0.1] * 7)] * 2, 16 / tok_s, 2)
        r.update(mode="greedy", peak_rss_bytes=1 << 30, load_avg_before=(0.2, 0, 0))
        if copied is not None:
            r["engine_stats"] = {"kv_cache": "paged", "kv_block_size": 32}
            r["engine_stats_delta"] = {"kv_admit_copy_bytes_total": copied, "kv_finish_copy_bytes_total": 0}
        return r

    sides = {"base": {"runs": {"2:greedy": run(10.0)}, "commit": "b", "kind": "mlx-ray"},
             "new": {"runs": {"2:greedy": run(20.0, copied=1000)}, "commit": "n", "kind": "mlx-ray"},
             "mlx_lm": {"runs": {"2:greedy": run(5.0)}, "commit": "m", "kind": "mlx_lm"}}
    report = {"machine": {"cpu_model": "cpu", "cpus": 2, "ram_gb": 1, "platform": "p", "load_avg": (0.2, 0, 0),
                          "load_avg_at_end": (0.3, 0, 0)}, "blas": "b", "model": "m", "notes": [], "skipped": {},
              "sides": sides, "eos_ids": [2], "prompt_tokens": {"2:greedy": {"mean": 60}},
              "admission": {"base": dict(adm), "new": dict(adm, peak_running=adm["peak_running"] * 2)},
              "config": {"prompt_min": 40, "prompt_max": 90, "max_tokens": 8, "kv_budget_mib": 64,
                         "admission_max_num_seqs": 4, "short_max_tokens": 8}}
    wl.derive(report)
    assert report["ratios"] == [{"run": "2:greedy", "side": "new", "x_base": pytest.approx(2.0),
                                 "x_mlx_lm": pytest.approx(4.0)}]
    assert sides["new"]["runs"]["2:greedy"]["kv_copy_bytes_per_admission"] == 500
    assert report["admission"]["new"]["x_base"] == 2
    text = wl.text_report(report)
    assert "ratios" in text and "paged" in text and "admission" in text
    assert wl.plot(report, str(tmp_path / "p.png")) is None
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
