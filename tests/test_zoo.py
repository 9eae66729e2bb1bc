"""The model zoo: every family users bring converts, matches transformers, and runs in the engine.

Per architecture (``fixtures_zoo.ZOO``, tiny random checkpoints written by
transformers 5): the float32 conversion's logits match transformers' within
1e-3; the engine, with requests batched together, is greedy-token-identical to
mlx-lm's own generation loop; the q4 conversion generates. Then the AWQ qwen2
(the seed's family), and a hybrid model the engine refuses at load.
"""

from __future__ import annotations

import asyncio
import json

import mlx.core as mx
import numpy as np
import pytest
from fixtures_engine import collect, make_request, run_async, start_engine
from fixtures_zoo import SLIDING_WINDOW, ZOO, torch_logits

from mlx_ray.engine.protocol import TokenEvent
from mlx_ray.errors import BadRequest

ARCHS = list(ZOO)
IDS = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 216, 378, 3458, 282, 1789, 47, 9000, 21, 40000, 7, 3]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Who wrote Hamlet?"]
MAX_TOKENS = [10, 6, 8]


def mlx_logits(path, ids, dtype=None):
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    if dtype is not None:
        model.set_dtype(dtype)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def mlx_lm_greedy(path, prompts, max_tokens):
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(path))
    return [[r.token for r in stream_generate(model, tokenizer, prompt=p, max_tokens=n)]
            for p, n in zip(prompts, max_tokens)]


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_conversion_matches_transformers_logits(arch, zoo_hf, zoo_model):
    import torch
    from transformers import AutoModelForCausalLM

    ref = torch_logits(AutoModelForCausalLM.from_pretrained(zoo_hf(arch), dtype=torch.float32), IDS)
    got = mlx_logits(zoo_model(arch), IDS)
    assert len(IDS) > 2 * SLIDING_WINDOW  # gemma3's sliding layers really cut the context
    assert np.abs(ref).max() > 0.3  # random weights, but logits far from flat: 1e-3 is a real bound
    assert np.abs(got - ref).max() < 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_batched_greedy_is_token_identical_to_mlx_lm(arch, zoo_model):
    path = zoo_model(arch)
    engine = start_engine(path, max_num_seqs=4, max_queue=8, kv_budget_bytes=64 << 20, prefix_cache_bytes=0,
                          max_model_len=256)
    try:
        prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]

        async def batch():
            return await asyncio.gather(*(collect(engine, make_request(f"{arch}-{i}", p, max_tokens=n))
                                          for i, (p, n) in enumerate(zip(prompts, MAX_TOKENS))))

        results = run_async(batch())
    finally:
        run_async(engine.shutdown())
    assert min(map(len, prompts)) > 2 * SLIDING_WINDOW and len(set(map(len, prompts))) == 3  # padded batch
    assert [fin.error for *_, fin in results] == [None] * 3
    assert [r[0] for r in results] == mlx_lm_greedy(path, prompts, MAX_TOKENS)


