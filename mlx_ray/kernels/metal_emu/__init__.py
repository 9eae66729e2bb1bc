"""Metal kernels on Linux: the exact source ``mx.fast.metal_kernel`` generates, type-checked and run on the CPU.

* :func:`generated_source` traces one kernel call under ``mx.export_function``;
  with ``verbose=True`` MLX prints the full generated source (signature, body,
  template instantiation) even where Metal cannot run. That text is captured.
* :func:`typecheck` compiles it with ``g++ -fsyntax-only`` against
  ``metal_shim.h`` (Metal's types, address spaces, math, SIMD-group functions).
* :func:`run` compiles it into a shared library against the same header, whose
  second half emulates Metal's execution model (threadgroups of cooperative
  fibers, barriers, threadgroup memory, 32-lane SIMD groups, guard pages after
  every buffer), runs the dispatch and returns the outputs as ``mx.array``.
  ``kernels._common.MetalKernel`` calls it under ``with _common.emulate():``.
* :func:`check_all` does both for every registered kernel's "emulate" cases and
  compares with its twin. ``mlx-ray kernels check`` prints its rows.

README.md in this folder says what the emulator does not model.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import numpy as np

HERE = Path(__file__).parent
SHIM = HERE / "metal_shim.h"
CXX = os.environ.get("CXX", "g++")
# -fsingle-precision-constant: an unsuffixed 0.5 is a float, as in Metal (which has no double).
FLAGS = ["-std=c++17", "-U_FORTIFY_SOURCE", "-fsingle-precision-constant", "-Wno-attributes", "-Wno-unknown-pragmas", f"-I{HERE}"]
_C_LOCALE = {**os.environ, "LC_ALL": "C"}  # plain ASCII quotes in compiler messages
CPU_SECONDS = int(os.environ.get("MLX_RAY_METAL_EMU_TIMEOUT_S", "120"))  # per dispatch


class EmulatorError(RuntimeError):
    """A kernel that would not compile, or that faulted, deadlocked or timed out under emulation."""


def cache_dir() -> Path:
    """Where compiled kernels live: ``$MLX_RAY_METAL_EMU_CACHE`` or ``~/.cache/mlx-ray/metal_emu``."""
    d = Path(os.environ.get("MLX_RAY_METAL_EMU_CACHE") or Path.home() / ".cache" / "mlx-ray" / "metal_emu")
    d.mkdir(parents=True, exist_ok=True)
    return d


# ------------------------------------------------------------ the generated source

@contextlib.contextmanager
def _capture_stdout() -> Iterator[list[str]]:
    """Capture file descriptor 1 (MLX prints from C++) into the yielded list's only item."""
    libc = ctypes.CDLL(None)
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        libc.fflush(None)
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            yield out
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


def _as_array(x) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(x)


_SOURCES: dict[tuple, str] = {}


def generated_source(kernel, *, inputs, output_shapes, output_dtypes, template=None, grid=(1, 1, 1),
                     threadgroup=(1, 1, 1), init_value=None, **_) -> str:
    """The source ``mx.fast.metal_kernel`` generates for this call of ``kernel`` (a ``MetalKernel`` or alike).

    It depends on the inputs' dtypes, ranks and sizes (small ones become ``constant``), on
    ``template`` and on which ``<input>_shape/_strides/_ndim`` names the body uses.
    """
    arrays = [_as_array(x) for x in inputs]
    key = (kernel.name, kernel.header, kernel.source, tuple(kernel.input_names), tuple(kernel.output_names),
           kernel.ensure_row_contiguous, kernel.atomic_outputs, repr(template), tuple(map(str, output_dtypes)),
           tuple((str(a.dtype), a.shape) for a in arrays))
    if key in _SOURCES:
        return _SOURCES[key]
    k = mx.fast.metal_kernel(name=kernel.name, input_names=list(kernel.input_names),
                             output_names=list(kernel.output_names), source=kernel.source, header=kernel.header,
                             ensure_row_contiguous=kernel.ensure_row_contiguous, atomic_outputs=kernel.atomic_outputs)

    def call(*xs):
        kw = dict(inputs=list(xs), output_shapes=[tuple(s) for s in output_shapes], output_dtypes=list(output_dtypes),
                  grid=tuple(grid), threadgroup=tuple(threadgroup), verbose=True)
        if template:
            kw["template"] = list(template)
        if init_value is not None:
            kw["init_value"] = init_value
        return k(**kw)

    with tempfile.TemporaryDirectory() as d, _capture_stdout() as printed:
        mx.export_function(os.path.join(d, "trace.mlxfn"), call, *arrays)
    m = re.search(r"Generated source code for `[^`]*`:\n```\n(.*?)\n```", printed[0], re.S)
    if not m:
        raise EmulatorError(f"MLX printed no generated source for {kernel.name!r}: {printed[0][-400:]!r}")
    _SOURCES[key] = m.group(1)
    return m.group(1)


