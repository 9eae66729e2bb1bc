"""config.json normalization: transformers-5 nested RoPE settings reach mlx-lm's top-level fields."""

from __future__ import annotations

import pytest

from mlx_ray.conversion.hfconfig import model_classes, normalize_config
from mlx_ray.errors import BadRequest


def test_default_rope_theta_is_lifted_and_nested_kept():
    cfg = normalize_config({"model_type": "llama", "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}})
    assert cfg["rope_theta"] == 1e5
    assert cfg["rope_parameters"] == {"rope_theta": 1e5, "rope_type": "default"}  # some mlx-lm models read it
    assert "rope_scaling" not in cfg


def test_scaled_rope_becomes_rope_scaling_that_mlx_lm_uses():
    from mlx_lm.models.rope_utils import Llama3RoPE

    rp = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "intermediate_size": 128, "vocab_size": 32, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072, "rope_parameters": rp}
    cfg = normalize_config(base)
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
    model_cls, args_cls = model_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    rope = model.model.layers[0].self_attn.rope
    assert isinstance(rope, Llama3RoPE)
    # Without normalization mlx-lm silently builds the default RoPE at theta 10000.
    plain = model_cls(args_cls.from_dict(base)).model.layers[0].self_attn.rope
    assert not isinstance(plain, Llama3RoPE)


def test_per_layer_type_rope_and_partial_rotary():
    cfg = normalize_config({"model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
        "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}})
    assert cfg["rope_theta"] == 1e6 and cfg["rope_local_base_freq"] == 1e4
    assert cfg["rope_scaling"]["type"] == "linear" and cfg["rope_scaling"]["factor"] == 8.0
    cfg = normalize_config({"model_type": "phi3", "rope_parameters": {"rope_theta": 1e4,
                                                                      "partial_rotary_factor": 0.5}})
    assert cfg["partial_rotary_factor"] == 0.5


def test_existing_top_level_values_win_and_text_config_is_normalized():
    cfg = normalize_config({"model_type": "llama", "rope_theta": 3.0, "rope_parameters": {"rope_theta": 7.0},
                            "text_config": {"rope_parameters": {"rope_theta": 9.0}}})
    assert cfg["rope_theta"] == 3.0 and cfg["text_config"]["rope_theta"] == 9.0


def test_unknown_model_type_is_a_bad_request():
    with pytest.raises(BadRequest, match="unsupported architecture Foo .*'foo'.*llama"):
        model_classes({"model_type": "foo", "architectures": ["Foo"]})
    with pytest.raises(BadRequest, match="no model_type"):
        model_classes({"architectures": ["Foo"]})
