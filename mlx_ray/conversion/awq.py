"""AutoAWQ (GEMM) 4-bit checkpoints -> MLX affine 4-bit, without a float round trip.

AutoAWQ GEMM layout, per linear layer ``prefix``:

* ``qweight`` int32 ``[in, out/8]``: 8 nibbles per word; nibble ``i`` holds
  output column ``8*j + ORDER[i]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``;
* ``qzeros``  int32 ``[in/g, out/8]``, packed the same way;
* ``scales``  fp16  ``[in/g, out]``;
* dequantized weight ``W[i, o] = (q[i, o] - z[i/g, o]) * s[i/g, o]``.

MLX affine: ``weight`` uint32 ``[out, in/8]`` (nibble ``k`` of word ``j`` is
input ``8*j + k``), ``scales``/``biases`` ``[out, in/g]``, ``W = q*scale + bias``.

The codes and the scales move over bit for bit (integer shuffles and a
transpose). ``bias = -z * s`` is computed exactly in float32 (a 4-bit integer
times an 11-bit mantissa fits in 24 bits) and rounded once to the scales'
dtype, so it is within half an ulp of the exact value. mlx-lm has a similar
private helper (``mlx_lm.utils._transform_awq_weights``, which also recasts
every tensor); this one validates the layout, falls back to floats where MLX
lacks the group size, and is tested against a packer written from the AutoAWQ
format. All of it is lazy MLX ops: a layer is read only when written out.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_ray.errors import BadRequest, CorruptModel

from .quant import AFFINE_GROUPS

ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])      # AutoAWQ: nibble i <- column ORDER[i]
UNORDER = np.argsort(ORDER)                      # column c <- nibble UNORDER[c] = [0, 4, 1, 5, 2, 6, 3, 7]
MLX_GROUPS = AFFINE_GROUPS  # the group sizes MLX affine quantization supports


def awq_config(config: dict) -> dict | None:
    """The AWQ quantization_config of a checkpoint, validated, or None for a non-AWQ model."""
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not qc or str(qc.get("quant_method", "")).lower() != "awq":
        return None
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise BadRequest(f"AWQ version {version!r} is not supported; only AutoAWQ GEMM checkpoints can be repacked")
    if int(qc.get("bits", qc.get("w_bit", 4))) != 4:
        raise BadRequest(f"AWQ with {qc.get('bits')} bits is not supported; only 4-bit AWQ")
    return {"bits": 4, "group_size": int(qc.get("group_size", qc.get("q_group_size", 128))),
            "zero_point": bool(qc.get("zero_point", True))}


def unpack_awq(packed: mx.array) -> mx.array:
    """int32 ``[r, c/8]`` in AutoAWQ order -> uint32 codes ``[r, c]``."""
    p = packed.view(mx.uint32)
    shifts = mx.array(UNORDER * 4, dtype=mx.uint32)
    return ((p[..., None] >> shifts) & 0xF).reshape(p.shape[0], -1)


def pack_mlx(codes: mx.array) -> mx.array:
    """uint32 codes ``[r, c]`` -> MLX uint32 ``[r, c/8]`` (nibble k of word j = column 8j+k)."""
    c = codes.astype(mx.uint32).reshape(codes.shape[0], -1, 8)
    out = c[..., 0]
    for k in range(1, 8):
        out = out | (c[..., k] << k * 4)
    return out


def repack_layer(qweight: mx.array, qzeros: mx.array | None, scales: mx.array, group_size: int):
    """One AWQ layer -> (weight uint32 [out, in/8], scales [out, in/g], biases [out, in/g]); lazy MLX ops."""
    codes = unpack_awq(qweight).T                  # [out, in]
    s = mx.contiguous(scales.T)                    # [out, in/g], same bits
    if codes.shape[1] != s.shape[1] * group_size:
        raise BadRequest(f"AWQ layer shape {tuple(qweight.shape)} does not match scales {tuple(scales.shape)} "
                         f"at group size {group_size}")
    z = unpack_awq(qzeros).T if qzeros is not None else mx.full(s.shape, 8, mx.uint32)
    biases = (-(z.astype(mx.float32)) * s.astype(mx.float32)).astype(s.dtype)  # exact product, one rounding
    return pack_mlx(codes), s, biases


def dequantize_layer(qweight: mx.array, qzeros: mx.array | None, scales: mx.array, group_size: int) -> mx.array:
    """AWQ's own dequantization ``(q - z) * s`` in float32, as ``[out, in]`` (fallback path)."""
    q = unpack_awq(qweight).astype(mx.float32)     # [in, out]
    s = scales.astype(mx.float32)
    z = unpack_awq(qzeros).astype(mx.float32) if qzeros is not None else mx.full(s.shape, 8.0)
    w = (q - mx.repeat(z, group_size, axis=0)) * mx.repeat(s, group_size, axis=0)
    return mx.contiguous(w.T)


def transform(weights: dict, cfg: dict, *, exact: bool = True) -> dict:
    """Replace every AWQ layer in ``weights`` by MLX tensors, lazily (nothing is read until evaluated).

    ``exact``: repack codes/scales/biases as they are; otherwise (a group size MLX
    lacks, or --no-quantize) put AWQ's dequantized float32 weight in their place.
    """
    g = cfg["group_size"]
    for k in [k for k in weights if k.endswith(".qweight")]:
        prefix = k[: -len(".qweight")]
        if f"{prefix}.g_idx" in weights:
            raise BadRequest(f"{prefix} has g_idx (act-order); such checkpoints cannot be repacked")
        if f"{prefix}.scales" not in weights:
            raise CorruptModel(f"AWQ layer {prefix} has qweight but no scales; the checkpoint is incomplete")
        qw = weights.pop(k)
        qz = weights.pop(f"{prefix}.qzeros", None)
        qz = qz if cfg["zero_point"] else None
        sc = weights.pop(f"{prefix}.scales")
        if exact:
            w, s, b = repack_layer(qw, qz, sc, g)
            weights.update({f"{prefix}.weight": w, f"{prefix}.scales": s, f"{prefix}.biases": b})
        else:
            weights[f"{prefix}.weight"] = dequantize_layer(qw, qz, sc, g)
    return weights