# ------------------------------------------------------------------ type-check

def _wrap(src: str) -> str:
    """The generated source as a C++ translation unit body: shim, then the kernel inside namespace mlxemu_k."""
    src = re.sub(r"^(\s*#\s*include\s*<metal_\w+>)", r"// (shim) \1", src, flags=re.M)
    return f'#include "metal_shim.h"\nnamespace mlxemu_k {{\n#line 1 "generated"\n{src}\n}}\n'


_TYPECHECKED: dict[str, tuple[bool, str]] = {}


def typecheck(src: str) -> tuple[bool, str]:
    """(ok, compiler log) of ``g++ -fsyntax-only`` on the generated source against the shim; log lines say ``generated:LINE``."""
    h = hashlib.sha256("\0".join([CXX, *FLAGS, SHIM.read_text(), src]).encode()).hexdigest()[:24]
    if h in _TYPECHECKED:
        return _TYPECHECKED[h]
    done = cache_dir() / f"{h}.typecheck.json"  # a verdict per source, on disk: g++ takes ~0.2 s
    if done.exists():
        _TYPECHECKED[h] = tuple(json.loads(done.read_text()))
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".cpp") as f:
            f.write(_wrap(src))
            f.flush()
            p = subprocess.run([CXX, *FLAGS, "-fsyntax-only", f.name], capture_output=True, text=True, env=_C_LOCALE)
        _TYPECHECKED[h] = (p.returncode == 0, p.stderr.replace(f.name, "typecheck.cpp"))
        tmp = done.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_TYPECHECKED[h]))
        os.replace(tmp, done)
    return _TYPECHECKED[h]


# ------------------------------------------------------------- the emulated run

_TG_DECL = re.compile(r"\bthreadgroup\s+((?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+([A-Za-z_]\w*)\s*"
                      r"((?:\[[^\];]+\])*)\s*;")
_PARAM = re.compile(r"(.*?)\b(\w+)\s*\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]\s*", re.S)


