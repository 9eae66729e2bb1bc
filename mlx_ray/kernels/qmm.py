"""Fast CPU quantized matmul: a C++ MLX primitive, with ``mx.quantized_matmul`` as its twin.

MLX's Linux CPU backend runs affine-quantized matmul single-threaded and
without SIMD (~1 tok/s on a 135M q4 model). ``mlx_ray/kernels/qmm_cpu`` is an MLX C++
extension (a custom ``Primitive`` queued through MLX's CPU command encoder, so
it composes with lazy eval, ``async_eval``, streams and ``mx.compile``) that is
multithreaded over N, uses AVX2/FMA when the CPU has it, and switches to
dequantize + OpenBLAS sgemm for large M when OpenBLAS is preloaded.

:func:`quantized_matmul` is the dispatch: the kernel on CPU for what it
supports, MLX's own op for everything else (GPU devices, other modes/bits,
3-D weights, ``transpose=False``). :func:`status` says which path is active
and why; :func:`patch_model` routes a loaded mlx-lm model through it.

Switches (read when the state is first computed; :func:`reset` re-reads them):

* ``MLX_RAY_KERNELS=0`` disables every kernel; ``MLX_RAY_KERNELS_DISABLE=qmm_cpu``
  (a comma list) disables kernels by name.
* ``MLX_RAY_KERNEL_THREADS`` (default: all CPUs this process may use),
  ``MLX_RAY_KERNEL_SPIN_US`` (how long idle kernel threads spin, default 200),
  ``MLX_RAY_QMM_BLAS_MIN_M`` (rows from which dequantize + sgemm is used).
* Tests force either side with ``with force("reference"): ...`` / ``force("kernel")``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from ._common import env_disabled

NAME = "qmm_cpu"
SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_BUILD_LOG = Path(__file__).with_name("_qmm_cpu_build.log")
_REBUILD_HINT = "rebuild with `pip install -e .` (needs a C++17 compiler and cmake)"


@dataclass(frozen=True)
class _State:
    active: bool
    reason: str
    ext: ModuleType | None = None


_lock = threading.Lock()
_state: _State | None = None


def _env_disabled(name: str = NAME) -> str | None:
    """Why kernel ``name`` is switched off by the environment, or None (the switches shared by every kernel)."""
    return env_disabled(name)


def _not_built_reason(exc: ImportError) -> str:
    """Why the extension is missing: the install-time build log's verdict when the build failed."""
    try:
        first = _BUILD_LOG.read_text().splitlines()[0]
    except (OSError, IndexError):
        first = ""
    if first.startswith("not built"):
        return f"extension {first} (log: {_BUILD_LOG}); {_REBUILD_HINT}"
    return f"extension not importable ({exc}); {_REBUILD_HINT}"


def _import_extension() -> ModuleType:
    from . import _qmm_cpu  # noqa: PLC0415 - optional compiled module

    return _qmm_cpu


def _self_test(ext: ModuleType) -> str | None:
    """A tiny product against MLX's op: catches an ABI/nanobind-domain mismatch early."""
    w = mx.arange(8 * 64, dtype=mx.float32).reshape(8, 64) % 7 - 3
    x = mx.linspace(-1, 1, 64).reshape(1, 64)
    wq, s, b = mx.quantize(w, group_size=32, bits=4)
    with mx.stream(mx.cpu):
        want = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=32, bits=4)
        got = ext.quantized_matmul(x, wq, s, b, group_size=32, bits=4)
        err = mx.abs(got - want).max().item()
    return None if err < 1e-4 else f"self-test mismatch ({err:.3g})"


def _configure(ext: ModuleType) -> None:
    threads = os.environ.get("MLX_RAY_KERNEL_THREADS")
    if threads:
        ext.set_num_threads(int(threads))
    spin = os.environ.get("MLX_RAY_KERNEL_SPIN_US")
    if spin:
        ext.set_spin_us(int(spin))


def _extension_state() -> _State:
    """The compiled extension (shared by every CPU kernel): importable, same MLX, self-test passed."""
    try:
        ext = _import_extension()
    except ImportError as exc:
        return _State(False, _not_built_reason(exc))
    if ext.mlx_version != mx.__version__.split(".dev")[0]:
        return _State(False, f"built against mlx {ext.mlx_version} but mlx {mx.__version__} is installed; "
                             f"{_REBUILD_HINT}")
    try:
        problem = _self_test(ext)
    except Exception as exc:  # noqa: BLE001 - any failure here means "do not use it"
        problem = f"self-test failed: {exc}"
    if problem:
        return _State(False, f"{problem}; {_REBUILD_HINT}")
    _configure(ext)
    return _State(True, "", ext)


@functools.lru_cache(maxsize=None)
def extension_state() -> _State:
    """:func:`_extension_state`, computed once (until :func:`reset`)."""
    return _extension_state()


