"""AutoAWQ GEMM checkpoints are repacked into MLX affine 4-bit without a float round trip.

The test writes its own AWQ checkpoint of the real fixture with a packer
written from the AutoAWQ format (``WQLinear_GEMM.from_linear`` and the
zero-point pseudo-quantizer of ``auto_awq``), independent of the converter's
unpacker. What "exact" means (FACTS.md): the 4-bit codes and the fp16 scales
are identical bit for bit; the bias ``-z*s`` is rounded once to fp16, so it is
within one fp16 ulp of the exact value, and the repacked weights dequantize to
AWQ's ``(q - z) * s`` within that same bound.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]     # AutoAWQ's order_map for 4 bits
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def awq_pseudo_quantize(w: np.ndarray, group: int):
    """auto_awq's zero-point quantizer on ``w [out, in]``: codes [out, in], zeros and fp16 scales [out, in/g]."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group).astype(np.float32)
    mx_, mn = g.max(-1), g.min(-1)
    scales = (np.maximum(mx_ - mn, 1e-5) / 15).astype(np.float16)
    s = scales.astype(np.float32)
    zeros = np.clip(-np.round(mn / s), 0, 15)
    codes = np.clip(np.round(g / s[..., None]) + zeros[..., None], 0, 15)
    return codes.reshape(out_f, in_f).astype(np.int32), zeros.astype(np.int32), scales


