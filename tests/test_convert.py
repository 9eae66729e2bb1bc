"""End-to-end conversion of the real fixture model (SmolLM2-135M-Instruct).

The f32 conversion must reproduce transformers' logits (the RoPE config bug of
FACTS.md shifts them by up to 10) and its greedy tokens; the q4-g64 conversion
must still complete the France fact with Paris.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

PROMPTS = ["The quick brown fox", "What is the capital of France?", "def fibonacci(n):"]
GREEDY_TOKENS = 10


@pytest.fixture(scope="module")
def hf_model(smollm2_hf):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    return model, tok


def test_f32_config_is_normalized_for_mlx_lm(mlx_f32, smollm2_hf):
    src = json.loads((smollm2_hf / "config.json").read_text())
    assert "rope_theta" not in src, "fixture no longer exercises the transformers-5 RoPE layout"
    cfg = json.loads((mlx_f32 / "config.json").read_text())
    assert cfg["rope_theta"] == src["rope_parameters"]["rope_theta"]
    assert "quantization" not in cfg


def test_f32_logits_match_transformers(mlx_f32, hf_model):
    import mlx.core as mx
    import torch
    from mlx_lm import load

    model, _ = load(str(mlx_f32))
    ref_model, tok = hf_model
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].numpy()
        out = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        assert out.shape == ref.shape
        diff = float(np.abs(out - ref).max())
        assert diff < 1e-3, f"{prompt!r}: max abs logit diff {diff}"


def test_f32_greedy_tokens_match_transformers(mlx_f32, hf_model):
    import mlx.core as mx
    import torch
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(mlx_f32))
    ref_model, tok = hf_model
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                     pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        ours = [int(t) for (t, _), _ in zip(generate_step(mx.array(ids), model), range(len(ref)))]
        assert ours == ref, f"{prompt!r}: {tok.decode(ours)!r} != {tok.decode(ref)!r}"


def test_q4_answers_paris(mlx_q4):
    """The q4-g64 model still completes the France fact, through MLX's own quantized matmul (mlx-lm as users
    run it). A completion, not the chat prompt: the template's default system prompt makes 37 prompt tokens,
    ~50 s of MLX's single-threaded CPU quantized matmul here; the chat answer at f32 is checked against
    transformers above ("What is the capital of France?")."""
    from mlx_lm import generate, load

    cfg = json.loads((mlx_q4 / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert mlx_q4.parts[-1] == "q4-g64"
    model, tok = load(str(mlx_q4))
    text = generate(model, tok, prompt="The capital of France is", max_tokens=2)
    assert "Paris" in text, text


def test_manifest_records_provenance_and_hashes(mlx_q4, smollm2_hf):
    from mlx_ray.conversion.manifest import read_manifest
    from mlx_ray.conversion.source import sha256_file

    m = read_manifest(mlx_q4)
    assert m["source"]["files"]["model.safetensors"]["sha256"] == sha256_file(smollm2_hf / "model.safetensors")
    assert m["quantization"]["bits"] == 4 and m["quantization"]["group_size"] == 64
    for name, entry in m["files"].items():
        assert sha256_file(mlx_q4 / name) == entry["sha256"]
        assert (mlx_q4 / name).stat().st_size == entry["size"]
    assert {"mlx", "mlx-lm", "mlx-ray"} <= set(m["versions"]) and all(m["versions"].values())
    assert m["created"].endswith("+00:00")
    assert "model.safetensors" in m["files"] and "tokenizer.json" in m["files"]
