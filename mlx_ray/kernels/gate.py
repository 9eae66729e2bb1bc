"""The on-device verdict: a Metal kernel runs only after it has matched its twin and beaten it here.

:func:`verdict` is asked once per process and kernel (dispatch then reads
:func:`enabled`, a dict lookup). On a Metal device the first ask measures the
kernel's Metal path against its twin **in a child process**
(``gate_child.py``: a kernel that faults the GPU aborts that child, one that
hangs is killed at its timeout) on exactly the variants production will
dispatch when the caller passes them (``model_shapes``: the model's layer
shapes, block and group sizes, dtypes, prefill chunk lengths, vocabulary; see
``production.py``), else on the spec's "device" matrix. Each case is timed as
the median of :data:`REPS` calls after :data:`WARMUP`; the cases are grouped
in families (``Case.family``: decode / prefill, row buckets, ...) and a family
is enabled when every case matches the twin within the spec's tolerance and
the **median** of its cases' speed-ups is at least ``1 + margin``
(:data:`MARGIN`), so one noisy launch-bound case does not decide. A mismatch,
an exception, a crash or a timeout keeps the twin everywhere, and the reason is
logged.

The verdict is cached per (kernel, device name, MLX version, kernel-source
hash[, model shapes]) in ``verdict_cache.py``'s file, with a *pending marker*
written before measuring: a process that crashes or hangs while measuring
leaves it, and the next one records "crashed during measurement" / "timed out
after N s" instead of measuring again. So a kernel is measured once per
device, MLX and source, and a faulting one never crash-loops the replica.

At run time a kernel that raises (:func:`call`) or that a failed step names
(:func:`blame`, from the engine's backend) is marked failed (:func:`mark_failed`:
in this process and in the cache); its calls go to the twin from then on, the
request that hit it fails with :class:`KernelFault`, and :func:`failed` lists
it for the engine's stats and health.

Without Metal the verdict is ``enabled=False, "no Metal device"`` (the CPU
kernels in qmm.py / dense.py keep their own gating). ``MLX_RAY_KERNELS=0`` and
``MLX_RAY_KERNELS_DISABLE=name`` win over any cached verdict.

Tests: :class:`Device` is the one injectable part: a test passes
``device=Device("fake-metal", metal=True, mx_device=mx.cpu)`` so the whole
verdict logic (child process, comparison, timing, cache, dispatch) runs on the
CPU, with toy specs (``KernelSpec.ref`` names them for the child) whose "Metal
path" segfaults, hangs, is wrong or slow.
"""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import mlx.core as mx

from ..errors import EngineFault
from . import _common, gate_child, verdict_cache
from ._common import KernelSpec

log = logging.getLogger("mlx_ray.kernels.gate")

NO_METAL = "no Metal device"
WARMUP, REPS = 3, 10
MARGIN = 0.05  # a family is enabled when its median speed-up is >= 1 + MARGIN (MLX_RAY_GATE_MARGIN)
TIMEOUT_S = 600.0  # one kernel's whole measurement (MLX_RAY_GATE_TIMEOUT_S)
CASE_TIMEOUT_S = 120.0  # one case (MLX_RAY_GATE_CASE_TIMEOUT_S)


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


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


class KernelFault(EngineFault):
    """A Metal kernel failed at run time: it is off from now on (the twin serves); this batch failed."""

    def __init__(self, kernel: str, message: str):
        super().__init__(message)
        self.kernel = kernel


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
    cases: list[dict] = field(default_factory=list)  # label, family, kernel_ms, twin_ms, speedup, max_err, problem
    cached: bool = False
    # family -> {"enabled", "speedup" (median over its cases), "cases", "slowest"}; {} before families existed
    families: dict = field(default_factory=dict)
    failed_at_runtime: str | None = None  # why the kernel was turned off while serving (mark_failed)

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for doctor / info: 'enabled: <why>' or 'off: <reason>'."""
        if self.enabled:
            return f"enabled: {self.reason}"
        return f"off: {self.reason}"


# --------------------------------------------------------------- evaluation

def cases_for(spec: KernelSpec, model_shapes=None) -> list:
    """What the gate measures: exactly the production variants when ``model_shapes`` are given (and the spec
    builds cases from them), else the spec's "device" matrix."""
    if model_shapes and spec.model_cases is not None:
        return list(spec.model_cases(model_shapes))
    return list(spec.cases("device"))