def _split_params(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur.strip() else parts


def to_cpp(src: str) -> tuple[str, list[tuple[int, str, str]]]:
    """(C++ source, [(buffer index, declared type, name)]) of the generated Metal source, ready to run.

    * ``threadgroup T name[N];`` becomes a reference into the threadgroup's arena (one object per group);
    * the ``[[kernel]]`` signature keeps its buffer parameters; each position attribute parameter
      (``uint3 thread_position_in_grid [[thread_position_in_grid]]``) becomes a local initialized
      from the emulated thread;
    * ``extern "C" mlxemu_thread(void** bufs)`` calls the kernel (its template instantiation) for
      the current thread, and ``mlxemu_launch`` runs the dispatch.
    """
    ids = iter(range(10**6))

    def tg(m):
        t, name, dims = m.group(1), m.group(2), re.sub(r"\s+", "", m.group(3))
        ref = f"(&{name}){dims}" if dims else f"&{name}"
        return f"{t} {ref} = *::mlxemu::tg_alloc<{t}{dims}>({next(ids)});"

    src = _TG_DECL.sub(tg, src)
    if next(ids) > 64:
        raise EmulatorError("more than 64 threadgroup variables (the emulator's limit)")
    m = re.search(r"\[\[kernel\]\]\s+void\s+(\w+)\s*\(", src)
    if not m:
        raise EmulatorError("no [[kernel]] function in the generated source")
    fname, depth, i = m.group(1), 1, m.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(src[i], 0)
        i += 1
    brace = src.index("{", i)
    buffers, prologue = [], []
    for p in _split_params(src[m.end():i - 1]):
        pm = _PARAM.fullmatch(p.strip())
        if not pm:
            raise EmulatorError(f"cannot bind kernel parameter {p.strip()!r}")
        decl, name, attr, index = pm.group(1).strip(), pm.group(2), pm.group(3), pm.group(4)
        if attr == "buffer":
            buffers.append((int(index), decl, name))
        else:
            prologue.append(f"{decl} {name} = ::mlxemu::R.cur->{attr};")
    buffers.sort()
    sig = f"void {fname}(" + ", ".join(f"{t} {n}" for _, t, n in buffers) + ") {\n  " + "\n  ".join(prologue)
    inst = re.compile(r"template\s*\[\[host_name\([^)]*\)\]\]\s*\[\[kernel\]\]\s*decltype\(([^;]*?)\)\s*[^;]*;")
    im = inst.search(src, brace)
    callee = im.group(1) if im else fname
    body = src[brace + 1:im.start()] + src[im.end():] if im else src[brace + 1:]
    body_line = src.count("\n", 0, brace) + 1  # the body keeps its line numbers in compiler messages
    args = ", ".join(f"*({t[:-1]}*)b[{k}]" if t.endswith("&") else f"({t})b[{k}]"
                     for k, (_, t, _) in enumerate(buffers))
    cpp = (_wrap(src[:m.start()] + sig + f"\n#line {body_line}\n" + body
                 + f'\n#line 1 "entry"\nextern "C" void mlxemu_thread(void** b) {{ {callee}({args}); }}')
           + 'extern "C" int mlxemu_launch(void** h, const size_t* n, const int* w, int nb, const uint* g,\n'
           '    const uint* t, int rev, int cpu, char* err, int len) {\n'
           '  return ::mlxemu::launch(mlxemu_k::mlxemu_thread, h, n, w, nb, g, t, rev, cpu, err, len);\n}\n')
    return cpp, buffers


_LIBS: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()  # one dispatch at a time: the runtime's state and signal handlers are process-wide


def _compile(cpp: str) -> ctypes.CDLL:
    h = hashlib.sha256(("\0".join([CXX, *FLAGS, SHIM.read_text(), cpp])).encode()).hexdigest()[:24]
    if h in _LIBS:
        return _LIBS[h]
    so = cache_dir() / f"{h}.so"
    if not so.exists():
        cpp_path = cache_dir() / f"{h}.cpp"  # kept beside the .so, for reading compiler messages
        tmp_cpp = cache_dir() / f"{h}.{os.getpid()}.cpp.tmp"
        tmp_cpp.write_text(cpp)
        os.replace(tmp_cpp, cpp_path)
        tmp = cache_dir() / f"{h}.{os.getpid()}.so.tmp"
        p = subprocess.run([CXX, *FLAGS, "-O1", "-shared", "-fPIC", str(cpp_path), "-o", str(tmp)],
                           capture_output=True, text=True, env=_C_LOCALE)
        if p.returncode:
            tmp.unlink(missing_ok=True)
            raise EmulatorError(f"the generated source does not compile ({cpp_path}):\n{p.stderr[-4000:]}")
        os.replace(tmp, so)
    lib = ctypes.CDLL(str(so))
    lib.mlxemu_launch.restype = ctypes.c_int
    _LIBS[h] = lib
    return lib


_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _host(x: mx.array, contiguous: bool) -> np.ndarray:
    """A numpy view of x's bytes (bfloat16 as uint16); strided in place unless ``contiguous``."""
    mx.eval(x)
    a = np.asarray(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)
    if contiguous or any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)
    return a


