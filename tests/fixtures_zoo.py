"""The model zoo: tiny random-weight checkpoints of the families users bring, written by transformers 5.

Each ``ZOO`` entry is a transformers config (hidden 64, 2 layers), built with
``AutoModelForCausalLM.from_config`` and saved with ``save_pretrained`` in
float32, so the directory is laid out exactly as transformers 5 writes it
(nested ``rope_parameters``, renamed fields, per-expert MoE tensors). The
vocabulary is the real SmolLM2 tokenizer's (49,152), whose files are copied
next to the weights, so the engine and Serve can template and tokenize.

Fixtures (session-scoped, built on first use):

* ``zoo_hf(arch)``: the HF directory of ``arch``;
* ``zoo_model(arch, quant=None)``: that model converted by ``mlx-ray convert``
  to float32 (``quant="q4"``: affine 4-bit, group 64);
* ``awq_qwen2_hf`` / ``awq_qwen2_model``: a qwen2 (q/k/v biases, hidden 128)
  written as an AutoAWQ GEMM checkpoint at group 128, and its conversion;
* ``hybrid_hf``: a qwen3_next (gated delta linear attention + full attention),
  whose mlx-lm cache is not a KV cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512, bos_token_id=1,
             eos_token_id=2, pad_token_id=None, tie_word_embeddings=False, initializer_range=0.08)
SLIDING_WINDOW = 8  # gemma3's sliding layers see 8 tokens: less than the test prompts
ZOO = {
    "llama": dict(rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
    "mistral": dict(head_dim=16),
    "phi3": dict(),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW,
                        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}
HYBRID = ("qwen3_next", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                             shared_expert_intermediate_size=64, linear_key_head_dim=16, linear_value_head_dim=16,
                             linear_num_key_heads=2, linear_num_value_heads=4,
                             layer_types=["linear_attention", "full_attention"]))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def copy_tokenizer(src: Path, out: Path) -> None:
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copyfile(src / f, out / f)


def tiny_config(model_type: str, **overrides):
    """A transformers config object of ``model_type``, small, with ``overrides`` applied."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](**{**SMALL, **overrides})


def write_transformers_model(out: Path, config, tokenizer_from: Path, seed: int = 0):
    """``from_config`` (random init, float32) + ``save_pretrained``; returns the torch model (eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(out)
    copy_tokenizer(tokenizer_from, out)
    return model


def torch_logits(model, ids: list[int]):
    """float32 logits ``[len(ids), vocab]`` of a transformers model, as numpy."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


class _Memo:
    """A session-wide {key: value} built on first request (fixtures that take an argument)."""

    def __init__(self, build):
        self.build, self.done = build, {}

    def __call__(self, *key):
        if key not in self.done:
            self.done[key] = self.build(*key)
        return self.done[key]


@pytest.fixture(scope="session")
def zoo_hf(tmp_path_factory, smollm2_hf):
    """``zoo_hf(arch) -> Path``: the transformers-5 HF directory of a ``ZOO`` architecture."""
    root = tmp_path_factory.mktemp("zoo_hf")

    def build(arch):
        out = root / f"tiny-{arch}"
        write_transformers_model(out, tiny_config(arch, **ZOO[arch]), smollm2_hf, seed=len(arch))
        return out

    return _Memo(build)


@pytest.fixture(scope="session")
def zoo_model(zoo_hf, tmp_path_factory):
    """``zoo_model(arch, quant=None) -> Path``: ``arch`` converted to float32, or ``quant="q4"`` (affine g64)."""
    from mlx_ray.conversion.convert import convert

    cache = tmp_path_factory.mktemp("zoo_cache")

    def build(arch, quant=None):
        if quant is None:
            return convert(str(zoo_hf(arch)), cache_dir=cache, quantize=False, dtype="float32", progress=False)
        assert quant == "q4", quant
        return convert(str(zoo_hf(arch)), cache_dir=cache, q_bits=4, q_group_size=64, progress=False)

    memo = _Memo(build)
    return lambda arch, quant=None: memo(arch, quant)


AWQ_GROUP = 128


@pytest.fixture(scope="session")
def awq_qwen2_hf(tmp_path_factory, smollm2_hf):
    """(AutoAWQ GEMM directory, {layer: (codes, zeros, fp16 scales)}) of a random qwen2 at hidden 128, group 128.

    q/k/v biases (qwen2 always has them), norms and embeddings stay as fp16
    tensors, as AutoAWQ writes them.
    """
    from test_awq import make_awq_checkpoint  # the AutoAWQ-format packer, independent of the converter

    root = tmp_path_factory.mktemp("awq_qwen2")
    cfg = tiny_config("qwen2", hidden_size=128, intermediate_size=256, num_attention_heads=4)
    model = write_transformers_model(root / "float", cfg, smollm2_hf, seed=11)
    tensors = {k: v.float().numpy() for k, v in model.state_dict().items()}  # untied: lm_head is its own
    config = json.loads((root / "float" / "config.json").read_text())
    truth = make_awq_checkpoint(tensors, config, root / "Qwen2-tiny-AWQ", AWQ_GROUP, tokenizer_from=smollm2_hf)
    return root / "Qwen2-tiny-AWQ", truth


@pytest.fixture(scope="session")
def awq_qwen2_model(awq_qwen2_hf, tmp_path_factory) -> Path:
    """``awq_qwen2_hf`` converted (repacked as-is: ``awq-q4-g128``); for serving tests too."""
    from mlx_ray.conversion.convert import convert

    return convert(str(awq_qwen2_hf[0]), cache_dir=tmp_path_factory.mktemp("awq_cache"), progress=False)


@pytest.fixture(scope="session")
def hybrid_hf(tmp_path_factory, smollm2_hf) -> Path:
    """A tiny qwen3_next (one gated-delta layer, one full-attention layer), as transformers 5 writes it."""
    model_type, kw = HYBRID
    out = tmp_path_factory.mktemp("hybrid") / f"tiny-{model_type}"
    write_transformers_model(out, tiny_config(model_type, **kw), smollm2_hf)
    return out
