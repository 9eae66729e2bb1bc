"""The gate's measurement in a child process, so a kernel that crashes or hangs cannot take the caller down.

MLX aborts the process when a Metal command buffer fails (it throws from
Metal's completion handler, where nothing can catch it), and a kernel that
loops forever never returns. So :func:`measure` runs ``python -m
mlx_ray.kernels.gate_child`` with the request as JSON on stdin, and:

* the child prints ``case<TAB>label`` before each case; the parent kills it
  when one case runs past ``case_timeout_s`` or the whole run past
  ``timeout_s``: ``{"timeout": seconds, "label": ...}``;
* a child that dies (a signal, a non-zero exit) gives ``{"crash": returncode,
  "label": ..., "stderr": tail}``;
* otherwise ``{"verdict": Verdict.as_dict()}``, written by the child to a file.

The child resolves the spec by its registered name or ``"module:attribute"``
(``KernelSpec.ref``), the optional ``fast_fn`` by ``"module:attribute"``, and
the device from its name, whether it is Metal and its MLX device ("gpu",
"cpu" or None). It runs ``gate.evaluate`` itself (it never spawns again) and
exits when its parent goes away (a thread watches ``os.getppid()``), so a
killed replica leaves no measurement running.

:data:`LAUNCHES` counts the children this process started (tests use it to
show that a failed verdict is not measured again).
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LAUNCHES: list[str] = []  # the spec of every child this process started, in order
_STDERR_TAIL = 2000


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def crash_text(rc: int) -> str:
    """'SIGSEGV' for a child killed by a signal, 'exit code 3' otherwise."""
    return _signal_name(rc) if rc < 0 else f"exit code {rc}"


def measure(request: dict, *, timeout_s: float, case_timeout_s: float) -> dict:
    """Run one measurement in a child; see the module docstring for what comes back. Never raises on the child's faults."""
    with tempfile.TemporaryDirectory(prefix="mlx-ray-gate-") as tmp:
        result = Path(tmp) / "verdict.json"
        err_path = Path(tmp) / "stderr"
        body = dict(request, result=str(result), paths=[p for p in sys.path if p])
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(err_path, "w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", "mlx_ray.kernels.gate_child"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            LAUNCHES.append(str(request.get("spec")))
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            try:
                proc.stdin.write(json.dumps(body))
                proc.stdin.close()
            except OSError:
                pass  # the child died at once: its return code says why
            timed_out, label = _watch(proc, lines, timeout_s, case_timeout_s)
            err.seek(0)
            tail = err.read()[-_STDERR_TAIL:]
        if timed_out is not None:
            return {"timeout": timed_out, "label": label, "stderr": tail}
        if proc.returncode == 0 and result.exists():
            return {"verdict": json.loads(result.read_text())}
        return {"crash": proc.returncode, "label": label, "stderr": tail}


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _watch(proc: subprocess.Popen, lines: queue.Queue, timeout_s: float,
           case_timeout_s: float) -> tuple[float | None, str | None]:
    """Follow the child until it exits ((None, last case)) or a timeout kills it ((that timeout, last case))."""
    start = last = time.monotonic()
    label = None
    while True:
        now = time.monotonic()
        limit, which = (start + timeout_s, timeout_s) if start + timeout_s <= last + case_timeout_s \
            else (last + case_timeout_s, case_timeout_s)
        if now >= limit:
            proc.kill()
            proc.wait()
            return which, label
        try:
            line = lines.get(timeout=limit - now)
        except queue.Empty:
            continue
        if line is None:  # stdout closed: the child is exiting
            try:
                proc.wait(timeout=max(1.0, limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return which, label
            return None, label
        if line.startswith("case\t"):
            label, last = line[5:], time.monotonic()


# ------------------------------------------------------------------ the child

def _resolve(ref: str):
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _orphan_watch(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(70)  # the caller is gone: nobody wants this measurement


def main() -> int:
    request = json.loads(sys.stdin.read())
    for p in reversed(request.get("paths", [])):
        if p not in sys.path:
            sys.path.insert(0, p)
    threading.Thread(target=_orphan_watch, args=(os.getppid(),), daemon=True).start()
    import mlx.core as mx  # noqa: PLC0415

    from mlx_ray.kernels import _common, gate  # noqa: PLC0415

    ref = request["spec"]
    spec = _resolve(ref) if ":" in ref else _common.get(ref)
    dev = request["device"]
    device = gate.Device(dev["name"], bool(dev["metal"]), {"gpu": mx.gpu, "cpu": mx.cpu}.get(dev.get("mx_device")))
    shapes = request.get("model_shapes")
    shapes = {tuple(s) for s in shapes} if shapes else None
    cases = gate.cases_for(spec, shapes)
    fast = _resolve(request["fast_fn"]) if request.get("fast_fn") else None

    def progress(label: str) -> None:
        print(f"case\t{label}", flush=True)

    v = gate.evaluate(spec, device, cases=cases, fast_fn=fast, warmup=request.get("warmup", gate.WARMUP),
                      reps=request.get("reps", gate.REPS), on_case=progress)
    Path(request["result"]).write_text(json.dumps(v.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