def _span(a: np.ndarray) -> int:
    """Bytes from a's first element to just past its last (a may be a strided view)."""
    if a.size == 0:
        return 0
    return sum((n - 1) * s for n, s in zip(a.shape, a.strides)) + a.itemsize


_ORDER: contextvars.ContextVar[str] = contextvars.ContextVar("mlx_ray_metal_emu_order", default="forward")
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("mlx_ray_metal_emu_record", default=None)


@contextlib.contextmanager
def order(which: str) -> Iterator[None]:
    """``with order("reverse"):`` runs threadgroups and the threads in each in reverse order (races show up)."""
    if which not in ("forward", "reverse"):
        raise ValueError(which)
    token = _ORDER.set(which)
    try:
        yield
    finally:
        _ORDER.reset(token)


def run(kernel, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None,
        **_) -> list[mx.array]:
    """Run one ``mx.fast.metal_kernel`` call of ``kernel`` on the CPU emulator; the outputs as MLX would return them."""
    call = dict(inputs=inputs, output_shapes=output_shapes, output_dtypes=output_dtypes, grid=grid,
                threadgroup=threadgroup, template=template, init_value=init_value)
    src = generated_source(kernel, **call)
    record = _RECORD.get()
    if record is not None:
        record.append((kernel.name, src))
    cpp, params = to_cpp(src)
    lib = _compile(cpp)
    arrays = dict(zip(kernel.input_names, (_as_array(x) for x in inputs)))
    host = {n: _host(a, kernel.ensure_row_contiguous) for n, a in arrays.items()}
    outs = {}
    for name, shape, dtype in zip(kernel.output_names, output_shapes, output_dtypes):
        shape, size = tuple(shape), dtype.size
        if init_value is not None:  # the bits of init_value as dtype, repeated
            bits = np.array(mx.array(init_value).astype(dtype).reshape(1).view(_mx_raw(size)))[0]
            outs[name] = np.full(shape, bits, _RAW[size])
        else:  # Metal's fresh buffers hold garbage: all ones here (NaN for floats) shows what a kernel never wrote
            outs[name] = np.full(shape, np.iinfo(_RAW[size]).max, _RAW[size])
    bufs, legend = [], []
    for index, decl, name in params:
        base = next((n for n in host if name in (f"{n}_shape", f"{n}_strides", f"{n}_ndim")), None)
        if name in outs:
            a, w = outs[name], 1
        elif name in host:
            a, w = host[name], 0
        elif base is not None and name == f"{base}_shape":
            a, w = np.array(host[base].shape, np.int32), 0
        elif base is not None and name == f"{base}_strides":
            a, w = np.array([s // host[base].itemsize for s in host[base].strides], np.int64), 0
        elif base is not None and name == f"{base}_ndim":
            a, w = np.array([host[base].ndim], np.int32), 0
        else:
            raise EmulatorError(f"kernel parameter {decl} {name} is neither an input, an output nor shape info")
        bufs.append((a, w))
        legend.append(f"buffer({index}) is {name}")
    n = len(bufs)
    ptrs = (ctypes.c_void_p * n)(*[a.ctypes.data for a, _ in bufs])
    sizes = (ctypes.c_size_t * n)(*[_span(a) for a, _ in bufs])
    writable = (ctypes.c_int * n)(*[w for _, w in bufs])
    g = (ctypes.c_uint * 3)(*(tuple(grid) + (1, 1, 1))[:3])
    t = (ctypes.c_uint * 3)(*(tuple(threadgroup) + (1, 1, 1))[:3])
    err = ctypes.create_string_buffer(2048)
    with _LOCK:
        rc = lib.mlxemu_launch(ptrs, sizes, writable, n, g, t, int(_ORDER.get() == "reverse"), CPU_SECONDS, err,
                               len(err))
    msg = err.value.decode(errors="replace")
    if rc:
        raise EmulatorError(f"{kernel.name}: {msg} ({'; '.join(legend)})")
    if msg:
        import warnings  # noqa: PLC0415

        warnings.warn(f"{kernel.name}: {msg}", stacklevel=2)
    result = []
    for name, dtype in zip(kernel.output_names, output_dtypes):
        raw = mx.array(outs[name])
        result.append(raw.view(dtype) if raw.dtype != dtype else raw)
    return result


def _mx_raw(size: int) -> mx.Dtype:
    return {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[size]


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, str]]]:
    """Collect (kernel name, generated source) of every emulated call in the block."""
    calls: list[tuple[str, str]] = []
    token = _RECORD.set(calls)
    try:
        yield calls
    finally:
        _RECORD.reset(token)


