"""What the kernels share: the Metal kernel wrapper, the kernel spec, the registry, the switches.

Every Metal kernel is a :class:`MetalKernel` built once at module level from a
``.metal`` file next to its module, and described by a :class:`KernelSpec`
(Metal path, pure-MLX twin with the same contract, optional C++ CPU path, the
test cases and the tolerance). The kernel modules named in
:data:`KERNEL_MODULES` each define ``SPEC``; :func:`kernels` imports them
lazily into :data:`KERNELS`. ``mlx_ray/kernels/gate.py`` decides on the device whether
a kernel may run; ``mlx-ray kernels`` tests them.

A ``.metal`` file holds the kernel *body* as ``mx.fast.metal_kernel`` wants it
(no signature: MLX generates it from the input and output names). Helper
functions the body calls go above a line ``// --- body ---``; that part becomes
the kernel's ``header``. A file without that line is all body.

Emulation: inside ``with emulate():``, or with ``MLX_RAY_METAL_EMULATE=1``, a
:class:`MetalKernel` call does not go to MLX but to ``kernels.metal_emu.run``,
which compiles the source MLX would generate as C++ and runs it on CPU threads.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx

log = logging.getLogger("mlx_ray.kernels")

# Modules that define a Metal kernel's SPEC, imported by kernels().
KERNEL_MODULES = ("mlx_ray.kernels.sampler", "mlx_ray.kernels.skinny_qmm",
                  "mlx_ray.kernels.paged_attention_metal")
BODY_MARKER = "// --- body ---"
_OFF = ("0", "false", "off", "no")


# ------------------------------------------------------------------ switches

def env_disabled(name: str) -> str | None:
    """Why kernel ``name`` is switched off by the environment, or None.

    ``MLX_RAY_KERNELS=0`` turns every kernel off; ``MLX_RAY_KERNELS_DISABLE=a,b``
    turns kernels off by name. Read on every call (cheap), so a test or a CLI
    flag that sets them before the first use takes effect.
    """
    if os.environ.get("MLX_RAY_KERNELS", "1").strip().lower() in _OFF:
        return "disabled by MLX_RAY_KERNELS=0"
    raw = os.environ.get("MLX_RAY_KERNELS_DISABLE", "")
    if name in {n.strip() for n in raw.split(",")}:
        return f"disabled by MLX_RAY_KERNELS_DISABLE={raw}"
    return None


def enabled_by_env(name: str) -> bool:
    """True unless the environment switches kernel ``name`` off (see :func:`env_disabled`)."""
    return env_disabled(name) is None


def metal_available() -> bool:
    """Whether MLX has a Metal device here."""
    try:
        return bool(mx.metal.is_available())
    except Exception:  # noqa: BLE001 - an odd build without mx.metal: no Metal
        return False


# ---------------------------------------------------------------- emulation

_emulating: contextvars.ContextVar[bool] = contextvars.ContextVar("mlx_ray_metal_emulate", default=False)


def emulating() -> bool:
    """Whether Metal kernel calls go to the CPU emulator (``emulate()`` or ``MLX_RAY_METAL_EMULATE=1``)."""
    return _emulating.get() or os.environ.get("MLX_RAY_METAL_EMULATE", "0").strip().lower() not in _OFF + ("",)


@contextlib.contextmanager
def emulate(on: bool = True) -> Iterator[None]:
    """``with emulate(): ...``: run Metal kernels under ``kernels.metal_emu`` instead of MLX."""
    token = _emulating.set(on)
    try:
        yield
    finally:
        _emulating.reset(token)


# ------------------------------------------------------------- Metal kernel

def split_source(text: str) -> tuple[str, str]:
    """(header, body) of a ``.metal`` file: the parts above and below the ``// --- body ---`` line."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() == BODY_MARKER:
            return "".join(lines[:i]), "".join(lines[i + 1:])
    return "", text


class MetalKernel:
    """One ``mx.fast.metal_kernel``, built lazily from a ``.metal`` file; module-level, built once.

    ``header`` is prepended to the file's own header part. Calls take exactly
    ``mx.fast.metal_kernel``'s call arguments; under :func:`emulate` they run
    on the CPU emulator instead.
    """

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str], source_file: Path,
                 header: str = "", ensure_row_contiguous: bool = True, atomic_outputs: bool = False):
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source_file = Path(source_file)
        file_header, self.source = split_source(self.source_file.read_text())
        self.header = header + file_header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self.source_hash = hashlib.sha256((self.header + "\0" + self.source).encode()).hexdigest()
        self._mx_kernel = None

    def mx_kernel(self):
        """The ``mx.fast.metal_kernel`` object (built on first use; building needs no device)."""
        if self._mx_kernel is None:
            self._mx_kernel = mx.fast.metal_kernel(
                name=self.name, input_names=self.input_names, output_names=self.output_names,
                source=self.source, header=self.header, ensure_row_contiguous=self.ensure_row_contiguous,
                atomic_outputs=self.atomic_outputs)
        return self._mx_kernel

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None) -> list[mx.array]:
        kwargs = dict(inputs=inputs, output_shapes=output_shapes, output_dtypes=output_dtypes, grid=grid,
                      threadgroup=threadgroup, template=template, init_value=init_value)
        if emulating():
            from . import metal_emu  # noqa: PLC0415 - only the emulated path needs it

            return metal_emu.run(self, **kwargs)
        if verbose:
            kwargs["verbose"] = True
        if stream is not None:
            kwargs["stream"] = stream
        return self._mx_kernel_call(kwargs)

    def _mx_kernel_call(self, kwargs: dict) -> list[mx.array]:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return self.mx_kernel()(**kwargs)

    def __repr__(self) -> str:
        return f"MetalKernel({self.name!r}, {self.source_file.name}, sha256 {self.source_hash[:12]})"


