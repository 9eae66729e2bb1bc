"""Fast CPU matmul for float weights at decode-sized M: a C++ MLX primitive, with ``x @ w.T`` as its twin.

MLX's CPU matmul calls OpenBLAS ``sgemm``, which repacks the whole weight
matrix on every call; at decode (a few rows of activations) that packing costs
more than the multiply, and for bf16/f16 weights MLX has no fast CPU path at
all. ``dense_matmul`` in ``mlx_ray/kernels/qmm_cpu`` (same extension, thread pool and
ISA dispatch as the quantized kernel) reads each weight row once and multiplies
it with every activation row while it sits in L1, accumulating in float32.

Each output element is one accumulator walking K in a fixed order, so a row's
result does not depend on which other rows share the call: the kernel is
batch-invariant, bit for bit (a request gives the same logits alone or in a
batch). Its sum order differs from OpenBLAS's, so results differ from MLX's
matmul by float32 rounding (relative 1e-6).

:func:`matmul_t` is the dispatch: the kernel on CPU for 2-D float weights and
at most ``dense_max_m`` activation rows (default 32, ``MLX_RAY_DENSE_MAX_M``;
larger M, i.e. prefill, is compute-bound and goes to MLX/OpenBLAS), MLX's own
``x @ w.T`` for everything else. Switches: ``MLX_RAY_KERNELS=0`` or
``MLX_RAY_KERNELS_DISABLE=dense_cpu``; ``MLX_RAY_KERNEL_THREADS`` is shared
with the quantized kernel.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from . import qmm

NAME = "dense_cpu"
# Largest M at which the kernel beat OpenBLAS sgemm on every float32 shape of
# bench/kernel_dense.py here (bf16 weights win up to M >= 64: MLX converts them per call).
DEFAULT_MAX_M = 32
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_state: qmm._State | None = None


def _compute_state() -> qmm._State:
    disabled = qmm._env_disabled(NAME)
    if disabled:
        return qmm._State(False, disabled)
    st = qmm.extension_state()
    if not st.active:
        return st
    ext = st.ext
    if not hasattr(ext, "dense_matmul"):
        return qmm._State(False, f"the installed extension predates dense_matmul; {qmm._REBUILD_HINT}")
    raw = os.environ.get("MLX_RAY_DENSE_MAX_M") or str(DEFAULT_MAX_M)
    try:
        ext.set_dense_max_m(int(raw))
    except ValueError:
        return qmm._State(False, f"MLX_RAY_DENSE_MAX_M must be an integer (rows; 0: never), got {raw!r}")
    return qmm._State(True, f"{ext.isa()} kernel, {ext.num_threads()} threads, M <= {ext.dense_max_m()}", ext)


def _get_state() -> qmm._State:
    global _state
    if _state is None:
        _state = _compute_state()
    return _state


def reset() -> None:
    """Forget the cached state (and the shared extension state); re-reads the switches."""
    global _state
    qmm.reset()
    _state = None


def status() -> dict:
    """``{"name", "active", "reason", ...}``: whether float-weight matmuls use the kernel here, and why (not)."""
    st = _get_state()
    info = {"name": NAME, "active": st.active, "reason": st.reason}
    if st.active and mx.default_device() != mx.cpu:
        info.update(active=False, reason=f"default device is {mx.default_device()}; MLX's own kernels serve there")
    if st.ext is not None and st.active:
        info.update(isa=st.ext.isa(), threads=st.ext.num_threads(), max_m=st.ext.dense_max_m())
    if force.value:
        info["forced"] = force.value
    return info


force = qmm.Forcing(NAME, lambda: _get_state())  # with force("kernel" | "reference" | None): ...


def matmul_t(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T`` through the CPU kernel when it applies (decode-sized M, float weights, CPU)."""
    if force.value != "reference" and w.ndim == 2 and w.dtype in _FLOATS and x.dtype in _FLOATS:
        st = _state if _state is not None else _get_state()
        if st.active and mx.default_device() == mx.cpu:
            rows = x.size // x.shape[-1] if x.shape[-1] else 0
            if force.value == "kernel" or 0 < rows <= st.ext.dense_max_m():
                return st.ext.dense_matmul(x, w)
    return x @ w.T


class KernelLinear(nn.Linear):
    """``nn.Linear`` whose matmul goes through :func:`matmul_t`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = matmul_t(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class KernelEmbedding(nn.Embedding):
    """``nn.Embedding`` whose tied output head (``as_linear``) uses :func:`matmul_t`."""

    def as_linear(self, x: mx.array) -> mx.array:
        return matmul_t(x, self["weight"])


_PATCHES = {nn.Linear: KernelLinear, nn.Embedding: KernelEmbedding}


def _patchable(module: nn.Module) -> bool:
    w = module.get("weight")
    return isinstance(w, mx.array) and w.ndim == 2 and w.dtype in _FLOATS


def patch_model(model: nn.Module) -> int:
    """Route a loaded model's float Linear layers and tied output head through the kernel.

    Like ``qmm.patch_model``: only when the kernel is active on the CPU, class
    swap only, every call still dispatches. Returns the number of layers patched.
    """
    return qmm.swap_classes(model, _PATCHES, _patchable) if status()["active"] else 0


def unpatch_model(model: nn.Module) -> int:
    """Undo :func:`patch_model`; returns the number of layers restored."""
    return qmm.swap_classes(model, {v: k for k, v in _PATCHES.items()}, lambda _: True)