# ------------------------------------------------------------------ check_all

def _identical(a, b) -> bool:
    from .._common import as_list  # noqa: PLC0415

    xs, ys = as_list(a), as_list(b)
    return len(xs) == len(ys) and all(
        x.shape == y.shape and x.dtype == y.dtype and np.array_equal(np.asarray(x.view(_mx_raw(x.dtype.size))),
                                                                     np.asarray(y.view(_mx_raw(y.dtype.size))))
        for x, y in zip(xs, ys))


def check_case(spec, case) -> dict[str, Any]:
    """One row of :func:`check_all`: type-check and emulated run (both orders) of one case against the twin."""
    from .._common import as_list, emulate  # noqa: PLC0415

    t0 = time.perf_counter()
    row = {"kernel": spec.name, "case": case.label, "typecheck": False, "emulated": False, "reason": "", "ms": 0.0}
    reasons, results = [], {}
    with recording() as calls:
        try:
            ref = spec.twin(*case.args, **case.kwargs)
            mx.eval(as_list(ref))
            for which in ("forward", "reverse"):
                with order(which), emulate():
                    out = spec.metal_fn(*case.args, **case.kwargs)
                    mx.eval(as_list(out))
                results[which] = out
                why = spec.check(out, ref)
                if why:
                    reasons.append(f"{which} order: {why}")
            atomic = any(k.atomic_outputs for k in spec.metal_kernels)
            if not reasons and not atomic and not _identical(results["forward"], results["reverse"]):
                reasons.append("the result depends on the order threads run in (a race?)")
        except Exception as e:  # noqa: BLE001 - every failure becomes the row's reason
            reasons.append(f"{type(e).__name__}: {e}")
    if not calls:
        reasons.append("metal_fn called no Metal kernel under emulation")
    checks = [typecheck(src) for src in dict.fromkeys(src for _, src in calls)]
    row["typecheck"] = bool(checks) and all(ok for ok, _ in checks)
    for ok, log in checks:
        if not ok:
            first = next((ln for ln in log.splitlines() if "error" in ln), log.strip()[:300])
            reasons.insert(0, f"type-check: {first}")
    row["emulated"] = bool(calls) and not any(not r.startswith("type-check") for r in reasons)
    row["reason"] = "; ".join(reasons)
    row["ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    return row


def check_all(specs=None) -> list[dict[str, Any]]:
    """For every registered kernel (or ``specs``) and each of its "emulate" cases: a row
    ``{kernel, case, typecheck, emulated, reason, ms}``. A kernel module that failed to register
    is a failed row too."""
    from .. import _common  # noqa: PLC0415

    rows = []
    if specs is None:
        specs = list(_common.kernels().values())
        for module, why in _common.SKIPPED.items():
            rows.append({"kernel": module, "case": "-", "typecheck": False, "emulated": False,
                         "reason": f"not registered: {why}", "ms": 0.0})
    for spec in specs:
        for case in spec.cases("emulate"):
            rows.append(check_case(spec, case))
    return rows
