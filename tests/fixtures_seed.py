"""The seed's model at its real shapes: Qwen/Qwen2.5-32B-Instruct-AWQ's config, with random AWQ weights for a few layers.

Every matrix, group size and the vocabulary are the real ones (hidden 5120,
40 query and 8 KV heads of 128, intermediate 27648, vocabulary 152,064,
untied fp16 embeddings, AWQ GEMM 4-bit group 128); only the layer count is
cut, from 64 to ``SEED_LAYERS``. The weights are random (nothing here can
download the real ones); the tokenizer, with its BOS/EOS ids, is the SmolLM2
fixture's (its ids are all below the seed's vocabulary), so the text is
noise and the shapes are what the Mac will run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

# config.json of Qwen/Qwen2.5-32B-Instruct-AWQ, as published
SEED_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 27648,
    "max_position_embeddings": 32768, "max_window_layers": 64, "model_type": "qwen2", "num_attention_heads": 40,
    "num_hidden_layers": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
    "quantization_config": {"bits": 4, "group_size": 128, "modules_to_not_convert": None, "quant_method": "awq",
                            "version": "gemm", "zero_point": True},
}
SEED_LAYERS = 2


def _small_f16(rng, shape) -> np.ndarray:
    """Random fp16 values of magnitude 2^-7..2^-6 with random signs, built from bits; a matrix of more than
    4,096 rows repeats a random block of 4,096 rows (the 778 M values of an embedding: 8 s less to write)."""
    rows = min(shape[0], 4096)
    bits = rng.integers(0, 1 << 16, size=(rows, *shape[1:]), dtype=np.uint16)
    block = ((bits & np.uint16(0x83FF)) | np.uint16(0x2000)).view(np.float16)
    if rows == shape[0]:
        return block
    return np.tile(block, (-(-shape[0] // rows),) + (1,) * (len(shape) - 1))[:shape[0]]


def write_seed_awq(out: Path, tokenizer_from: Path, layers: int = SEED_LAYERS, seed: int = 0) -> Path:
    """An AutoAWQ-GEMM checkpoint with the seed's shapes and ``layers`` random layers."""
    from safetensors.numpy import save_file

    c = SEED_CONFIG
    h, inter, g = c["hidden_size"], c["intermediate_size"], c["quantization_config"]["group_size"]
    q_out, kv_out = c["num_attention_heads"] * 128, c["num_key_value_heads"] * 128
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)

    def awq_linear(prefix: str, out_f: int, in_f: int, bias: bool = False) -> dict:
        t = {  # AutoAWQ GEMM layout: qweight [in, out/8], qzeros [in/g, out/8] (8 nibbles a word), scales [in/g, out]
            f"{prefix}.qweight": rng.integers(0, 1 << 32, size=(in_f, out_f // 8), dtype=np.uint32).view(np.int32),
            f"{prefix}.qzeros": np.full((in_f // g, out_f // 8), 0x88888888, dtype=np.uint32).view(np.int32),
            f"{prefix}.scales": np.full((in_f // g, out_f), 0.002, dtype=np.float16),
        }
        if bias:
            t[f"{prefix}.bias"] = _small_f16(rng, (out_f,))
        return t

    for i in range(layers):
        p, t = f"model.layers.{i}", {}
        t.update(awq_linear(f"{p}.self_attn.q_proj", q_out, h, bias=True))
        t.update(awq_linear(f"{p}.self_attn.k_proj", kv_out, h, bias=True))
        t.update(awq_linear(f"{p}.self_attn.v_proj", kv_out, h, bias=True))
        t.update(awq_linear(f"{p}.self_attn.o_proj", h, q_out))
        t.update(awq_linear(f"{p}.mlp.gate_proj", inter, h))
        t.update(awq_linear(f"{p}.mlp.up_proj", inter, h))
        t.update(awq_linear(f"{p}.mlp.down_proj", h, inter))
        t[f"{p}.input_layernorm.weight"] = np.ones(h, np.float16)
        t[f"{p}.post_attention_layernorm.weight"] = np.ones(h, np.float16)
        save_file(t, str(out / f"model-layer{i:02d}.safetensors"), metadata={"format": "pt"})
    save_file({"model.embed_tokens.weight": _small_f16(rng, (c["vocab_size"], h))},
              str(out / "model-embed.safetensors"), metadata={"format": "pt"})
    save_file({"lm_head.weight": _small_f16(rng, (c["vocab_size"], h)), "model.norm.weight": np.ones(h, np.float16)},
              str(out / "model-head.safetensors"), metadata={"format": "pt"})
    tok = json.loads((tokenizer_from / "config.json").read_text())  # the tokenizer's own special ids
    (out / "config.json").write_text(json.dumps({**c, "num_hidden_layers": layers, "bos_token_id": tok["bos_token_id"],
                                                 "eos_token_id": tok["eos_token_id"]}, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_from / f).exists():
            shutil.copyfile(tokenizer_from / f, out / f)
    return out


@pytest.fixture(scope="session")
def seed_awq(tmp_path_factory, smollm2_hf):
    """The seed-shaped AWQ checkpoint (about 3.7 GB; removed at the session's end)."""
    root = tmp_path_factory.mktemp("seed_awq")
    path = write_seed_awq(root / "Qwen2.5-32B-Instruct-AWQ-2layers", smollm2_hf)
    yield path
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def seed_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed_cache")
    yield root
    shutil.rmtree(root, ignore_errors=True)
