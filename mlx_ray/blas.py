"""Optimized BLAS for MLX's Linux CPU backend.

The ``mlx-cpu`` wheel bundles the reference netlib BLAS, which is ~30x slower
than OpenBLAS on float32 matmul. MLX resolves ``sgemm_`` & co. dynamically, so
interposing Debian's ``libopenblas0-pthread`` with ``LD_PRELOAD`` swaps it in.
The dynamic loader only reads LD_PRELOAD at process start, so:

* the CLI re-execs itself once with the variable set (:func:`reexec_with_fast_blas`);
* Ray workers get it through ``runtime_env.env_vars`` (:func:`runtime_env_vars`);
* tests and CI export it before starting Python.

Override with ``MLX_RAY_BLAS``: ``auto`` (default), ``reference`` (never
preload), or an explicit path to a BLAS shared object.

Threads: OpenBLAS sizes its pool from ``OMP_NUM_THREADS`` at load, and Ray
sets that to an actor's ``num_cpus`` (1 for a replica by default), so a Serve
replica would prefill on one core while the in-process engine uses all of
them. The engine therefore sets OpenBLAS's threads at start
(:func:`set_threads`) to ``MLX_RAY_BLAS_THREADS``, else to the CPUs this
process may run on (what mlx-ray's own kernels use).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
INSTALL_HINT = "apt-get install libopenblas0-pthread"
_REEXEC_MARK = "MLX_RAY_BLAS_REEXEC"


def wanted_library() -> str | None:
    """The BLAS library to preload, or None (not Linux, disabled, or not installed)."""
    if not sys.platform.startswith("linux"):
        return None
    choice = os.environ.get("MLX_RAY_BLAS", "auto")
    if choice == "reference":
        return None
    if choice != "auto":
        return choice if Path(choice).exists() else None
    for cand in CANDIDATES:
        if Path(cand).exists():
            return cand
    return None


def loaded_blas() -> str:
    """Which BLAS this process has mapped: 'openblas (<path>)', 'reference', or 'n/a'."""
    if not sys.platform.startswith("linux"):
        return "n/a (Accelerate/Metal on macOS)" if sys.platform == "darwin" else "n/a"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for line in maps.splitlines():
        if "libopenblas" in line:
            return f"openblas ({line.split()[-1]})"
    return "reference (netlib, slow)"


def preload_active() -> bool:
    return preloaded_by_env() or loaded_blas().startswith("openblas")


def _openblas():
    import ctypes

    try:
        lib = ctypes.CDLL(None)  # the preloaded library's symbols are global
        return lib if hasattr(lib, "openblas_set_num_threads") else None
    except OSError:
        return None


def threads() -> int | None:
    """OpenBLAS's thread count in this process, or None when OpenBLAS is not loaded."""
    lib = _openblas()
    return int(lib.openblas_get_num_threads()) if lib is not None and hasattr(lib, "openblas_get_num_threads") else None


def set_threads() -> int | None:
    """Set OpenBLAS's threads to ``MLX_RAY_BLAS_THREADS`` or this process's CPUs; the count, or None."""
    lib = _openblas()
    if lib is None:
        return None
    want = os.environ.get("MLX_RAY_BLAS_THREADS")
    n = int(want) if want else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    lib.openblas_set_num_threads(max(1, n))
    return threads()


def env_with_fast_blas(env: dict | None = None) -> dict:
    """A copy of ``env`` (default: os.environ) with LD_PRELOAD extended by the BLAS."""
    env = dict(os.environ if env is None else env)
    lib = wanted_library()
    if lib and lib not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    return env


def preloaded_by_env() -> bool:
    """True on Linux when LD_PRELOAD carries OpenBLAS (which every child process would inherit)."""
    return sys.platform.startswith("linux") and "libopenblas" in os.environ.get("LD_PRELOAD", "")


def env_without_fast_blas() -> dict:
    """A copy of os.environ for a child that must not get the preload (torch: OpenBLAS interposed
    into torch's process slowed its CPU decode 5.8x here), and must not re-exec itself with it."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", _REEXEC_MARK)}
    env["MLX_RAY_BLAS"] = "reference"
    return env


def runtime_env_vars() -> dict:
    """Env vars for a Ray runtime_env so that MLX workers on Linux get the fast BLAS."""
    lib = wanted_library()
    return {"LD_PRELOAD": lib} if lib else {}


def reexec_with_fast_blas(argv: list[str] | None = None) -> None:
    """Re-exec this process with the BLAS preloaded, once. No-op when not needed."""
    lib = wanted_library()
    if not lib or os.environ.get(_REEXEC_MARK) or lib in os.environ.get("LD_PRELOAD", ""):
        return
    env = env_with_fast_blas()
    env[_REEXEC_MARK] = "1"
    argv = argv if argv is not None else [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