def evaluate(spec: KernelSpec, device: Device, *, cases: list | None = None, fast_fn: Callable | None = None,
             warmup: int = WARMUP, reps: int = REPS, stop_on_problem: bool = True,
             on_case: Callable[[str], None] | None = None, margin: float | None = None) -> Verdict:
    """Run ``fast_fn`` (default ``spec.metal_fn``) against ``spec.twin`` on ``device`` here; never raises.

    Stops at the first case that fails (the verdict is then decided) unless
    ``stop_on_problem`` is False (the selftest reports every case).
    ``on_case(label)`` is called before each case (the child's progress).
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
            if on_case is not None:
                on_case(case.label)
            row = {"label": case.label, "family": getattr(case, "family", "all")}
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
    return _decide(rows, base, _env_float("MLX_RAY_GATE_MARGIN", MARGIN) if margin is None else margin)


def _decide(rows: list[dict], base: dict, margin: float) -> Verdict:
    """Correct on every case, then per family: enabled when the median speed-up is >= 1 + margin."""
    errs = [r["max_err"] for r in rows if r.get("max_err") is not None]
    v = Verdict(enabled=False, reason="", cases=rows, max_err=max(errs) if errs else None, **base)
    bad = next((r for r in rows if "problem" in r), None)
    if bad is not None:
        v.reason = f"mismatch on {bad['label']}: {bad['problem']}"
        return v
    v.kernel_ms = sum(r["kernel_ms"] for r in rows)
    v.twin_ms = sum(r["twin_ms"] for r in rows)
    v.speedup = v.twin_ms / v.kernel_ms if v.kernel_ms > 0 else float("inf")
    grouped: dict[str, list[dict]] = {}
    for r in rows:
        grouped.setdefault(r.get("family", "all"), []).append(r)
    need = 1.0 + margin
    for fam, rs in grouped.items():
        med = statistics.median(r["speedup"] for r in rs)
        slowest = min(rs, key=lambda r: r["speedup"])
        v.families[fam] = {"enabled": med >= need, "speedup": med, "cases": len(rs),
                           "slowest": f"{slowest['label']} ({slowest['speedup']:.2f}x)"}
    on = [f for f, d in v.families.items() if d["enabled"]]
    off = [f for f, d in v.families.items() if not d["enabled"]]

    def say(fams):
        return ", ".join(f"{f} {v.families[f]['speedup']:.2f}x over {v.families[f]['cases']} cases" for f in fams)

    v.enabled = bool(on)
    if not on:
        v.reason = f"slower than the twin: median speed-up {say(off)} (needs >= {need:.2f}x)"
    else:
        v.reason = f"matches the twin (max err {v.max_err:.3g}); median speed-up {say(on)}"
        if off:
            v.reason += f"; twin for {say(off)} (needs >= {need:.2f}x)"
    return v


# ------------------------------------------------------------------- cache

cache_path = verdict_cache.cache_path


def cache_key(spec: KernelSpec, device: Device, model_shapes=None) -> str:
    key = f"{spec.name}|{device.name}|mlx {mx.__version__}|{spec.source_hash}"
    if model_shapes:
        key += "|shapes " + hashlib.sha256(repr(sorted(map(repr, _tuples(model_shapes)))).encode()).hexdigest()[:16]
    return key


def _tuples(model_shapes) -> set:
    return {tuple(s) if isinstance(s, (list, tuple)) else s for s in model_shapes}


def _read_cache() -> dict:
    return verdict_cache.read()


def _write_cache(key: str, v: Verdict) -> None:
    """Merge one verdict into the cache file (replacing a pending marker)."""
    verdict_cache.put(key, {k: val for k, val in v.as_dict().items() if k != "cached"})


# ----------------------------------------------------------------- verdicts

_lock = threading.Lock()
_latest: dict[str, Verdict] = {}  # name -> this process's verdict (what dispatch reads)
_keys: dict[str, str] = {}  # name -> the cache key of that verdict (where a run-time failure is written)
_specs: dict[str, KernelSpec] = {}  # name -> the spec behind that verdict (blame matches its Metal kernels)


def verdict(kernel: str | KernelSpec, model_shapes=None, *, device: Device | None = None,
            fast_fn: Callable | str | None = None, cases: list | None = None, use_cache: bool = True,
            refresh: bool = False, timeout_s: float | None = None, case_timeout_s: float | None = None) -> Verdict:
    """The verdict for ``kernel`` (a registered name or a spec) on ``device`` (default: this machine's).

    ``model_shapes`` (the spec's ``model_cases`` turn them into the cases,
    exactly what production dispatches) joins the cache key. ``fast_fn`` /
    ``cases`` replace the spec's Metal path / cases (test hooks; such verdicts
    are never cached; a callable ``fast_fn`` or explicit ``cases`` are measured
    in this process, a ``"module:attr"`` ``fast_fn`` in the child). ``refresh``
    measures again even when cached. ``timeout_s`` / ``case_timeout_s`` bound
    the child (defaults :data:`TIMEOUT_S`, :data:`CASE_TIMEOUT_S`).
    """
    spec = _common.get(kernel) if isinstance(kernel, str) else kernel
    device = device or current_device()
    base = dict(name=spec.name, device=device.name, mlx=mx.__version__, source_hash=spec.source_hash)
    off = _common.env_disabled(spec.name)
    key = None
    if off:
        v = Verdict(enabled=False, reason=off, **base)
    elif not device.metal:
        v = Verdict(enabled=False, reason=NO_METAL, **base)
    else:
        hooked = fast_fn is not None or cases is not None
        cached = use_cache and not hooked
        key = cache_key(spec, device, model_shapes) if cached else None
        timeouts = (_env_float("MLX_RAY_GATE_TIMEOUT_S", TIMEOUT_S) if timeout_s is None else timeout_s,
                    _env_float("MLX_RAY_GATE_CASE_TIMEOUT_S", CASE_TIMEOUT_S) if case_timeout_s is None
                    else case_timeout_s)
        v = _measured(spec, device, model_shapes, fast_fn, cases, key, refresh, timeouts)
    with _lock:
        _latest[spec.name] = v
        _specs[spec.name] = spec
        if key:
            _keys[spec.name] = key
        else:
            _keys.pop(spec.name, None)
    return v


def _measured(spec, device, model_shapes, fast_fn, cases, key, refresh, timeouts) -> Verdict:
    if key is not None and not refresh:
        hit = _settled(key, dict(name=spec.name, device=device.name, mlx=mx.__version__,
                                 source_hash=spec.source_hash))
        if hit is not None:
            return hit
    if key is not None:
        verdict_cache.put(key, verdict_cache.pending(timeouts[0]))  # a crash from here on is remembered
    child = _child_request(spec, device, model_shapes, fast_fn, cases)
    if child is None:  # test hooks with Python objects: measured here
        v = evaluate(spec, device, cases=cases_for(spec, model_shapes) if cases is None else cases, fast_fn=fast_fn)
    else:
        v = _from_child(spec, device, child, *timeouts)
    (log.info if v.enabled else log.warning)("kernel %s on %s: %s", spec.name, device.name, v.line())
    if key is not None:
        _write_cache(key, v)
    return v


def _settled(key: str, base: dict) -> Verdict | None:
    """The cached verdict for ``key``: waits while another live process measures it; a stale pending marker
    becomes a failed verdict (written back). None: nothing usable cached, measure."""
    while True:
        hit = verdict_cache.get(key)
        if not verdict_cache.is_pending(hit):
            break
        why = verdict_cache.stale_reason(hit)
        if why is not None:
            v = Verdict(enabled=False, reason=why, **base)
            log.error("kernel %s on %s: %s; not measuring it again (delete %s to retry)", base["name"],
                      base["device"], why, verdict_cache.cache_path())
            _write_cache(key, v)
            return v
        time.sleep(0.2)
    if hit is None:
        return None
    try:
        return Verdict(**{**hit, "cached": True})
    except TypeError:
        return None  # an older layout: measure again


def _child_request(spec, device, model_shapes, fast_fn, cases) -> dict | None:
    """What the child needs to measure ``spec``, or None when it cannot name it (measured in process)."""
    if cases is not None or (fast_fn is not None and not isinstance(fast_fn, str)):
        return None
    if spec.ref:
        ref = spec.ref
    elif _common.KERNELS.get(spec.name) is spec:
        ref = spec.name
    else:
        return None
    mx_dev = None if device.mx_device is None else "gpu" if device.mx_device == mx.gpu else "cpu"
    return {"spec": ref, "device": {"name": device.name, "metal": device.metal, "mx_device": mx_dev},
            "model_shapes": sorted(list(s) for s in _tuples(model_shapes)) if model_shapes else None,
            "fast_fn": fast_fn, "warmup": WARMUP, "reps": REPS}


def _from_child(spec, device, request, timeout_s, case_timeout_s) -> Verdict:
    base = dict(name=spec.name, device=device.name, mlx=mx.__version__, source_hash=spec.source_hash)
    try:
        out = gate_child.measure(request, timeout_s=timeout_s, case_timeout_s=case_timeout_s)
    except Exception as e:  # noqa: BLE001 - could not even start the child: off, and remembered
        return Verdict(enabled=False, reason=f"measurement did not start: {type(e).__name__}: {e}", **base)
    if "verdict" in out:
        try:
            return Verdict(**out["verdict"])
        except TypeError as e:
            return Verdict(enabled=False, reason=f"unreadable measurement ({e})", **base)
    label = out.get("label")
    if "timeout" in out:
        reason = f"timed out after {out['timeout']:.0f} s" + (f" (case {label})" if label else "")
    else:
        reason = f"crashed during measurement ({gate_child.crash_text(out['crash'])}" + \
            (f", case {label})" if label else ")")
    if out.get("stderr"):
        log.warning("kernel %s measurement's stderr (tail):\n%s", spec.name, out["stderr"])
    return Verdict(enabled=False, reason=reason, **base)


def off(name: str, reason: str) -> Verdict:
    """Record "off: ``reason``" as this process's verdict for ``name`` (not cached): a kernel the caller could not
    have measured; dispatch then takes the twin instead of measuring lazily in the middle of a step."""
    v = Verdict(name=name, enabled=False, reason=reason, mlx=mx.__version__)
    with _lock:
        _latest[name] = v
        _keys.pop(name, None)
    return v


def latest(name: str) -> Verdict | None:
    """This process's verdict for ``name`` (what dispatch reads), or None before the first ask."""
    return _latest.get(name)