def test_engine_sliding_window_rows_join_mid_decode_and_reuse_prefixes(zoo_model):
    """gemma3's RotatingKVCache layers, already wrapped, join a running batch and are reused as prefixes."""
    path = zoo_model("gemma3_text")
    engine = start_engine(path, max_num_seqs=4, max_queue=8, kv_budget_bytes=64 << 20, prefix_cache_bytes=32 << 20,
                          max_model_len=256)
    try:
        prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]

        async def staggered():
            joined = [asyncio.Event() for _ in prompts]

            async def first():
                out = []
                async for ev in engine.generate(make_request("g0", prompts[0], max_tokens=MAX_TOKENS[0])):
                    if not isinstance(ev, TokenEvent):
                        return out
                    out += ev.token_ids
                    for k in range(1, min(len(out), len(prompts) - 1) + 1):
                        joined[k].set()  # request k joins after request 0's k-th token

            async def later(k):
                await joined[k].wait()
                return (await collect(engine, make_request(f"g{k}", prompts[k], max_tokens=MAX_TOKENS[k])))[0]

            return await asyncio.gather(first(), *(later(k) for k in range(1, len(prompts))))

        got = run_async(staggered())
        turn2 = prompts[0] + got[0] + prompts[1][3:]  # a second turn: its prefix is the first request's
        got2 = run_async(collect(engine, make_request("g-turn2", turn2, max_tokens=6)))[0]
        hits = engine.stats()["prefix_hits"]
    finally:
        run_async(engine.shutdown())
    assert got == mlx_lm_greedy(path, prompts, MAX_TOKENS)
    assert hits >= 1 and got2 == mlx_lm_greedy(path, [turn2], [6])[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_q4_conversion_generates(arch, zoo_model):
    from mlx_lm import load, stream_generate

    path = zoo_model(arch, "q4")
    assert json.loads((path / "config.json").read_text())["quantization"]["bits"] == 4
    model, tokenizer = load(str(path))
    out = [r.token for r in stream_generate(model, tokenizer, prompt=IDS, max_tokens=3)]
    assert 1 <= len(out) <= 3 and all(0 <= t < 49152 for t in out)


# -- config normalization: transformers' own names reach mlx-lm's fields ---------------------------

def _saved_config(model_type, tmp_path, **kw) -> dict:
    from fixtures_zoo import tiny_config

    tiny_config(model_type, **kw).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_attribute_map_aliases_fill_mlx_lm_fields_both_ways(tmp_path):
    from mlx_ray.conversion.hfconfig import build_model, normalize_config

    raw = _saved_config("qwen3_moe", tmp_path, num_experts=4, num_experts_per_tok=2)
    assert "num_local_experts" in raw and "num_experts" not in raw and "head_dim" not in raw  # as transformers 5 writes
    with pytest.raises(BadRequest, match="does not fit mlx-lm's qwen3_moe model.*num_experts"):
        build_model(raw)
    cfg = normalize_config(raw)
    assert cfg["num_experts"] == 4 and cfg["head_dim"] == 64 // 4 and cfg["rope_theta"] == 10000.0
    build_model(cfg)
    # The other direction: a config.json spelling the alias, for a model whose mlx-lm field is canonical.
    mixtral = {k: v for k, v in _saved_config("mixtral", tmp_path, num_local_experts=4).items()
               if k != "num_local_experts"}
    assert normalize_config({**mixtral, "num_experts": 4})["num_local_experts"] == 4


def test_layer_types_become_mlx_lm_periods_or_are_refused():
    from mlx_ray.conversion.hfconfig import normalize_config

    s, f, lin = "sliding_attention", "full_attention", "linear_attention"
    g = {"model_type": "gemma3_text", "num_hidden_layers": 26, "layer_types": ([s] * 5 + [f]) * 4 + [s, s]}
    assert normalize_config(g)["sliding_window_pattern"] == 6  # 26 layers, the last two sliding
    assert normalize_config({**g, "sliding_window_pattern": 3})["sliding_window_pattern"] == 3  # explicit wins
    q = {"model_type": "qwen3_next", "num_hidden_layers": 8, "layer_types": [lin, lin, lin, f] * 2}
    assert normalize_config(q)["full_attention_interval"] == 4
    assert "sliding_window_pattern" not in normalize_config({"model_type": "llama", "layer_types": [s, f]})
    with pytest.raises(BadRequest, match=r"layer_types of gemma3_text is not 'every P-th layer full_attention'"):
        normalize_config({**g, "num_hidden_layers": 4, "layer_types": [s, f, f, s]})
    with pytest.raises(BadRequest, match=r"layer_types of qwen3_next has \['sliding_attention'\]"):
        normalize_config({**q, "layer_types": [lin, s, lin, f] * 2})


def test_convert_refuses_a_layout_mlx_lm_cannot_express_and_leaves_nothing(zoo_hf, tmp_path):
    from mlx_ray.conversion.convert import convert

    src = tmp_path / "gemma3-odd"
    src.mkdir()
    for f in zoo_hf("gemma3_text").iterdir():
        (src / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "sliding_attention"]  # full first: no period fits
    (src / "config.json").unlink()
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadRequest, match="not 'every P-th layer full_attention'"):
        convert(str(src), cache_dir=tmp_path / "cache", quantize=False, progress=False)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_without_transformers_only_rope_is_normalized(monkeypatch, tmp_path):
    from mlx_ray.conversion.hfconfig import normalize_config

    raw = _saved_config("qwen3_moe", tmp_path, num_experts=4)
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    cfg = normalize_config(raw)
    assert "num_experts" not in cfg and cfg["rope_theta"] == 10000.0