def _compute_state() -> _State:
    disabled = _env_disabled()
    if disabled:
        return _State(False, disabled)
    st = extension_state()
    if not st.active:
        return st
    ext = st.ext
    return _State(True, f"{ext.isa()} kernel, {ext.num_threads()} threads, prefill via "
                        f"{'OpenBLAS sgemm' if ext.blas() == 'openblas' else 'the kernel (no OpenBLAS loaded)'}",
                  ext)


def _get_state() -> _State:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _compute_state()
    return _state


def reset() -> None:
    """Forget the cached state (re-reads the environment switches on next use)."""
    global _state
    with _lock:
        _state = None
        extension_state.cache_clear()


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def status() -> dict:
    """``{"name", "active", "reason", ...}``: whether quantized_matmul uses the kernel here, and why (not)."""
    st = _get_state()
    info = {"name": NAME, "active": st.active, "reason": st.reason}
    if st.active and not _on_cpu():
        info.update(active=False, reason=f"default device is {mx.default_device()}; MLX's own kernels serve there")
    if st.ext is not None:
        info.update(isa=st.ext.isa(), threads=st.ext.num_threads(), blas=st.ext.blas(),
                    blas_min_m=st.ext.blas_min_m())
    if force.value:
        info["forced"] = force.value
    return info


class Forcing:
    """Test hook shared by the kernels: ``with force("kernel" | "reference" | None): ...``."""

    def __init__(self, name: str, get_state):
        self.name, self._get_state = name, get_state
        self.value: str | None = None  # None (auto), "kernel" or "reference"

    @contextlib.contextmanager
    def __call__(self, impl: str | None) -> Iterator[None]:
        if impl not in (None, "kernel", "reference"):
            raise ValueError(f"impl must be 'kernel', 'reference' or None, not {impl!r}")
        if impl == "kernel" and not self._get_state().active:
            raise RuntimeError(f"{self.name} kernel unavailable: {self._get_state().reason}")
        previous, self.value = self.value, impl
        try:
            yield
        finally:
            self.value = previous


force = Forcing(NAME, lambda: _get_state())


def _kernel_for(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
                transpose: bool) -> ModuleType | None:
    if force.value == "reference":
        return None
    st = _state if _state is not None else _get_state()
    if not st.active or not transpose or biases is None:
        return None
    if bits not in SUPPORTED_BITS or group_size not in SUPPORTED_GROUP_SIZES:
        return None
    if w.ndim != 2 or w.dtype != mx.uint32 or scales.dtype not in _FLOATS or biases.dtype not in _FLOATS:
        return None
    return st.ext if _on_cpu() else None


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, *,
                     group_size: int = 64, bits: int = 4, transpose: bool = True) -> mx.array:
    """``mx.quantized_matmul`` (affine mode) through the CPU kernel when it applies."""
    ext = _kernel_for(w, scales, biases, group_size, bits, transpose)
    if ext is not None and x.dtype in _FLOATS:
        return ext.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    return mx.quantized_matmul(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits)


# ------------------------------------------------------------ model patching

class KernelQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` whose matmul goes through :func:`quantized_matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                             group_size=self.group_size, bits=self.bits)
        if "bias" in self:
            y = y + self["bias"]
        return y


class KernelQuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose tied output head (``as_linear``) uses the kernel."""

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                                group_size=self.group_size, bits=self.bits)


_PATCHES = {nn.QuantizedLinear: KernelQuantizedLinear, nn.QuantizedEmbedding: KernelQuantizedEmbedding}


def _patchable(module: nn.Module) -> bool:
    return (getattr(module, "mode", "affine") == "affine" and module.bits in SUPPORTED_BITS
            and module.group_size in SUPPORTED_GROUP_SIZES)


def swap_classes(model: nn.Module, table: dict, patchable) -> int:
    """Give every module whose exact type is a key of ``table`` (and ``patchable``) the mapped class."""
    count = 0
    for _, module in model.named_modules():
        patched = table.get(type(module))
        if patched is not None and patchable(module):
            module.__class__ = patched
            count += 1
    return count


def patch_model(model: nn.Module) -> int:
    """Route a loaded model's affine QuantizedLinear / QuantizedEmbedding layers through the kernel.

    Only when the kernel is active and the default device is the CPU. The layers
    keep their parameters and change only their class (no model code is copied),
    and every call still dispatches, so the off switches keep working. Returns
    the number of layers patched (0 when the kernel does not apply).
    """
    return swap_classes(model, _PATCHES, _patchable) if status()["active"] else 0


def unpatch_model(model: nn.Module) -> int:
    """Undo :func:`patch_model`; returns the number of layers restored."""
    return swap_classes(model, {v: k for k, v in _PATCHES.items()}, lambda _: True)
