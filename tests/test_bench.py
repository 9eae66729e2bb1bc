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
