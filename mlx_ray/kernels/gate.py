"""The on-device verdict: a Metal kernel runs only after it has matched its twin and beaten it here.

:func:`verdict` is asked once per process and kernel (dispatch then reads
:func:`enabled`, a dict lookup). On a Metal device the first ask runs the
kernel's Metal path and its twin on the spec's "device" cases (plus the model's
own shapes when given), times both (median after warm-up), and enables the
kernel only if every case is within the spec's tolerance and every case is
faster. Anything else (a mismatch, an exception, one slower case) keeps the
twin, and the reason is logged. The verdict is cached as JSON per (device
name, MLX version, kernel-source hash[, model shapes]) in
``$MLX_RAY_KERNEL_CACHE/verdicts.json`` (default ``~/.cache/mlx-ray/kernels``),
written atomically under a file lock, so a later process (and ``mlx-ray
doctor``) reuse it; changing the kernel source or MLX invalidates it.

Without Metal the verdict is ``enabled=False, "no Metal device"`` (the CPU
kernels in qmm.py / dense.py keep their own gating). ``MLX_RAY_KERNELS=0`` and
``MLX_RAY_KERNELS_DISABLE=name`` win over any cached verdict.

Tests: :class:`Device` is the one injectable part: a test passes
``device=Device("fake-metal", metal=True, mx_device=mx.cpu)`` so the whole
verdict logic (comparison, timing, cache, dispatch) runs on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from . import _common
from ._common import KernelSpec

log = logging.getLogger("mlx_ray.kernels.gate")

NO_METAL = "no Metal device"
WARMUP, REPS = 3, 10


@dataclass(frozen=True)
class Device:
    """Where a verdict is measured: its name (part of the cache key), whether Metal kernels run there, the MLX device."""
    name: str
    metal: bool
    mx_device: Any = None


def current_device() -> Device:
    """This machine's device as the gate sees it (Metal GPU when MLX has one)."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    name = str(info.get("device_name") or info.get("architecture") or "unknown")
    if _common.metal_available():
        return Device(f"metal:{name}", True, mx.gpu)
    return Device(f"cpu:{name}", False, None)


