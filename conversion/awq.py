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
private helper (``mlx_lm.utils._transform_awq_weights``); this one is numpy,
works on one layer at a time for the shard streamer, and is documented and
tested against a packer written from the AutoAWQ format.
"""

from __future__ import annotations

import numpy as np

from mlx_ray.errors import BadRequest

ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])      # AutoAWQ: nibble i <- column ORDER[i]
UNORDER = np.argsort(ORDER)                      # column c <- nibble UNORDER[c] = [0, 4, 1, 5, 2, 6, 3, 7]
MLX_GROUPS = (32, 64, 128)
SUFFIXES = (".qweight", ".qzeros", ".scales")


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


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """int32 ``[r, c/8]`` in AutoAWQ order -> uint8 codes ``[r, c]``."""
    p = packed.view(np.uint32)
    shifts = (UNORDER * 4).astype(np.uint32)
    return ((p[..., None] >> shifts) & 0xF).astype(np.uint8).reshape(p.shape[0], -1)


def pack_mlx(codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``[r, c]`` -> MLX uint32 ``[r, c/8]`` (little-endian nibbles)."""
    c = codes.astype(np.uint32).reshape(codes.shape[0], -1, 8)
    return (c << (np.arange(8, dtype=np.uint32) * 4)).sum(axis=-1, dtype=np.uint32)


def repack_layer(qweight: np.ndarray, qzeros: np.ndarray | None, scales: np.ndarray, group_size: int):
    """One AWQ layer -> (weight uint32 [out, in/8], scales [out, in/g], biases [out, in/g])."""
    codes = unpack_awq(qweight).T                  # [out, in]
    s = np.ascontiguousarray(scales.T)             # [out, in/g], same bits
    if codes.shape[1] != s.shape[1] * group_size:
        raise BadRequest(f"AWQ layer shape {qweight.shape} does not match scales {scales.shape} at group "
                         f"size {group_size}")
    z = unpack_awq(qzeros).T if qzeros is not None else np.full(s.shape, 8, np.uint8)
    biases = (-(z.astype(np.float32)) * s.astype(np.float32)).astype(s.dtype)
    return pack_mlx(codes), s, biases


def dequantize_layer(qweight, qzeros, scales, group_size: int) -> np.ndarray:
    """AWQ's own dequantization ``(q - z) * s`` in float32, as ``[out, in]`` (reference / fallback path)."""
    q = unpack_awq(qweight).astype(np.float32)     # [in, out]
    z = unpack_awq(qzeros).astype(np.float32) if qzeros is not None else np.full(scales.shape, 8, np.float32)
    s = scales.astype(np.float32)
    w = (q - np.repeat(z, group_size, axis=0)) * np.repeat(s, group_size, axis=0)
    return np.ascontiguousarray(w.T)


def split_ready(weights: dict, zero_point: bool = True) -> tuple[dict, dict]:
    """Split off AWQ tensors whose layer is incomplete here (its other parts are in a later shard)."""
    need = ("qweight", "scales") + (("qzeros",) if zero_point else ())
    pending = {}
    for prefix in {k.rsplit(".", 1)[0] for k in weights if k.endswith(SUFFIXES)}:
        if not all(f"{prefix}.{n}" in weights for n in need):
            for n in ("qweight", "qzeros", "scales"):
                if f"{prefix}.{n}" in weights:
                    pending[f"{prefix}.{n}"] = weights.pop(f"{prefix}.{n}")
    return weights, pending


def transform(weights: dict, cfg: dict, to_numpy, from_numpy, *, requantize=None):
    """Replace every complete AWQ layer in ``weights`` by MLX tensors (in place; returns the dict).

    ``requantize(prefix, float32 [out, in]) -> dict`` is used instead of the exact
    repack when MLX cannot represent the group size (or the caller wants floats).
    """
    g = cfg["group_size"]
    for k in [k for k in weights if k.endswith(".qweight")]:
        prefix = k[: -len(".qweight")]
        if f"{prefix}.g_idx" in weights:
            raise BadRequest(f"{prefix} has g_idx (act-order); such checkpoints cannot be repacked")
        qw = to_numpy(weights.pop(k))
        qz = weights.pop(f"{prefix}.qzeros", None)
        qz = to_numpy(qz) if qz is not None and cfg["zero_point"] else None
        sc = to_numpy(weights.pop(f"{prefix}.scales"))
        if requantize is None and g in MLX_GROUPS:
            w, s, b = repack_layer(qw, qz, sc, g)
            weights[f"{prefix}.weight"] = from_numpy(w)
            weights[f"{prefix}.scales"] = from_numpy(s)
            weights[f"{prefix}.biases"] = from_numpy(b)
        else:
            weights.update(requantize(prefix, dequantize_layer(qw, qz, sc, g)))
    return weights
