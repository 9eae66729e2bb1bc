"""Skinny-batch affine quantized matmul for Metal: ``x @ dequantize(w).T`` for 2 <= M <= 32 rows.

Batched decode multiplies a few rows of activations by every weight matrix.
MLX's Metal dispatch streams the weights again per 5-row tile (``qmv_wide``,
M < 13) or runs 32-row ``qmm_splitk`` tiles well below bandwidth (M >= 13).
``skinny_qmm.metal`` reads each weight word once per call and applies it,
dequantized once, to all M rows (see the .metal file and mlx_ray/kernels/README.md).

Contract (kernel and twin alike): ``fn(x, w, scales, biases, group_size=64, bits=4)``
with ``x`` (..., K) float, ``w`` (N, K * bits / 32) uint32 and ``scales`` /
``biases`` (N, K / group_size) as ``mx.quantize`` makes them; returns (..., N)
in the dtype ``mx.quantized_matmul`` returns, accumulated in float32.

The twin is ``mx.quantized_matmul`` (transpose=True). On a GPU that is the
stock op the gate times against; MLX's Metal kernels accumulate in float32.
On the CPU (emulated runs, the CPU selftest) MLX's op accumulates f16/bf16
in f16/bf16, so there the twin upcasts to float32 first and rounds the
result: the same contract, computed exactly enough to compare against.

Dispatch: :func:`patch_model` switches a loaded model's affine
``QuantizedLinear`` layers (4/8 bits, groups 32/64/128) to
:class:`SkinnyQuantizedLinear` only on a Metal device and only when
``gate.verdict("skinny_qmm", model_shapes=...)`` enables the kernel for the
model's own shapes; every call checks ``gate.enabled`` again and uses the
kernel only at decode shapes (2 <= M <= 32), MLX's op otherwise. On Linux
``qmm.patch_model`` (the CPU kernel) applies instead.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import gate
from ._common import Case, KernelSpec, MetalKernel

NAME = "skinny_qmm"
MIN_M, MAX_M = 2, 32
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
SIMDGROUPS = 4  # per threadgroup
# Row capacity MB -> output columns per SIMD group NC: NC * MB float accumulators per thread (32-64);
# each x value loaded is used NC times, each decoded weight M times.
_COLUMNS = {8: 4, 16: 4, 32: 2}
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

KERNEL = MetalKernel(
    name="mlx_ray_skinny_qmm",
    input_names=["x", "w", "scales", "biases", "m_rows", "n_cols", "k_dim"],
    output_names=["y"],
    source_file=Path(__file__).with_name("skinny_qmm.metal"),
)


@functools.lru_cache(maxsize=None)
def _out_dtype(x_dtype: mx.Dtype, s_dtype: mx.Dtype) -> mx.Dtype:
    return (mx.zeros((), x_dtype) + mx.zeros((), s_dtype)).dtype


@functools.lru_cache(maxsize=4096)
def _int(v: int) -> mx.array:
    return mx.array(v, dtype=mx.int32)


def row_capacity(m: int) -> int:
    """The template row capacity (8, 16 or 32) for m rows: three variants per (dtype, bits, group)."""
    return 8 if m <= 8 else 16 if m <= 16 else 32


def supports(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
             bits: int) -> bool:
    """Whether the kernel handles this call (shapes, dtypes, bits, groups; rows in [MIN_M, MAX_M])."""
    if biases is None or bits not in BITS or group_size not in GROUP_SIZES or w.ndim != 2 or w.dtype != mx.uint32:
        return False
    if x.dtype not in _FLOATS or scales.dtype not in _FLOATS or biases.dtype not in _FLOATS or x.ndim < 1:
        return False
    k = x.shape[-1]
    rows = x.size // k if k else 0
    return (MIN_M <= rows <= MAX_M and k % group_size == 0 and w.shape[1] * 32 // bits == k
            and scales.shape == (w.shape[0], k // group_size) and biases.shape == scales.shape)


def skinny_qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int = 64,
               bits: int = 4) -> mx.array:
    """The Metal kernel: ``x @ dequantize(w, scales, biases).T`` for 1..32 rows (float32 accumulation)."""
    k, n = x.shape[-1], w.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"skinny_qmm takes 1..{MAX_M} rows, got {m}")
    out = _out_dtype(x.dtype, scales.dtype)
    mb = row_capacity(m)
    nc = _COLUMNS[mb]
    groups = math.ceil(n / (SIMDGROUPS * nc))
    (y,) = KERNEL(
        inputs=[x2, w, scales, biases, _int(m), _int(n), _int(k)],
        template=[("OT", out), ("BITS", bits), ("GS", group_size), ("MB", mb), ("NC", nc)],
        grid=(32 * SIMDGROUPS * groups, 1, 1),
        threadgroup=(32 * SIMDGROUPS, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[out],
    )
    return y.reshape(*lead, n)


def twin(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int = 64,
         bits: int = 4) -> mx.array:
    """``mx.quantized_matmul`` (on the CPU in float32 for f16/bf16, then rounded: see the module docstring)."""
    if mx.default_device() == mx.cpu and (x.dtype != mx.float32 or scales.dtype != mx.float32):
        out = _out_dtype(x.dtype, scales.dtype)
        y = mx.quantized_matmul(x.astype(mx.float32), w, scales.astype(mx.float32), biases.astype(mx.float32),
                                transpose=True, group_size=group_size, bits=bits)
        return y.astype(out)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


# ---------------------------------------------------------------- tolerance

F32_REL = 1e-4
# Relative size of one unit in the last place of the output type (float32 accumulation is rounded once).
_ULP = {mx.float32: 0.0, mx.float16: 2.0 ** -10, mx.bfloat16: 2.0 ** -7}

TOLERANCE = ("per element |y - ref| <= 1e-4 * max|ref| + 1 ulp of the output type at that element "
             "(float32 accumulation in a different order, then one rounding to f16/bf16)")


def check(outputs, reference) -> str | None:
    y = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    ref = reference[0] if isinstance(reference, (list, tuple)) else reference
    if y.shape != ref.shape or y.dtype != ref.dtype:
        return f"shape/dtype {y.shape} {y.dtype} != {ref.shape} {ref.dtype}"
    a, b = y.astype(mx.float32), ref.astype(mx.float32)
    scale = mx.abs(b).max().item()
    bound = F32_REL * scale + _ULP[y.dtype] * mx.maximum(mx.abs(a), mx.abs(b))
    err = mx.abs(a - b)
    if not mx.isfinite(a).all().item():
        return "non-finite output"
    excess = (err - bound).max().item()
    if excess > 0:
        worst = mx.argmax(err - bound).item()
        return (f"error {err.reshape(-1)[worst].item():.3g} at element {worst} over the bound "
                f"{bound.reshape(-1)[worst].item():.3g} (max|ref| {scale:.3g})")
    return None


# --------------------------------------------------------------------- cases

def make_case(m: int, n: int, k: int, bits: int, group_size: int, dtype=mx.float16, seed: int = 0) -> Case:
    key = mx.random.key(seed * 7919 + m * 131 + n * 17 + k + bits * 3 + group_size)
    kw, kx = mx.random.split(key)
    w = (mx.random.normal((n, k), key=kw) * 0.05).astype(dtype)
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    x = mx.random.normal((m, k), key=kx).astype(dtype)
    return Case(f"M={m} {n}x{k} q{bits} g{group_size} {str(dtype).removeprefix('mlx.core.')}",
                (x, wq, scales, biases), {"group_size": group_size, "bits": bits})


def cases(kind: str) -> list[Case]:
    if kind == "emulate":  # tiny: every bits x group, every row capacity, an N tail, every dtype
        out = []
        dtypes = (mx.float32, mx.float16, mx.bfloat16)
        for i, (bits, gs) in enumerate((b, g) for b in BITS for g in GROUP_SIZES):
            k = 256 if gs == 128 else 128 + 64 * (i % 3)
            for j, m in enumerate((2, 5, 8)):
                out.append(make_case(m, 64, k, bits, gs, dtypes[(i + j) % 3], seed=i))
        out.append(make_case(12, 72, 256, 4, 64, mx.float16, seed=1))  # MB 16, N not a multiple of the tile
        out.append(make_case(32, 40, 128, 8, 32, mx.float32, seed=2))  # MB 32
        out.append(make_case(17, 64, 512, 4, 128, mx.bfloat16, seed=3))  # K spans two lane sweeps
        return out
    if kind == "device":  # the gate / selftest matrix: model-like shapes at every decode row bucket
        quants = [(4, 64), (8, 64)]
        shapes = {(4096, 4096): quants + [(4, 32), (4, 128), (8, 32), (8, 128)],
                  (14336, 4096): quants, (4096, 14336): quants}
        out = [make_case(m, n, k, bits, gs, mx.float16)
               for (n, k), qs in shapes.items() for bits, gs in qs for m in (2, 8, 16, 32)]
        for c in out:
            c.family = family(c.args[0].shape[0])
        return out
    raise ValueError(f"unknown case kind {kind!r} (emulate, device)")


def family(m: int) -> str:
    """The gate's family for m rows: one per row capacity (template variant), "rows8", "rows16", "rows32"."""
    return f"rows{row_capacity(m)}"


