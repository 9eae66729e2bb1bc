"""``mlx-ray parity`` on the real fixture model, on CPU.

The prompt set is cut to two prompts (one raw, one chat-templated) and short
continuations so the whole file stays around two minutes; the built-in set
and the defaults are what ``mlx-ray parity`` uses outside tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlx_ray.cli import main as cli_main
from mlx_ray.parity import thresholds
from mlx_ray.parity.harness import check_vocab_sizes
from mlx_ray.parity.prompts import load_prompts

PROMPTS = [
    {"name": "raw", "prompt": "Once upon a time, in a small village by the sea,"},
    {"name": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
]


# The same settings everywhere, so the torch reference runs once and is reused (in-process memo).
SHORT = ("--max-new-tokens", "12", "--ppl-tokens", "64")


@pytest.fixture(autouse=True)
def _no_blas_reexec(monkeypatch):
    """cli.main re-execs the process to preload OpenBLAS; inside pytest that would restart the run."""
    monkeypatch.setenv("MLX_RAY_BLAS_REEXEC", "1")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("parity") / "prompts.json"
    p.write_text(json.dumps(PROMPTS))
    return p


def run_cli(hf, mlx, prompts_file, out: Path, *extra) -> tuple[int, dict | None]:
    js = out / "parity.json"
    rc = cli_main(["parity", "--hf", str(hf), "--mlx", str(mlx), "--prompts", str(prompts_file), "--device", "cpu",
                   "--json", str(js), "--report", str(out / "parity.md"), *extra])
    return rc, (json.loads(js.read_text()) if js.exists() else None)


def variant(src: Path, dst: Path) -> Path:
    """A copy of an MLX model dir to modify (weights copied, so the original stays intact)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock", ".*"))
    return dst


