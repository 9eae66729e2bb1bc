"""The memory plan (engine/memory.py): one function, used by the engine at start and printed by `mlx-ray plan`.

The seed's figures are planned from the real config of Qwen2.5-32B-Instruct-AWQ
(64 layers) on the M4 Pro 48 GB *profile*: the Mac is not here, so the
profile stands in for what Metal would report (engine/device.py says so).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fixtures_seed import SEED_CONFIG
from mlx_ray.engine import device, memory

GB = 1e9


@pytest.fixture()
def seed_config(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(SEED_CONFIG))
    return p


def test_the_seed_at_4k_on_the_48gb_mac_admits_16_full_length_sequences(seed_config):
    fp = memory.footprint(seed_config)
    assert fp.estimated and 19.6 * GB < fp.weights_bytes < 19.8 * GB  # FACTS.md: ~19.7 GB with fp16 embeddings
    assert fp.kv_bytes_per_token == 256 * 1024
    plan = memory.make_plan(fp, device.resolve("m4-pro-48gb"), max_model_len=4096)
    assert plan.full_length_seqs >= 16
    assert plan.kv_bits is None  # fp16 KV fits: no quantized KV needed
    assert plan.left_for_os_bytes >= 4 * GB
    assert plan.planned_bytes <= plan.working_set_bytes
    # The old default (half of what was left after twice the weights, floored at 64 MiB) gave 8 blocks here.
    assert plan.kv_blocks >= 16 * 4096 // 32 + 1


def test_more_sequences_than_fp16_holds_take_8bit_kv_and_say_what_a_wired_limit_would_buy(seed_config):
    fp = memory.footprint(seed_config)
    plan = memory.make_plan(fp, device.resolve("m4-pro-48gb"), max_model_len=4096, max_num_seqs=24)
    assert plan.kv_bits == 8 and plan.full_length_seqs >= 24
    assert any("iogpu.wired_limit_mb=" in n for n in plan.notes)
    # Asked to keep the model's dtype: fewer full-length sequences, said in a note, never a refusal.
    kept = memory.make_plan(fp, device.resolve("m4-pro-48gb"), max_model_len=4096, max_num_seqs=24, kv_bits=None)
    assert kept.kv_bits is None and 16 <= kept.full_length_seqs < 24
    assert any("only" in n and "sequences fit" in n for n in kept.notes)


def test_a_model_that_cannot_hold_one_sequence_is_refused_in_one_line(seed_config):
    fp = memory.footprint(seed_config)
    with pytest.raises(memory.PlanError) as e:
        memory.make_plan(fp, device.resolve("m4-pro-24gb"), max_model_len=4096)
    assert "\n" not in str(e.value) and "smaller or more quantized model" in str(e.value)
    # Context-bound: too long a context says which max_model_len fits.
    small = memory.footprint(seed_config)
    small.weights_bytes = 10 * 2**30
    with pytest.raises(memory.PlanError, match=r"set max_model_len to \d+ or less"):
        memory.make_plan(small, device.resolve("m4-pro-24gb"), max_model_len=32768, kv_bits=None)


def test_an_explicit_kv_budget_is_the_operators_and_is_never_refused(seed_config):
    fp = memory.footprint(seed_config)
    plan = memory.make_plan(fp, device.resolve("m4-pro-48gb"), max_model_len=4096, kv_budget_bytes=64 << 20)
    assert plan.kv_pool_bytes == 64 << 20 and plan.full_length_seqs == 0
    # A budget past the working set is the operator's too, but MLX refuses a wired limit above it.
    big = memory.make_plan(fp, device.resolve("m4-pro-48gb"), max_model_len=4096, kv_budget_bytes=30 << 30)
    assert big.planned_bytes > big.working_set_bytes and big.wired_limit_bytes == big.device["working_set_bytes"]
    assert any("longer requests are refused" in n for n in plan.notes)


def test_quantizing_the_embeddings_is_priced(seed_config):
    plan = memory.make_plan(memory.footprint(seed_config), device.resolve("m4-pro-48gb"), max_model_len=4096)
    note = next(n for n in plan.notes if "--quantize-embeddings" in n)
    assert "free 2.2 GB" in note  # 3.11 GB of fp16 embeddings -> 0.88 GB at 4-bit group 64


def test_plan_cli_prints_a_table_json_and_one_line_errors(seed_config):
    run = lambda *a: subprocess.run([sys.executable, "-m", "mlx_ray.cli", "plan", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    table = run(str(seed_config), "--device", "m4-pro-48gb", "--max-model-len", "4096")
    assert table.returncode == 0, table.stderr
    assert "16 fit at full length" in table.stdout and "KV pool" in table.stdout
    js = run(str(seed_config), "--device", "m4-pro-48gb", "--max-model-len", "4096", "--json")
    assert json.loads(js.stdout)["full_length_seqs"] >= 16
    bad = run(str(seed_config), "--device", "m4-pro-24gb", "--max-model-len", "4096")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "error:" in bad.stderr
    unknown = run(str(seed_config), "--device", "m9-imaginary")
    assert unknown.returncode == 2 and "unknown device profile" in unknown.stderr
    listed = run("--device", "list")
    assert "m4-pro-48gb" in listed.stdout and "local" in listed.stdout


def test_the_estimate_equals_the_mapped_bytes_of_a_conversion(mlx_q4):
    """The config arithmetic counts exactly what the converter writes (so a 64-layer plan can be trusted)."""
    mapped, _ = memory.mapped_bytes(mlx_q4)
    assert memory.estimate_weights(json.loads((mlx_q4 / "config.json").read_text()))[0] == mapped


def test_the_engine_starts_on_the_plan(engine_f32, mlx_f32):
    """What the engine runs is the plan: its budget, its bits, its prefix share (here set explicitly)."""
    plan = engine_f32.plan
    assert engine_f32.kv_budget_bytes == plan.kv_pool_bytes == 512 << 20
    assert engine_f32.config.kv_bits is None and plan.kv_bits is None  # "auto" resolved to the model's dtype
    assert engine_f32._sched.backend.pool.num_blocks == plan.kv_blocks


def test_the_default_budget_holds_every_sequence_at_full_length(mlx_f32, monkeypatch):
    """No explicit budget: the pool holds max_num_seqs x max_model_len in blocks (plus the trash block)."""
    from fixtures_engine import run_async, start_engine

    engine = start_engine(mlx_f32, max_num_seqs=4, max_model_len=1024, warmup=False)
    try:
        assert engine.plan.full_length_seqs == 4
        assert engine._sched.backend.pool.num_blocks == 4 * 1024 // 32 + 1
    finally:
        run_async(engine.shutdown())


def test_doctor_plans_the_largest_cached_model(mlx_f32, model_cache):
    from mlx_ray.plan_cli import doctor_check

    got = doctor_check(str(model_cache))
    assert got.status == "pass", got
    assert "full-length sequences" in got.message and "left for the OS" in got.message


def test_serve_cli_kv_bits_words_reach_the_engine_config():
    import argparse

    from mlx_ray.serve.cli import config_from_args, configure_parser

    p = argparse.ArgumentParser()
    configure_parser(p)
    got = {w: config_from_args(p.parse_args(["--model", "/m", "--kv-bits", w])).models[0].engine.kv_bits
           for w in ("auto", "model", "8")}
    assert got == {"auto": "auto", "model": None, "8": 8}
    assert config_from_args(p.parse_args(["--model", "/m"])).models[0].engine.kv_bits == "auto"
    from mlx_ray.engine.protocol import EngineConfig  # env vars arrive as strings (KV_BITS=8)

    assert [EngineConfig(kv_bits=v).kv_bits for v in ("8", "model", "auto")] == [8, None, "auto"]


def test_the_wired_limit_is_set_only_on_a_real_metal_device_and_a_refusal_is_a_warning(seed_config, monkeypatch,
                                                                                       caplog):
    """``apply_wired_limit`` as the engine calls it at start. Mocked, because Metal is not here: MLX's
    ``metal.is_available`` and ``set_wired_limit`` (recorded). A profile never wires this machine's memory."""
    import dataclasses

    import mlx.core as mx

    fp = memory.footprint(seed_config)
    plan = memory.make_plan(fp, device.resolve("m4-pro-48gb"), max_model_len=4096)
    assert memory.apply_wired_limit(plan) is None  # a profile: nothing is set
    assert plan.wired_limit_bytes == device.resolve("m4-pro-48gb").working_set_bytes

    mac = dataclasses.replace(device.resolve("m4-pro-48gb"), source="metal")  # what a real Mac reports
    real = memory.make_plan(fp, mac, max_model_len=4096)
    calls = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 7)
    assert memory.apply_wired_limit(real) == 7 and calls == [real.wired_limit_bytes]

    def refuse(n):
        raise RuntimeError("[metal::set_wired_limit] Setting a wired limit larger than the maximum working set")
    monkeypatch.setattr(mx, "set_wired_limit", refuse)
    assert memory.apply_wired_limit(real) is None  # serve unwired rather than not at all
    assert "wired limit not set" in caplog.text