# ----------------------------------------------------------------- the spec

@dataclass
class Case:
    """One test input: ``fn(*args, **kwargs)`` for the Metal path, the twin and the CPU path alike."""
    label: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    # The family of shapes the gate decides on together (e.g. "decode" / "prefill"; see gate._decide).
    family: str = "all"


@dataclass
class KernelSpec:
    """A Metal kernel, its twin and how to tell them apart (see the module docstring)."""
    name: str
    metal: MetalKernel | list[MetalKernel]
    metal_fn: Callable  # the Metal path: same contract as twin
    twin: Callable  # pure-MLX reference
    cpu_fn: Callable | None  # the C++ CPU path, if any
    cases: Callable[[str], list[Case]]  # "emulate" (tiny) or "device" (the selftest / gate matrix)
    tolerance: str  # human-readable
    check: Callable[[Any, Any], str | None]  # (outputs, reference) -> None if within tolerance, else why not
    # The model's own shapes -> extra cases for the gate (optional; see gate.verdict(model_shapes=...)).
    model_cases: Callable[[Any], list[Case]] | None = None
    # "module:attribute" that names this spec in another process (the gate measures in a child process,
    # mlx_ray/kernels/gate_child.py); registered specs are found by name and need none.
    ref: str | None = None

    @property
    def metal_kernels(self) -> list[MetalKernel]:
        return list(self.metal) if isinstance(self.metal, (list, tuple)) else [self.metal]

    @property
    def source_hash(self) -> str:
        """sha256 over the sources of all this spec's Metal kernels."""
        return hashlib.sha256("".join(k.source_hash for k in self.metal_kernels).encode()).hexdigest()


# ------------------------------------------------------------ the registry

KERNELS: dict[str, KernelSpec] = {}
SKIPPED: dict[str, str] = {}  # module -> why it was not registered
_loaded = False


def kernels() -> dict[str, KernelSpec]:
    """The registry: every ``SPEC`` of :data:`KERNEL_MODULES` (imported once; a module that fails is skipped, logged)."""
    global _loaded
    if not _loaded:
        for module_name in KERNEL_MODULES:
            try:
                spec = importlib.import_module(module_name).SPEC
            except Exception as e:  # noqa: BLE001 - one broken kernel must not take the others down
                SKIPPED[module_name] = f"{type(e).__name__}: {e}"
                log.warning("kernel module %s not registered: %s", module_name, SKIPPED[module_name])
                continue
            KERNELS[spec.name] = spec
        _loaded = True
    return KERNELS


def get(name: str) -> KernelSpec:
    """The registered spec called ``name`` (KeyError naming the known ones otherwise)."""
    specs = kernels()
    if name not in specs:
        raise KeyError(f"no kernel {name!r} (registered: {', '.join(specs) or 'none'}; skipped: {SKIPPED or 'none'})")
    return specs[name]


# ------------------------------------------------- helpers for specs and gate

def as_list(outputs) -> list[mx.array]:
    """A kernel's outputs as a flat list of arrays (one array, a tuple or a list)."""
    if isinstance(outputs, mx.array):
        return [outputs]
    return [o for o in outputs if isinstance(o, mx.array)]


def max_abs_err(outputs, reference) -> float:
    """The largest |a - b| over all output arrays, in float32 (inf on a shape mismatch)."""
    worst = 0.0
    got, want = as_list(outputs), as_list(reference)
    if len(got) != len(want):
        return float("inf")
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return float("inf")
        if a.size:
            d = mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
            worst = max(worst, float("inf") if d != d else d)
    return worst


def time_ms(fn: Callable, args: tuple, kwargs: dict, *, warmup: int = 2, reps: int = 7) -> tuple[Any, float]:
    """(outputs, median wall-clock ms of ``fn(*args, **kwargs)`` evaluated), after ``warmup`` calls."""
    out = None
    for _ in range(max(1, warmup)):
        out = fn(*args, **kwargs)
        mx.eval(as_list(out))
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        mx.eval(as_list(out))
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return out, times[len(times) // 2]


@contextlib.contextmanager
def on_device(device: mx.Device | None) -> Iterator[None]:
    """Run the block with ``device`` as MLX's default (no-op for None)."""
    if device is None:
        yield
        return
    previous = mx.default_device()
    mx.set_default_device(device)
    try:
        yield
    finally:
        mx.set_default_device(previous)