def awq_pack(intweight_in_out: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM packing of ``[rows, cols]`` ints: word ``j`` nibble ``i`` <- column ``8j + ORDER[i]``."""
    rows, cols = intweight_in_out.shape
    w = intweight_in_out.astype(np.uint32)
    packed = np.zeros((rows, cols // 8), dtype=np.uint32)
    for i in range(8):  # AutoAWQ loops over word columns too; every word at once here
        packed |= w[:, AWQ_ORDER[i]::8] << np.uint32(4 * i)
    return packed.view(np.int32)


def make_awq_checkpoint(src_tensors: dict, config: dict, out, group: int, tokenizer_from=None):
    """Write an AutoAWQ-GEMM checkpoint; returns {layer: (codes [out,in], zeros [out,in/g], scales16 [out,in/g])}."""
    import shutil

    from safetensors.numpy import save_file

    out.mkdir(parents=True)
    tensors, truth = {}, {}
    for k, v in src_tensors.items():
        prefix = k[: -len(".weight")]
        if k.endswith(".weight") and prefix.endswith(LINEARS):
            codes, zeros, scales = awq_pseudo_quantize(v, group)
            tensors[f"{prefix}.qweight"] = awq_pack(codes.T)              # [in, out/8]
            tensors[f"{prefix}.qzeros"] = awq_pack(zeros.T)               # [in/g, out/8]
            tensors[f"{prefix}.scales"] = np.ascontiguousarray(scales.T)  # [in/g, out] fp16
            truth[prefix] = (codes, zeros, scales)
        else:
            tensors[k] = v.astype(np.float16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(config, dtype="float16")
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": None}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            if (tokenizer_from / f).exists():
                shutil.copyfile(tokenizer_from / f, out / f)
    return truth


def _fixture_tensors(hf_dir) -> dict:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def awq_fixture(smollm2_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("awq")
    src = _fixture_tensors(smollm2_hf)
    config = json.loads((smollm2_hf / "config.json").read_text())
    # SmolLM2's hidden size 576 is a multiple of 64, not of 128.
    truth = make_awq_checkpoint(src, config, root / "SmolLM2-135M-Instruct-AWQ", 64, tokenizer_from=smollm2_hf)
    return root, root / "SmolLM2-135M-Instruct-AWQ", truth


def _mlx_codes(w_u32: np.ndarray) -> np.ndarray:
    """MLX affine 4-bit: nibble k of word j is input 8j+k."""
    shifts = np.arange(8, dtype=np.uint32) * 4
    return ((w_u32[..., None] >> shifts) & 0xF).reshape(w_u32.shape[0], -1)


def test_awq_repack_is_exact(awq_fixture):
    import mlx.core as mx

    from mlx_ray.conversion.convert import convert

    root, awq_dir, truth = awq_fixture
    path = convert(str(awq_dir), cache_dir=root / "cache", progress=False)
    assert path.name == "awq-q4-g64"
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert cfg["rope_theta"] == 100000.0
    w = {}
    for f in path.glob("model*.safetensors"):
        w.update(mx.load(str(f)))
    assert len(truth) == 30 * 7
    worst_bias_ulps = 0.0
    for prefix, (codes, zeros, scales) in truth.items():
        weight, s, b = (np.array(w[f"{prefix}.{n}"]) for n in ("weight", "scales", "biases"))
        assert weight.dtype == np.uint32 and s.dtype == np.float16 and b.dtype == np.float16
        np.testing.assert_array_equal(_mlx_codes(weight), codes)                 # codes: bit for bit
        np.testing.assert_array_equal(s.view(np.uint16), scales.view(np.uint16))  # scales: bit for bit
        exact_bias = -zeros.astype(np.float64) * scales.astype(np.float64)
        ulp = np.spacing(np.abs(exact_bias).astype(np.float16)).astype(np.float64)
        err = np.abs(b.astype(np.float64) - exact_bias)
        assert np.all(err <= ulp), prefix                                        # bias: within one ulp
        worst_bias_ulps = max(worst_bias_ulps, float((err / ulp).max()))
        # Dequantized with MLX (in float32 so no output rounding) vs AWQ's (q - z) * s.
        deq = np.array(mx.dequantize(w[f"{prefix}.weight"], w[f"{prefix}.scales"].astype(mx.float32),
                                     w[f"{prefix}.biases"].astype(mx.float32), group_size=64, bits=4))
        g = codes.shape[1] // scales.shape[1]
        awq_deq = (codes - np.repeat(zeros, g, 1)).astype(np.float64) * np.repeat(scales, g, 1).astype(np.float64)
        bound = np.repeat(ulp, g, 1) + np.abs(awq_deq) * 2 ** -23
        assert np.all(np.abs(deq - awq_deq) <= bound), prefix
    assert worst_bias_ulps <= 0.5  # one rounding to nearest: at most half an ulp in fact


def test_awq_model_runs_like_its_dequantized_float_twin(awq_fixture, mlx_f32):
    """The repacked model's logits match the f32 fixture model holding AWQ's dequantized weights.

    The fp16 scales/biases are widened to float32 (losslessly) before the forward:
    MLX's CPU quantized matmul in fp16 takes minutes for a few tokens here.
    """
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import load_model

    from mlx_ray.conversion.convert import convert

    root, awq_dir, truth = awq_fixture
    twin, _ = load_model(mlx_f32)
    dequantized = []
    for prefix, (codes, zeros, scales) in truth.items():
        g = codes.shape[1] // scales.shape[1]
        w = (codes - np.repeat(zeros, g, 1)) * np.repeat(scales.astype(np.float32), g, 1)
        dequantized.append((f"{prefix}.weight", mx.array(w)))
    twin.update(tree_unflatten(dequantized))
    awq_path = root / "cache" / "SmolLM2-135M-Instruct-AWQ" / "awq-q4-g64"
    if not awq_path.exists():
        awq_path = convert(str(awq_dir), cache_dir=root / "cache", progress=False)
    awq_model, _ = load_model(awq_path)
    awq_model.set_dtype(mx.float32)
    ids = mx.array([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 216, 378, 3458, 282]])
    a = np.array(twin(ids)[0])
    b = np.array(awq_model(ids)[0])
    assert (a.argmax(-1) == b.argmax(-1)).all()
    assert np.abs(a - b).max() < 1e-2 * np.abs(a).max()   # only the fp16 bias rounding differs


def test_awq_no_quantize_and_unsupported_group_fall_back_to_floats(smollm2_hf, tmp_path):
    """--no-quantize dequantizes; a group size MLX lacks (256) dequantizes then requantizes."""
    import mlx.core as mx
    from fixtures_convert import tiny_llama_config, tiny_llama_tensors
    from mlx_lm.utils import load_model

    from mlx_ray.conversion.convert import convert

    cfg = tiny_llama_config(hidden=256, intermediate=512, vocab=1024)
    truth = make_awq_checkpoint(tiny_llama_tensors(cfg), cfg, tmp_path / "TinyAWQ", 256, tokenizer_from=smollm2_hf)
    f16 = convert(str(tmp_path / "TinyAWQ"), cache_dir=tmp_path / "c", quantize=False, progress=False)
    assert f16.name == "f16"
    w = mx.load(str(f16 / "model.safetensors"))
    codes, zeros, scales = truth["model.layers.0.mlp.up_proj"]
    awq_deq = (codes - np.repeat(zeros, 256, 1)) * np.repeat(scales.astype(np.float32), 256, 1)
    np.testing.assert_array_equal(np.array(w["model.layers.0.mlp.up_proj.weight"]), awq_deq.astype(np.float16))
    q4 = convert(str(tmp_path / "TinyAWQ"), cache_dir=tmp_path / "c", progress=False)
    assert q4.name == "q4-g64"
    assert json.loads((q4 / "config.json").read_text())["quantization"]["group_size"] == 64
    model, _ = load_model(q4)
    assert np.isfinite(np.array(model(mx.array([[1, 2, 3]])).astype(mx.float32))).all()


def test_awq_rejects_conflicting_quantization_and_other_prequantized(awq_fixture, tmp_path):
    import shutil

    from mlx_ray.conversion.convert import convert
    from mlx_ray.errors import BadRequest

    _, awq_dir, _ = awq_fixture
    with pytest.raises(BadRequest, match="repacked as-is .* drop --q-bits 8"):
        convert(str(awq_dir), cache_dir=tmp_path, q_bits=8, progress=False)
    gptq = tmp_path / "gptq"
    shutil.copytree(awq_dir, gptq)
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (gptq / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadRequest, match=r"already quantized \(gptq\)"):
        convert(str(gptq), cache_dir=tmp_path / "c", progress=False)


def test_quantized_embeddings_shrink_the_awq_model_and_keep_its_answers(awq_fixture, mlx_f32):
    """--quantize-embeddings: embed_tokens (tied: also the output layer) at 4-bit group 64; the parity figure.

    Teacher-forced on the parity prompts' tokens, against the same AWQ model with fp16 embeddings:
    top-1 agreement and the largest logit difference (the figure the README quotes).
    """
    import mlx.core as mx

    from mlx_ray.conversion.convert import convert
    from mlx_ray.engine import memory
    from mlx_ray.engine.loader import load

    root, awq_dir, _ = awq_fixture
    plain = convert(str(awq_dir), cache_dir=root / "qe", progress=False)
    qemb = convert(str(awq_dir), cache_dir=root / "qe", progress=False, quantize_embeddings=True)
    assert qemb.name.endswith("-qembed")
    cfg = json.loads((qemb / "config.json").read_text())
    assert cfg["quantization"]["model.embed_tokens"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    (p_all, p_emb), (q_all, q_emb) = memory.mapped_bytes(plain), memory.mapped_bytes(qemb)
    assert p_emb > 0 and q_emb == 0
    assert p_all - q_all == pytest.approx(p_emb * (1 - 0.5625 / 2), rel=1e-3)  # fp16 -> 4 bits + fp16 scale, bias / 64
    a, tok, _ = load(str(plain))  # the engine's loader: mlx-ray's CPU quantized kernels (MLX's own is slow here)
    b, _, _ = load(str(qemb))
    text = "The capital of France is Paris. The quick brown fox jumps over the lazy dog. " * 2
    ids = mx.array([tok.encode(text)])
    la, lb = a(ids)[0].astype(mx.float32), b(ids)[0].astype(mx.float32)
    agree = float(mx.mean(mx.argmax(la, -1) == mx.argmax(lb, -1)).item())
    diff = float(mx.max(mx.abs(la - lb)).item())
    print(f"quantized embeddings vs fp16 (AWQ fixture, {ids.shape[1]} tokens): top-1 agreement {agree:.3f}, "
          f"max |logit diff| {diff:.3f}")
    assert agree >= 0.9
    with pytest.raises(Exception, match="applies to AWQ checkpoints"):
        convert(str(awq_dir), cache_dir=root / "qe", progress=False, quantize=False, quantize_embeddings=True)