@dataclass
class Verdict:
    name: str
    enabled: bool
    reason: str
    speedup: float | None = None  # total twin ms / total kernel ms over the cases
    max_err: float | None = None
    kernel_ms: float | None = None  # sums over the cases of the medians
    twin_ms: float | None = None
    device: str = ""
    mlx: str = ""
    source_hash: str = ""
    cases: list[dict] = field(default_factory=list)  # label, kernel_ms, twin_ms, speedup, max_err, problem
    cached: bool = False

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for doctor / info: 'enabled (1.8x, max err 1e-4)' or 'off: <reason>'."""
        if self.enabled:
            return f"enabled: {self.reason}"
        return f"off: {self.reason}"


# --------------------------------------------------------------- evaluation

def evaluate(spec: KernelSpec, device: Device, *, cases: list | None = None, fast_fn: Callable | None = None,
             warmup: int = WARMUP, reps: int = REPS, stop_on_problem: bool = True) -> Verdict:
    """Run ``fast_fn`` (default ``spec.metal_fn``) against ``spec.twin`` on ``device``; never raises.

    Stops at the first case that fails (the verdict is then decided) unless
    ``stop_on_problem`` is False (the selftest reports every case).
    """
    fast = fast_fn or spec.metal_fn
    base = dict(name=spec.name, device=device.name, mlx=mx.__version__, source_hash=spec.source_hash)
    try:
        cases = list(spec.cases("device") if cases is None else cases)
    except Exception as e:  # noqa: BLE001 - a broken spec is a disabled kernel
        return Verdict(enabled=False, reason=f"cases failed: {type(e).__name__}: {e}", **base)
    if not cases:
        return Verdict(enabled=False, reason="no cases to measure", **base)
    rows: list[dict] = []
    with _common.on_device(device.mx_device):
        for case in cases:
            row = {"label": case.label}
            rows.append(row)
            try:
                want, row["twin_ms"] = _common.time_ms(spec.twin, case.args, case.kwargs, warmup=warmup, reps=reps)
            except Exception as e:  # noqa: BLE001
                row["problem"] = f"twin failed: {type(e).__name__}: {e}"
                if stop_on_problem:
                    break
                continue
            try:
                got, row["kernel_ms"] = _common.time_ms(fast, case.args, case.kwargs, warmup=warmup, reps=reps)
                row["max_err"] = _common.max_abs_err(got, want)
                problem = spec.check(got, want)
            except Exception as e:  # noqa: BLE001
                problem = f"failed: {type(e).__name__}: {e}"
            if problem:
                row["problem"] = problem
                if stop_on_problem:
                    break
                continue
            row["speedup"] = row["twin_ms"] / row["kernel_ms"] if row["kernel_ms"] > 0 else float("inf")
    return _decide(rows, len(cases), base)


def _decide(rows: list[dict], n_cases: int, base: dict) -> Verdict:
    errs = [r["max_err"] for r in rows if r.get("max_err") is not None]
    v = Verdict(enabled=False, reason="", cases=rows, max_err=max(errs) if errs else None, **base)
    bad = next((r for r in rows if "problem" in r), None)
    if bad is not None:
        v.reason = f"mismatch on {bad['label']}: {bad['problem']}"
        return v
    v.kernel_ms = sum(r["kernel_ms"] for r in rows)
    v.twin_ms = sum(r["twin_ms"] for r in rows)
    v.speedup = v.twin_ms / v.kernel_ms if v.kernel_ms > 0 else float("inf")
    slowest = min(rows, key=lambda r: r["speedup"])
    faster = sum(r["speedup"] > 1.0 for r in rows)
    if faster < n_cases:
        v.reason = (f"slower than the twin on {slowest['label']} ({slowest['speedup']:.2f}x; faster on {faster} "
                    f"of {n_cases} cases, {v.speedup:.2f}x in total)")
        return v
    v.enabled = True
    v.reason = (f"matches the twin and is faster on all {n_cases} cases ({slowest['speedup']:.2f}x at worst, "
                f"{v.speedup:.2f}x in total; max err {v.max_err:.3g})")
    return v


# ------------------------------------------------------------------- cache

def cache_path() -> Path:
    root = os.environ.get("MLX_RAY_KERNEL_CACHE") or Path.home() / ".cache" / "mlx-ray" / "kernels"
    return Path(root) / "verdicts.json"


def cache_key(spec: KernelSpec, device: Device, model_shapes=None) -> str:
    key = f"{spec.name}|{device.name}|mlx {mx.__version__}|{spec.source_hash}"
    if model_shapes:
        key += "|shapes " + hashlib.sha256(repr(sorted(map(repr, model_shapes))).encode()).hexdigest()[:16]
    return key


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, v: Verdict) -> None:
    """Merge one verdict into the cache file: under a file lock, written to a temp file and renamed."""
    from filelock import FileLock  # noqa: PLC0415

    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=30):
            data = _read_cache()
            data[key] = {k: val for k, val in v.as_dict().items() if k != "cached"}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".verdicts.", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - a read-only home only costs a re-measure next time
        log.warning("kernel verdict cache not written (%s): %s", path, e)


# ----------------------------------------------------------------- verdicts

_lock = threading.Lock()
_latest: dict[str, Verdict] = {}  # name -> this process's verdict (what dispatch reads)


def verdict(kernel: str | KernelSpec, model_shapes=None, *, device: Device | None = None,
            fast_fn: Callable | None = None, cases: list | None = None, use_cache: bool = True,
            refresh: bool = False) -> Verdict:
    """The verdict for ``kernel`` (a registered name or a spec) on ``device`` (default: this machine's).

    ``model_shapes`` (the spec's ``model_cases`` turn them into extra cases)
    joins the cache key. ``fast_fn`` / ``cases`` replace the spec's Metal path /
    device cases (test hooks; such verdicts are never written to the cache).
    ``refresh`` measures again even when cached, and caches the new verdict.
    """
    spec = _common.get(kernel) if isinstance(kernel, str) else kernel
    device = device or current_device()
    base = dict(name=spec.name, device=device.name, mlx=mx.__version__, source_hash=spec.source_hash)
    off = _common.env_disabled(spec.name)
    if off:
        v = Verdict(enabled=False, reason=off, **base)
    elif not device.metal:
        v = Verdict(enabled=False, reason=NO_METAL, **base)
    else:
        hooked = fast_fn is not None or cases is not None
        v = _measured(spec, device, model_shapes, fast_fn, cases, use_cache and not hooked, refresh)
    with _lock:
        _latest[spec.name] = v
    return v


def _measured(spec, device, model_shapes, fast_fn, cases, use_cache, refresh) -> Verdict:
    key = cache_key(spec, device, model_shapes)
    if use_cache and not refresh:
        hit = _read_cache().get(key)
        if hit is not None:
            try:
                return Verdict(**{**hit, "cached": True})
            except TypeError:
                pass  # an older layout: measure again
    if cases is None:
        cases = list(spec.cases("device"))
        if model_shapes and spec.model_cases is not None:
            cases += list(spec.model_cases(model_shapes))
    v = evaluate(spec, device, cases=cases, fast_fn=fast_fn)
    (log.info if v.enabled else log.warning)("kernel %s on %s: %s", spec.name, device.name, v.line())
    if use_cache:
        _write_cache(key, v)
    return v


def latest(name: str) -> Verdict | None:
    """This process's verdict for ``name`` (what dispatch reads), or None before the first ask."""
    return _latest.get(name)


def enabled(name: str) -> bool:
    """Dispatch's question: may kernel ``name`` run now? (The switches, then this process's verdict.)"""
    if not _common.enabled_by_env(name):
        return False
    v = _latest.get(name)
    if v is None:
        v = verdict(name)
    return v.enabled


def dispatch(kernel: str | KernelSpec, *args, **kwargs):
    """``spec.metal_fn(...)`` when the kernel is enabled, else ``spec.twin(...)``."""
    spec = _common.get(kernel) if isinstance(kernel, str) else kernel
    return (spec.metal_fn if enabled(spec.name) else spec.twin)(*args, **kwargs)


def verdicts(device: Device | None = None) -> list[Verdict]:
    """This process's verdict for every registered Metal kernel (measuring the ones not yet known)."""
    out = []
    for name, spec in _common.kernels().items():
        v = _latest.get(name)
        switched = v is not None and v.reason.startswith("disabled by") == _common.enabled_by_env(name)
        if v is None or switched or (device is not None and v.device != device.name):
            v = verdict(spec, device=device)
        out.append(v)
    return out


def reset() -> None:
    """Forget this process's verdicts (the cache file stays)."""
    with _lock:
        _latest.clear()