def enabled(name: str, family: str | None = None) -> bool:
    """Dispatch's question: may kernel ``name`` run now (for this ``family`` of shapes)?

    The switches, then this process's verdict; with ``family``, that family's
    decision (a family the verdict did not measure: no). Verdicts without
    families (older caches) answer for every family.
    """
    if not _common.enabled_by_env(name):
        return False
    v = _latest.get(name)
    if v is None:
        v = verdict(name)
    if not v.enabled:
        return False
    if family is None or not v.families:
        return True
    fam = v.families.get(family) or v.families.get("all")  # "all": a matrix measured without families
    return bool(fam and fam.get("enabled"))


# ------------------------------------------------------------ run-time faults

# A failed step whose error names no kernel but reads like a GPU fault (not an out-of-memory) blames every
# Metal kernel enabled at the time: the twins are correct, so the cost of a wrong guess is speed.
_GPU_FAULT = ("kiogpucommandbuffercallbackerror", "command buffer execution failed", "gpu address fault",
              "page fault", "gpu timeout", "invalid resource")
_NOT_A_KERNEL = ("outofmemory", "insufficient memory")


def mark_failed(name: str, why: str) -> Verdict:
    """Turn kernel ``name`` off from now on: in this process and in the verdict cache; logged."""
    with _lock:
        old = _latest.get(name)
        base = dict(name=name, device=old.device if old else "", mlx=old.mlx if old else mx.__version__,
                    source_hash=old.source_hash if old else "")
        v = Verdict(enabled=False, reason=f"failed at run time: {why}", failed_at_runtime=why,
                    families={f: {**d, "enabled": False} for f, d in (old.families if old else {}).items()}, **base)
        _latest[name] = v
        key = _keys.get(name)
    log.error("kernel %s failed at run time (%s): off from now on, its calls go to the twin", name, why)
    if key is not None:
        _write_cache(key, v)
    return v


