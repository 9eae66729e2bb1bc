"""Every quantization mode / bits / group size, mixed recipes and dtypes, on a tiny random llama.

Each converted model is loaded with plain ``mlx_lm.load``. The oracle is the
float32 model whose weights went through ``mx.dequantize(mx.quantize(w))``
with the same parameters: the quantized model must reproduce its logits up to
float32 accumulation order. A wrong packing, a wrong per-layer config or a
layer left out would break that by orders of magnitude.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_ray.errors import BadRequest

IDS = [1, 510, 236, 712, 146, 260, 535, 30]


def _logits(path) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm.utils import load_model  # mlx_lm.load minus the (slow) tokenizer

    model, _ = load_model(path)
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def reference(tiny_llama_hf, tmp_path_factory):
    from mlx_ray.conversion.convert import convert

    root = tmp_path_factory.mktemp("qsweep")
    ref = convert(str(tiny_llama_hf), cache_dir=root, quantize=False, dtype="float32", progress=False)
    return root, _logits(ref)


def _rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _fake_quant_logits(ref_path, qpath) -> np.ndarray:
    """Logits of the f32 reference with each quantized layer's weight replaced by quantize->dequantize."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    qcfg = json.loads((qpath / "config.json").read_text())["quantization"]
    stored = {}
    for f in qpath.glob("model*.safetensors"):
        stored.update(mx.load(str(f)))
    model, _ = load_model(ref_path)
    n = 0
    for name, module in model.named_modules():
        if f"{name}.scales" not in stored:
            continue
        p = {**{k: qcfg[k] for k in ("group_size", "bits", "mode")}, **qcfg.get(name, {})}
        q = mx.quantize(module.weight, p["group_size"], p["bits"], mode=p["mode"])
        module.weight = mx.dequantize(*q, group_size=p["group_size"], bits=p["bits"], mode=p["mode"])
        n += 1
    assert n == 1 + 7 * 2  # embeddings (tied, used as lm_head) + 7 linears x 2 layers
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_affine_bits_by_group(reference, tiny_llama_hf, group):
    from mlx_ray.conversion.convert import convert

    root, ref = reference
    errors = {}
    for bits in (2, 3, 4, 5, 6, 8):
        path = convert(str(tiny_llama_hf), cache_dir=root, q_bits=bits, q_group_size=group, dtype="float32",
                       progress=False)
        assert path.name == f"q{bits}-g{group}-f32"
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["quantization"] == {"group_size": group, "bits": bits, "mode": "affine"}
        ours = _logits(path)
        assert _rel_err(ours, _fake_quant_logits(root / "TinyLlama-random" / "f32", path)) < 1e-4, bits
        errors[bits] = _rel_err(ours, ref)
    assert errors[8] < errors[4] < errors[2], errors  # more bits, closer to the float model