@pytest.fixture(scope="module")
def f32_report(smollm2_hf, mlx_f32, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("f32")
    rc, report = run_cli(smollm2_hf, mlx_f32, prompts_file, out, *SHORT)
    return rc, report, out


def test_f32_matches_torch_f32(f32_report):
    rc, r, out = f32_report
    assert rc == 0 and r["passed"] and r["level"] == "f32"
    assert r["logits"]["top1_agreement"] >= 0.999
    assert r["logits"]["positions"] > 40
    assert all(p["greedy"]["identical"] for p in r["prompts"])
    assert "Paris" in next(p["mlx_text"] for p in r["prompts"] if p["name"] == "chat")
    assert abs(r["perplexity"]["ratio"] - 1) < 1e-3


def test_torch_side_runs_without_the_mlx_blas_preload(f32_report):
    """Interposed into torch's process, MLX's OpenBLAS slowed torch 5.8x: the harness runs torch in a child."""
    from mlx_ray import blas

    if not blas.preloaded_by_env():
        pytest.skip("OpenBLAS is not preloaded in this run (scripts/test.sh preloads it)")
    _, r, _ = f32_report
    assert r["environment"]["mlx_blas"].startswith("openblas")
    assert not r["torch"]["process_blas"].startswith("openblas"), r["torch"]["process_blas"]


def test_report_names_devices_versions_and_blas(f32_report):
    _, r, out = f32_report
    assert r["torch"]["device"] == "cpu" and r["torch"]["dtype"] == "float32"
    assert r["mlx"]["device"] == "cpu" and r["mlx"]["quantization"] == "float32"
    assert set(r["environment"]["versions"]) >= {"mlx", "mlx-lm", "torch", "transformers"}
    assert r["environment"]["mlx_blas"]
    md = (out / "parity.md").read_text()
    assert "| top-1 agreement" in md and "**Verdict: PASS" in md and r["environment"]["mlx_blas"] in md
    for side in ("torch", "mlx"):
        lat = r["latency"][side]
        assert lat["ttft_s"] > 0 and lat["decode_tok_s"] > 0 and lat["peak_bytes"] > 0


def test_q4_within_documented_bounds(smollm2_hf, mlx_q4, prompts_file, tmp_path):
    # Quantized matmul on MLX's CPU backend is slow without mlx-ray's kernel: a few tokens only.
    rc, r = run_cli(smollm2_hf, mlx_q4, prompts_file, tmp_path, *SHORT)
    assert r["level"] == "q4" and r["mlx"]["quantization"] == "q4-g64"
    assert r["thresholds"] == thresholds.DEFAULTS["q4"]
    assert [c["name"] for c in r["checks"] if not c["passed"]] == [] and rc == 0
    assert r["logits"]["kl_mean"] > 1e-4  # quantization shows up: this is not the f32 model


def test_scaled_layer_fails(smollm2_hf, mlx_f32, prompts_file, tmp_path):
    import mlx.core as mx

    d = variant(mlx_f32, tmp_path / "corrupt")
    for f in d.glob("*.safetensors"):
        w = mx.load(str(f))
        hit = [k for k in w if k.startswith("model.layers.7.") and k.endswith("proj.weight")]
        if hit:
            w.update({k: w[k] * 1.3 for k in hit})
            mx.save_safetensors(str(f), w, metadata={"format": "mlx"})
    rc, r = run_cli(smollm2_hf, d, prompts_file, tmp_path, *SHORT)
    assert rc == 1 and not r["passed"] and r["verdict"].startswith("FAIL")
    assert not next(c for c in r["checks"] if c["name"] == "kl_mean_max")["passed"]


def test_lost_rope_theta_fails(smollm2_hf, mlx_f32, prompts_file, tmp_path, capsys):
    d = variant(mlx_f32, tmp_path / "norope")
    cfg = json.loads((d / "config.json").read_text())
    # The theta is gone altogether (the engine loader repairs a config that still has rope_parameters),
    # so mlx-lm silently falls back to 10000: only the logits can tell.
    assert cfg.pop("rope_theta", None) == 100000.0
    cfg.pop("rope_parameters", None)
    (d / "config.json").write_text(json.dumps(cfg))
    rc, r = run_cli(smollm2_hf, d, prompts_file, tmp_path, *SHORT)
    assert rc == 1 and r["logits"]["top1_agreement"] < 0.999 and r["logits"]["max_abs_diff"] > 1
    assert "FAIL" in capsys.readouterr().err


def test_tokenizer_mismatch_is_refused(smollm2_hf, mlx_f32, prompts_file, tmp_path, capsys):
    d = tmp_path / "othertok"
    d.mkdir()
    for f in Path(mlx_f32).iterdir():  # weights by symlink: only the tokenizer changes
        if f.is_file() and f.name != "tokenizer.json":
            (d / f.name).symlink_to(f)
    tok = json.loads((Path(mlx_f32) / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["Paris"], vocab["London"] = vocab["London"], vocab["Paris"]  # still a valid tokenizer, other ids
    (d / "tokenizer.json").write_text(json.dumps(tok))
    rc, r = run_cli(smollm2_hf, d, prompts_file, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and r is None
    assert len(err) == 1 and "tokenizer mismatch" in err[0]


def test_bad_usage_exits_2(smollm2_hf, mlx_f32, tmp_path, capsys):
    bad = tmp_path / "t.json"
    bad.write_text('{"top1_minimum": 0.5}')
    assert cli_main(["parity", "--hf", str(smollm2_hf), "--mlx", str(mlx_f32), "--thresholds", str(bad)]) == 2
    assert cli_main(["parity", "--hf", str(smollm2_hf), "--mlx", str(tmp_path / "nope")]) in (2, 3)
    assert cli_main(["parity", "--hf", str(smollm2_hf), "--mlx", str(mlx_f32), "--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("mlx-ray parity: error:") for e in err)


def test_kv_bits_8_reports_float_and_quantized_kv(f32_report, smollm2_hf, mlx_f32, prompts_file, tmp_path):
    """One run: MLX with float KV and with the 8-bit paged KV, both against torch, and 8-bit against float."""
    _, f32, _ = f32_report  # same settings: the torch reference is reused, only the MLX sides run
    rc, r = run_cli(smollm2_hf, mlx_f32, prompts_file, tmp_path, *SHORT, "--kv-bits", "8")
    assert rc == 0 and r["passed"] and r["torch"].get("reused")
    kv = r["kv"]
    assert (kv["bits"], kv["group_size"], r["settings"]["kv_bits"]) == (8, 32, 8)
    assert r["logits"]["top1_agreement"] == f32["logits"]["top1_agreement"]  # the float-KV row is the usual one
    vt, vf = kv["vs_torch"], kv["vs_float"]
    for block in (vt, vf):
        assert block["logits"]["positions"] == r["logits"]["positions"]
        assert set(block["greedy"]) >= {"identical", "prefix_frac_mean", "token_match_rate"}
    assert 0 < vf["logits"]["mean_abs_diff"] <= vf["logits"]["max_abs_diff"] < 2  # quantized, but close
    # 2 prompts x 12 tokens: 68/69 here, the miss a tie (float gap 0.001 nats); the built-in set: 530/533
    assert vf["logits"]["top1_agreement"] >= 0.98 and vf["logits"]["top1_agreement_decisive"] >= 0.99
    assert 0.99 < vf["perplexity"]["ratio"] < 1.01 and kv["engine_refuses"] is None
    assert kv["bytes_per_token"] < kv["float_bytes_per_token"] / 3
    md = (tmp_path / "parity.md").read_text()
    for row in ("| MLX float KV vs torch", "| MLX 8-bit KV vs torch", "| MLX 8-bit KV vs MLX float KV"):
        assert row in md
    assert "## Quantized KV cache (8-bit affine, group 32)" in md and r["latency"]["mlx_kv"]["decode_tok_s"] > 0
    print(f"\nkv8-g32: top-1 vs torch {vt['logits']['top1_agreement']:.4f}, vs float KV "
          f"{vf['logits']['top1_agreement']:.4f} ({vf['logits']['top1_disagreements']}/{vf['logits']['positions']} "
          f"misses, {vf['logits']['top1_disagreements_near_tie']} near-ties), max/mean logprob diff vs float "
          f"{vf['logits']['max_abs_diff']:.3g}/{vf['logits']['mean_abs_diff']:.3g}, greedy token match vs float "
          f"{vf['greedy']['token_match_rate']:.3f}, ppl ratio vs torch {vt['perplexity']['ratio']:.4f}")


def test_kv_bits_4_costs_more_than_8(f32_report, smollm2_hf, mlx_f32, prompts_file, tmp_path):
    rc, r = run_cli(smollm2_hf, mlx_f32, prompts_file, tmp_path, *SHORT, "--kv-bits", "4")
    vt, vf = r["kv"]["vs_torch"], r["kv"]["vs_float"]
    assert rc == 0 and r["kv"]["bits"] == 4 and "| MLX 4-bit KV vs MLX float KV" in (tmp_path / "parity.md").read_text()
    # this fixture's K has outlier channels: 4-bit KV flips real answers (0.77 here, 0.84 on the built-in set)
    assert 0.6 <= vf["logits"]["top1_agreement"] < 0.98 and vf["logits"]["kl_mean"] > 0.01
    assert vf["perplexity"]["ratio"] > 1.01
    assert "paged logits differ" in r["kv"]["engine_refuses"]  # the engine's load probe turns it down here
    print(f"\nkv4-g32: top-1 vs torch {vt['logits']['top1_agreement']:.4f}, vs float KV "
          f"{vf['logits']['top1_agreement']:.4f} ({vf['logits']['top1_disagreements']}/{vf['logits']['positions']} "
          f"misses), max/mean logprob diff vs float {vf['logits']['max_abs_diff']:.3g}/"
          f"{vf['logits']['mean_abs_diff']:.3g}, greedy token match vs float {vf['greedy']['token_match_rate']:.3f}, "
          f"ppl ratio vs torch {vt['perplexity']['ratio']:.4f}")


def test_kv_bits_bad_values_fail_in_one_line(smollm2_hf, mlx_f32, zoo_model, capsys):
    base = ["parity", "--hf", str(smollm2_hf), "--mlx", str(mlx_f32)]
    for flag, value in (("--kv-bits", "6"), ("--kv-group-size", "48")):
        with pytest.raises(SystemExit) as e:
            cli_main([*base, "--kv-bits", "8", flag, value] if flag != "--kv-bits" else [*base, flag, value])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith(f"mlx-ray parity: error: argument {flag}: invalid choice")
    # sliding-window layers: refused before any model runs, the reason named
    gemma = zoo_model("gemma3_text")
    capsys.readouterr()  # the conversion's progress bars
    rc = cli_main(["parity", "--hf", str(smollm2_hf), "--mlx", str(gemma), "--kv-bits", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "--kv-bits 4 needs the paged KV cache" in err[0] and "RotatingKVCache" in err[0]


def test_vocab_size_check():
    assert check_vocab_sizes(49152, 49152, 49152) == 49152
    assert check_vocab_sizes(49280, 49152, 49152) == 49152  # padded embedding: compare the real tokens
    with pytest.raises(Exception, match="vocabulary size mismatch"):
        check_vocab_sizes(32000, 49152, 49152)


def test_levels_and_overrides():
    assert thresholds.level_of({"dtype": "float32"}, "float32") == "f32"
    assert thresholds.level_of({"dtype": "float32"}, "bfloat16") == "bf16"
    assert thresholds.level_of({"dtype": "bfloat16", "quant": {"bits": 4, "group_size": 64}}, "float32") == "q4"
    assert thresholds.level_of({"quant": {"bits": 4, "group_size": 32, "mode": "mxfp4"}}, "float32") == "q4"
    assert thresholds.level_of({"quant": {"bits": 8, "group_size": 32, "mode": "mxfp8"}}, "float32") == "q8"
    t = thresholds.thresholds_for("q4", {"top1_min": 0.5, "q4": {"kl_p99_max": None}, "f32": {"top1_min": 1}})
    assert t["top1_min"] == 0.5 and t["kl_p99_max"] is None and t["kl_mean_max"] == thresholds.DEFAULTS["q4"]["kl_mean_max"]
    assert thresholds.DEFAULTS["f32"]["top1_min"] >= 0.999
    # strictness grows monotonically with precision
    for a, b in zip(thresholds.ORDER, thresholds.ORDER[1:]):
        assert thresholds.DEFAULTS[a]["top1_min"] >= thresholds.DEFAULTS[b]["top1_min"]
        assert thresholds.DEFAULTS[a]["kl_mean_max"] <= thresholds.DEFAULTS[b]["kl_mean_max"]


def test_builtin_prompts_cover_the_kinds():
    names = {p.name for p in load_prompts(None)}
    assert {"short", "chat", "code", "multilingual", "long"} <= names
    assert any(p.messages for p in load_prompts(None)) and any(p.text for p in load_prompts(None))


def test_threshold_override_file_changes_the_verdict(f32_report, tmp_path):
    _, r, _ = f32_report
    f = tmp_path / "t.yaml"
    f.write_text("f32:\n  top1_min: 1.01\n")
    limits = thresholds.thresholds_for("f32", thresholds.load_overrides(str(f)))
    failed = [c["name"] for c in thresholds.evaluate(r, limits) if not c["passed"]]
    assert failed == ["top1_min"]


def test_documented_table_matches_defaults():
    rows = [line for line in thresholds.__doc__.splitlines() if line.startswith("| ") and "≥" not in line]
    table = {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)
             if cells[0] in thresholds.DEFAULTS and len(cells) == 8}
    assert set(table) == set(thresholds.DEFAULTS)
    for level, cells in table.items():
        documented = [None if c == "-" else float(c) for c in cells]
        assert documented == [thresholds.DEFAULTS[level][m] for m in thresholds.METRICS], level


# ------------------------------------------------------------------ a base model (no chat template)

@pytest.fixture(scope="module")
def base_model(smollm2_hf, tmp_path_factory) -> tuple[Path, Path]:
    """(HF dir, converted MLX dir) of a tiny random llama written by transformers with no chat template, as a base
    model is: no chat_template.jinja, none in tokenizer_config.json."""
    from fixtures_zoo import ZOO, tiny_config, write_transformers_model

    from mlx_ray.conversion.convert import convert

    root = tmp_path_factory.mktemp("base")
    hf = root / "tiny-llama-base"
    write_transformers_model(hf, tiny_config("llama", **ZOO["llama"]), smollm2_hf, seed=3)
    (hf / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (hf / "tokenizer_config.json").write_text(json.dumps(tc))
    mlx = convert(str(hf), cache_dir=root / "cache", quantize=False, dtype="float32", progress=False)
    assert not (mlx / "chat_template.jinja").exists()
    return hf, mlx


def test_a_base_model_runs_the_built_in_prompts_as_raw_text(base_model, tmp_path, capsys):
    """The built-in set has chat prompts: a model without a chat template gets them as raw text, to the end."""
    hf, mlx = base_model
    js = tmp_path / "parity.json"
    rc = cli_main(["parity", "--hf", str(hf), "--mlx", str(mlx), "--device", "cpu", "--json", str(js), *SHORT])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    r = json.loads(js.read_text())
    assert rc == 0 and r["passed"], (rc, r.get("verdict"), err[-2000:])
    assert r["settings"]["chat_prompts"] == "raw text (no chat template)"
    builtin = load_prompts(None)
    assert [p["name"] for p in r["prompts"]] == [p.name for p in builtin]
    assert any(p.messages for p in builtin)  # the chat prompts ran too


def test_any_failure_is_one_line_and_non_zero(base_model, tmp_path, capsys, monkeypatch):
    """Something outside the error taxonomy breaking mid-run (here in the torch side) ends in one line, exit 1."""
    from mlx_ray.parity import harness

    def broken(*a, **k):
        raise ValueError("the torch side broke\nwith a second line")

    monkeypatch.setattr(harness, "_torch_reference", broken)
    hf, mlx = base_model
    rc = cli_main(["parity", "--hf", str(hf), "--mlx", str(mlx), "--device", "cpu", *SHORT])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("mlx-ray parity: error: ValueError: the torch side broke"), err