# -- the seed's family: AutoAWQ qwen2 -----------------------------------------------------------

def test_awq_qwen2_logits_match_transformers_on_dequantized_weights(awq_qwen2_hf, awq_qwen2_model):
    """MLX on the repacked AWQ model vs transformers f32 holding AWQ's ``(q - z) * s``.

    The tolerance: the repack keeps codes and scales bit for bit but stores the
    bias ``-z * s`` rounded once to fp16 (FACTS.md; test_awq bounds it at half
    an ulp). That rounding moves these logits by ~6e-3 (of ~4.6), so the bound
    is 1e-2, and the test shows all of it is that rounding: transformers
    running the weights MLX holds (``q * s + fp16(-z * s)``) matches to 1e-4.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    awq_dir, truth = awq_qwen2_hf
    assert awq_qwen2_model.name == "awq-q4-g128"
    cfg = json.loads((awq_qwen2_model / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 128, "bits": 4, "mode": "affine"} and cfg["hidden_size"] == 128
    stored = load_file(str(awq_dir / "model.safetensors"))  # fp16 norms, embeddings and q/k/v biases
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= set(stored)

    def transformers_logits(mlx_bias: bool):
        sd = {k: v.float() for k, v in stored.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
        for prefix, (codes, zeros, scales) in truth.items():
            g = codes.shape[1] // scales.shape[1]
            z, s = np.repeat(zeros, g, 1).astype(np.float32), np.repeat(scales.astype(np.float32), g, 1)
            w = codes * s + (-z * s).astype(np.float16) if mlx_bias else (codes - z) * s  # exact in f32
            sd[f"{prefix}.weight"] = torch.from_numpy(w.astype(np.float32))
        config = AutoConfig.from_pretrained(awq_dir)
        del config.quantization_config  # a plain float model holding the dequantized weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        model.load_state_dict(sd, strict=True)
        return torch_logits(model, IDS)

    got = mlx_logits(awq_qwen2_model, IDS, dtype=mx.float32)  # fp16 scales/biases widened losslessly
    exact, as_mlx = transformers_logits(False), transformers_logits(True)
    assert np.abs(exact).max() > 1.0
    assert np.abs(got - as_mlx).max() < 1e-4       # same weights: only f32 summation order differs
    assert np.abs(got - exact).max() < 1e-2        # AWQ's own weights: plus the fp16 bias rounding
    assert (got.argmax(-1) == exact.argmax(-1)).all()


def test_awq_qwen2_runs_in_the_engine(awq_qwen2_model):
    engine = start_engine(awq_qwen2_model, max_num_seqs=2, kv_budget_bytes=64 << 20, prefix_cache_bytes=0,
                          max_model_len=256)
    try:
        ids = engine.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
        got, _, _, _, fin = run_async(collect(engine, make_request("awq", ids, max_tokens=4)))
    finally:
        run_async(engine.shutdown())
    assert fin.error is None and got == mlx_lm_greedy(awq_qwen2_model, [ids], [4])[0]


# -- a hybrid (recurrent-state) model: converts, runs in mlx-lm, refused by the engine ---------------

def test_hybrid_converts_and_matches_but_the_engine_refuses_it(hybrid_hf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from mlx_ray.conversion.convert import convert
    from mlx_ray.engine.engine import MLXEngine

    raw = json.loads((hybrid_hf / "config.json").read_text())
    assert "full_attention_interval" not in raw and raw["layer_types"] == ["linear_attention", "full_attention"]
    path = convert(str(hybrid_hf), cache_dir=tmp_path, quantize=False, dtype="float32", progress=False)
    assert json.loads((path / "config.json").read_text())["full_attention_interval"] == 2
    ref = torch_logits(AutoModelForCausalLM.from_pretrained(hybrid_hf, dtype=torch.float32), IDS)
    assert np.abs(mlx_logits(path, IDS) - ref).max() < 1e-3  # mlx_lm.load can use it: convert accepts it
    with pytest.raises(BadRequest) as e:
        MLXEngine(path).load()
    msg = str(e.value)
    assert "\n" not in msg and "qwen3_next" in msg and "ArraysCache" in msg and "KV budget" in msg