def call(name: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` (a kernel's Metal path); if it raises, the kernel is marked failed and
    :class:`KernelFault` is raised (the step fails; later calls take the twin)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        mark_failed(name, why)
        raise KernelFault(name, f"kernel {name} failed ({why}); it is off from now on, retry the request") from e


def blame(exc: BaseException) -> list[str]:
    """After a failed step: mark failed the kernels ``exc`` names (their Metal kernel's name in the message),
    or, for a GPU fault that names none, every Metal kernel enabled now. Returns their names."""
    if isinstance(exc, KernelFault):
        return [exc.kernel]
    text = f"{type(exc).__name__}: {exc}"
    specs = {**_common.KERNELS, **_specs}
    named = [n for n, s in specs.items()
             if any(getattr(k, "name", None) and k.name in text for k in s.metal_kernels)]
    low = text.lower()
    if not named and any(p in low for p in _GPU_FAULT) and not any(p in low for p in _NOT_A_KERNEL):
        named = [n for n, v in _latest.items() if v.enabled and _common.enabled_by_env(n)]
    for n in named:
        v = _latest.get(n)
        if v is None or v.failed_at_runtime is None:
            mark_failed(n, f"a generation step failed with {text[:300]}")
    return named


def failed() -> dict[str, str]:
    """Kernels that failed at run time (in this process or, cached, in an earlier one): name -> why."""
    return {n: v.failed_at_runtime for n, v in _latest.items() if v.failed_at_runtime}


def dispatch(kernel: str | KernelSpec, *args, **kwargs):
    """``spec.metal_fn(...)`` when the kernel is enabled (guarded by :func:`call`), else ``spec.twin(...)``."""
    spec = _common.get(kernel) if isinstance(kernel, str) else kernel
    if enabled(spec.name):
        return call(spec.name, spec.metal_fn, *args, **kwargs)
    return spec.twin(*args, **kwargs)


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
        _keys.clear()
        _specs.clear()