MODEL_ROWS = (2, 4, 8, 12, 16, 24, 32)  # every row bucket, several points each


def model_cases(model_shapes) -> list[Case]:
    """The model's own layers at every row bucket: ``model_shapes`` is a set of (N, K, bits, group_size, dtype)."""
    out = []
    for n, k, bits, gs, dtype in sorted(model_shapes):
        for m in MODEL_ROWS:
            case = make_case(m, n, k, bits, gs, getattr(mx, dtype))
            case.family = family(m)
            out.append(case)
    return out


SPEC = KernelSpec(name=NAME, metal=KERNEL, metal_fn=skinny_qmm, twin=twin, cpu_fn=None, cases=cases,
                  tolerance=TOLERANCE, check=check, model_cases=model_cases)


# ------------------------------------------------------------------ dispatch

def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, *,
                     group_size: int = 64, bits: int = 4) -> mx.array:
    """``mx.quantized_matmul(transpose=True)``, through the kernel when the gate enables it and the call fits."""
    if supports(x, w, scales, biases, group_size, bits) and gate.enabled(NAME, family(x.size // x.shape[-1])):
        return gate.call(NAME, skinny_qmm, x, w, scales, biases, group_size=group_size, bits=bits)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


class SkinnyQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` that goes through :func:`quantized_matmul` (the kernel at decode rows)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                             group_size=self.group_size, bits=self.bits)
        if "bias" in self:
            y = y + self["bias"]
        return y


def _patchable(module: nn.Module) -> bool:
    return (getattr(module, "mode", "affine") == "affine" and module.bits in BITS
            and module.group_size in GROUP_SIZES and module.get("biases") is not None)


def model_shapes(model: nn.Module) -> set[tuple]:
    """(N, K, bits, group_size, dtype name) of every layer :func:`patch_model` would route."""
    shapes = set()
    for _, mod in model.named_modules():
        if type(mod) is nn.QuantizedLinear and _patchable(mod):
            n, words = mod["weight"].shape
            shapes.add((n, words * 32 // mod.bits, mod.bits, mod.group_size,
                        str(mod["scales"].dtype).removeprefix("mlx.core.")))
    return shapes


def patch_model(model: nn.Module, device: gate.Device | None = None) -> int:
    """Route the model's affine QuantizedLinear layers through the kernel if its verdict on this device says so.

    Returns the number of layers patched (0 without Metal, with the kernel
    switched off, or when the verdict keeps the stock op; the reason is logged).
    """
    from .qmm import swap_classes  # noqa: PLC0415 - qmm's class swap, shared

    shapes = model_shapes(model)
    if not shapes:
        return 0
    if not gate.verdict(NAME, model_shapes=shapes, device=device).enabled:
        return 0
    return swap_classes(model, {nn.QuantizedLinear: SkinnyQuantizedLinear}, _patchable)


def unpatch_model(model: nn.Module) -> int:
    from .qmm import swap_classes  # noqa: PLC0415

    return swap_classes(model, {SkinnyQuantizedLinear: nn.QuantizedLinear}, lambda _: True)