@pytest.mark.parametrize("mode,bits,group", [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
def test_fp_modes(reference, tiny_llama_hf, mode, bits, group):
    import mlx.core as mx

    from mlx_ray.conversion.convert import convert

    root, ref = reference
    path = convert(str(tiny_llama_hf), cache_dir=root, q_mode=mode, dtype="float32", progress=False)
    assert path.name == f"{mode}-f32"
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": group, "bits": bits, "mode": mode}
    w = mx.load(str(next(path.glob("model*.safetensors"))))
    assert w["model.layers.0.mlp.up_proj.scales"].dtype == mx.uint8  # fp modes keep 8-bit scales
    assert _rel_err(_logits(path), _fake_quant_logits(root / "TinyLlama-random" / "f32", path)) < 1e-4


def test_mixed_recipe_uses_more_bits_for_sensitive_layers(reference, tiny_llama_hf):
    from mlx_ray.conversion.convert import convert

    root, ref = reference
    path = convert(str(tiny_llama_hf), cache_dir=root, quant_recipe="mixed_4_6", dtype="float32", progress=False)
    assert path.name == "mixed_4_6-g64-f32"
    q = json.loads((path / "config.json").read_text())["quantization"]
    # mlx-lm's recipe with 2 layers: layer 1 is in the last eighth (sensitive), layer 0 is not.
    assert q["model.layers.1.self_attn.v_proj"]["bits"] == 6
    assert q["model.layers.1.mlp.down_proj"]["bits"] == 6
    assert q["model.layers.0.self_attn.v_proj"]["bits"] == 4
    assert q["model.layers.1.self_attn.q_proj"]["bits"] == 4
    assert q["model.embed_tokens"]["bits"] == 4
    assert _rel_err(_logits(path), _fake_quant_logits(root / "TinyLlama-random" / "f32", path)) < 1e-4


@pytest.mark.parametrize("dtype,tag", [("bfloat16", "bf16"), ("float16", "f16")])
def test_no_quantize_dtype(reference, tiny_llama_hf, dtype, tag):
    import mlx.core as mx

    from mlx_ray.conversion.convert import convert

    root, ref = reference
    path = convert(str(tiny_llama_hf), cache_dir=root, quantize=False, dtype=dtype, progress=False)
    assert path.name == tag
    dtypes = {v.dtype for f in path.glob("model*.safetensors") for v in mx.load(str(f)).values()}
    assert dtypes == {getattr(mx, dtype)}
    assert _rel_err(_logits(path), ref) < 0.05  # rounding the weights to 16 bits


@pytest.mark.parametrize("kw,msg", [
    ({"q_bits": 7}, "invalid --q-bits 7"),
    ({"q_group_size": 48}, "invalid --q-group-size 48"),
    ({"q_mode": "int4"}, "unknown --q-mode"),
    ({"q_mode": "nvfp4", "q_group_size": 32}, "nvfp4 needs --q-bits 4 --q-group-size 16"),
    ({"q_mode": "mxfp8", "q_bits": 6}, "mxfp8 needs --q-bits 8 --q-group-size 32"),
    ({"quant_recipe": "mixed_9_9"}, "unknown --quant-recipe"),
    ({"q_mode": "mxfp4", "quant_recipe": "mixed_4_6"}, "affine only"),
    ({"quantize": False, "dtype": "int8"}, "unsupported --dtype"),
])
def test_invalid_combinations_fail_before_any_work(tiny_llama_hf, tmp_path, kw, msg):
    from mlx_ray.conversion.convert import convert

    with pytest.raises(BadRequest, match=msg) as e:
        convert(str(tiny_llama_hf), cache_dir=tmp_path, progress=False, **kw)
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())


def test_invalid_combination_cli_exit_code(tiny_llama_hf, tmp_path):
    from fixtures_convert import run_cli

    r = run_cli("convert", str(tiny_llama_hf), "--cache-dir", str(tmp_path), "--q-mode", "mxfp4",
                "--q-group-size", "64")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "mxfp4 needs --q-bits 4 --q-group-size 32" in r.stderr
    assert "Traceback" not in r.stderr


def test_moe_experts_split_across_shards(smollm2_hf, tmp_path):
    """Mixtral stacks its experts in sanitize; with experts spread over 5 shards the result
    must equal mlx-lm loading the whole source at once."""
    import mlx.core as mx
    from fixtures_convert import save_hf_dir, tiny_llama_config, tiny_llama_tensors
    from mlx_lm.utils import load_model

    from mlx_ray.conversion.convert import convert

    cfg = tiny_llama_config(vocab=1024)
    cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
               num_experts_per_tok=2)
    t = tiny_llama_tensors(cfg)
    rng = np.random.default_rng(1)
    for n in range(2):
        p = f"model.layers.{n}."
        for k in ("gate_proj", "up_proj", "down_proj"):
            del t[f"{p}mlp.{k}.weight"]
        t[p + "block_sparse_moe.gate.weight"] = rng.standard_normal((4, 128), dtype=np.float32) * 0.1
        for e in range(4):
            for w, shape in (("w1", (256, 128)), ("w3", (256, 128)), ("w2", (128, 256))):
                t[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = rng.standard_normal(shape, dtype=np.float32) * .08
    src = save_hf_dir(tmp_path / "TinyMixtral", cfg, t, shards=5, dtype="float32", tokenizer_from=smollm2_hf)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({index[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in range(4)} |
               {index[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"] for e in range(4)}) > 1

    out = convert(str(src), cache_dir=tmp_path / "c", quantize=False, dtype="float32", progress=False)
    ref_model, _ = load_model(src, model_config={"rope_theta": cfg["rope_parameters"]["rope_theta"]})
    ours, _ = load_model(out)
    ids = mx.array([IDS])
    np.testing.assert_array_equal(np.array(ours(ids)), np.array(ref_model(ids)))
    q = convert(str(src), cache_dir=tmp_path / "c", q_bits=4, progress=False, verify=True)
    qmap = json.loads((q / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.block_sparse_moe.switch_mlp.up_proj.scales" in qmap  # stacked experts quantized
