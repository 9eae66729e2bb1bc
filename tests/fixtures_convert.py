"""Tiny random-weight HF checkpoints for fast conversion tests (and the memory bench).

``write_tiny_llama`` writes an ordinary transformers-5 style directory (nested
``rope_parameters``, bf16 safetensors, optionally split into several shards
with an index), reusing the real fixture's tokenizer files so that mlx-lm can
load the converted result.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def tiny_llama_config(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=49152, tie=True,
                      rope_theta=50000.0) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads, "intermediate_size": intermediate, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": tie,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"}, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def tiny_llama_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 numpy tensors with HF names, scaled so the forward pass stays finite."""
    rng = np.random.default_rng(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(o, i):
        return (rng.standard_normal((o, i), dtype=np.float32) / np.sqrt(i)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(v, h) * 4, "model.norm.weight": np.ones(h, np.float32)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t.update({
            p + "self_attn.q_proj.weight": w(q_out, h), p + "self_attn.k_proj.weight": w(kv_out, h),
            p + "self_attn.v_proj.weight": w(kv_out, h), p + "self_attn.o_proj.weight": w(h, q_out),
            p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
        })
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = w(v, h)
    return t


def save_hf_dir(out: Path, cfg: dict, tensors: dict, *, shards: int = 1, dtype: str = "bfloat16",
                tokenizer_from: Path | None = None) -> Path:
    """Write ``tensors`` as an HF checkpoint in ``shards`` safetensors files (via torch for bf16)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tdtype = getattr(torch, dtype)
    names = sorted(tensors)  # contiguous chunks in key order, as transformers shards
    per = -(-len(names) // shards)
    groups = [names[i:i + per] for i in range(0, len(names), per)]
    shards = len(groups)
    weight_map = {}
    for i, g in enumerate(groups):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {}
        for k in g:
            arr = tensors[k]
            part[k] = torch.from_numpy(np.ascontiguousarray(arr)).to(tdtype) if arr.dtype.kind == "f" \
                else torch.from_numpy(np.ascontiguousarray(arr))
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in g})
    if shards > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_from is not None:
        for f in TOKENIZER_FILES:
            if (tokenizer_from / f).exists():
                shutil.copyfile(tokenizer_from / f, out / f)
    return out


def write_tiny_llama(out: Path, tokenizer_from: Path, *, shards: int = 1, seed: int = 0, **cfg_kw) -> Path:
    cfg = tiny_llama_config(**cfg_kw)
    return save_hf_dir(out, cfg, tiny_llama_tensors(cfg, seed), shards=shards, tokenizer_from=tokenizer_from)


@pytest.fixture(scope="session")
def tiny_llama_hf(tmp_path_factory, smollm2_hf) -> Path:
    """A 2-layer random llama (hidden 128, vocab 1024) in 3 shards, transformers-5 config layout."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "TinyLlama-random", smollm2_hf, shards=3, vocab=1024)


def run_cli(*argv: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``mlx-ray ARGV`` in a fresh interpreter (real exit codes and stderr)."""
    return subprocess.run([sys.executable, "-m", "mlx_ray.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=timeout)


def can_unshare() -> bool:
    """Whether this process may create a private mount namespace (to mount tmpfs / read-only binds)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode == 0
