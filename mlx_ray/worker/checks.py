"""The checks behind ``mlx-ray doctor``.

Each check is a small function returning one or more :class:`Check` (status,
message, one-line fix). They import MLX, torch and Ray lazily, and never raise:
an unexpected exception becomes a failed check naming it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MlxRayError
from .resources import fmt_bytes

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"


@dataclass
class Check:
    name: str
    status: str
    message: str
    fix: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- compute backends

def check_mlx() -> Check:
    try:
        import mlx.core as mx
    except Exception as e:  # noqa: BLE001
        return Check("mlx", FAIL, f"MLX not importable: {type(e).__name__}: {e}",
                     "pip install mlx (macOS arm64) or 'mlx[cpu]' (Linux)")
    info = mx.device_info()
    name = info.get("device_name", "?")
    if mx.metal.is_available():
        mem = info.get("memory_size")
        wss = info.get("max_recommended_working_set_size")
        extra = f", {fmt_bytes(mem)} unified" if mem else ""
        extra += f", working set {fmt_bytes(wss)}" if wss else ""
        return Check("mlx", PASS, f"MLX {mx.__version__} on Metal GPU {name}{extra}")
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return Check("mlx", PASS, f"MLX {mx.__version__} on CUDA {name}")
    from .resources import total_memory

    msg = f"MLX {mx.__version__} on CPU {name} ({fmt_bytes(total_memory())} RAM); no GPU backend"
    if sys.platform == "darwin":
        return Check("mlx", FAIL, msg, "on Apple Silicon install the arm64 Python and `pip install mlx` (Metal)")
    return Check("mlx", PASS, msg)


def check_blas() -> Check:
    if not sys.platform.startswith("linux"):
        return Check("blas", SKIP, "Linux only (macOS uses Accelerate/Metal)")
    from .. import blas

    lib = blas.wanted_library()
    if blas.preload_active():
        return Check("blas", PASS, f"optimized BLAS in use: {blas.loaded_blas()}")
    if lib:
        return Check("blas", WARN, f"OpenBLAS installed ({lib}) but not preloaded in this environment; "
                                   "mlx-ray commands preload it themselves",
                     f"for other MLX processes: export LD_PRELOAD={lib}")
    return Check("blas", WARN, "reference BLAS only: MLX float32 matmul on CPU is ~30x slower",
                 blas.INSTALL_HINT)


def check_kernels() -> Check:
    """mlx-ray's CPU kernels (quantized and float-weight matmul, the batched sampler, paged attention):
    built, self-tested, switched on."""
    try:
        from mlx_ray.kernels import dense, paged_attention, qmm, sampler
    except ImportError as e:
        return Check("kernels", WARN, f"CPU kernels not installed ({e})",
                     "build them: pip install -e . (needs cmake and a C++ compiler)")
    states = []
    for kernel in (qmm, dense, sampler, paged_attention):
        try:
            states.append(kernel.status())
        except Exception as e:  # noqa: BLE001
            name = getattr(kernel, "CPU_NAME", getattr(kernel, "NAME", kernel.__name__))
            states.append({"name": name, "active": False, "reason": f"status failed: {type(e).__name__}: {e}"})
    first = states[0]
    detail = ", ".join(f"{k} {first[k]}" for k in ("isa", "threads", "blas") if k in first)
    msg = "; ".join(f"{st['name']} {'active' if st['active'] else 'inactive'}: {st['reason']}" for st in states)
    msg += f" ({detail})" if detail else ""
    if all(st["active"] for st in states):
        return Check("kernels", PASS, msg)
    if sys.platform == "darwin":  # on the GPU MLX's own Metal kernels serve; the CPU kernels are not needed
        return Check("kernels", SKIP, msg)
    return Check("kernels", WARN, msg, "rebuild the kernels: pip install -e . (needs cmake and a C++ compiler); "
                                       "or unset MLX_RAY_KERNELS / MLX_RAY_KERNELS_DISABLE")


def check_metal_kernels() -> list[Check]:
    """One line per Metal kernel: its on-device verdict (mlx_ray/kernels/gate.py; measured once, then cached)."""
    try:
        from mlx_ray.kernels import _common, gate
    except ImportError as e:
        return [Check("kernels", WARN, f"Metal kernel framework not installed ({e})", "reinstall mlx-ray")]
    out = []
    for v in gate.verdicts():
        if v.enabled:
            out.append(Check(f"kernel {v.name}", PASS, v.line()))
        elif v.reason.startswith(("mismatch", "cases failed")):
            out.append(Check(f"kernel {v.name}", WARN, v.line(), "the stock MLX op serves instead; please report "
                                                                 "this with `mlx-ray kernels selftest --json OUT`"))
        else:
            out.append(Check(f"kernel {v.name}", SKIP, v.line()))
    for module, why in _common.SKIPPED.items():
        out.append(Check(f"kernel {module.rsplit('.', 1)[-1]}", WARN, f"not registered: {why}",
                         "reinstall mlx-ray; the stock MLX op serves meanwhile"))
    return out


def check_torch() -> Check:
    if importlib.util.find_spec("torch") is None:
        return Check("torch", SKIP, "PyTorch not installed (only the parity/bench tools need it)")
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return Check("torch", WARN, f"torch installed but not importable: {e}", "reinstall torch")
    mps = torch.backends.mps.is_available()
    msg = f"torch {torch.__version__}; MPS {'available' if mps else 'not available'}"
    if sys.platform == "darwin" and not mps:
        return Check("torch", WARN, msg, "install the arm64 macOS torch wheel (MPS needs macOS 12.3+ on Apple Silicon)")
    return Check("torch", PASS, msg + ("" if sys.platform == "darwin" else " (not macOS)"))


# ---------------------------------------------------------------- the head

def check_head(address: str | None, timeout: float, env: dict) -> list[Check]:
    from . import versions

    if not address or address in ("auto", "local"):
        return [Check("head", SKIP, f"no head address given ({address or 'use --address HOST:PORT'})", "")]
    try:
        host, port = versions.parse_address(address)
        where = versions.format_address(host, port)
        versions.tcp_check(host, port, timeout)
    except MlxRayError as e:
        return [Check("head", FAIL, str(e), "start the head or fix --address; open the GCS port to this machine"),
                Check("versions", SKIP, "head not reachable")]
    out = [Check("head", PASS, f"GCS port {where} reachable")]
    try:
        head = versions.head_versions(where, timeout, env=env)
        local = versions.local_versions()
        versions.check_versions(head, local, where)
        out.append(Check("versions", PASS, f"head and this machine both run {local}"))
    except MlxRayError as e:
        fix = "pass --token-file with the cluster token" if "--token-file" in str(e) else \
            "install the head's Python and ray[serve] version here"
        out.append(Check("versions", FAIL, str(e), fix))
    return out


def check_token(env: dict) -> Check:
    mode = env.get("RAY_AUTH_MODE", "")
    path = env.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if mode != "token":
        if env.get("RAY_AUTH_TOKEN") or Path(path).is_file():
            return Check("token-auth", PASS, f"token found ({'RAY_AUTH_TOKEN' if env.get('RAY_AUTH_TOKEN') else path})"
                                             "; Ray enables token auth when one is present")
        return Check("token-auth", WARN, "token authentication is off: anyone who reaches the GCS port can run code",
                     "get the cluster token into a 0600 file and pass --token-file FILE (RAY_AUTH_MODE=token)")
    if env.get("RAY_AUTH_TOKEN") and not env.get("RAY_AUTH_TOKEN_PATH"):
        return Check("token-auth", WARN, "token mode with the token in RAY_AUTH_TOKEN (visible in the environment)",
                     "store it in a 0600 file and use --token-file")
    p = Path(path)
    if not p.is_file():
        return Check("token-auth", FAIL, f"RAY_AUTH_MODE=token but no token file at {p}",
                     "copy the cluster token there (chmod 600) or pass --token-file")
    mode_bits = stat.S_IMODE(p.stat().st_mode)
    if mode_bits & 0o077:
        return Check("token-auth", WARN, f"token file {p} is readable by others (mode {mode_bits:o})", f"chmod 600 {p}")
    return Check("token-auth", PASS, f"token mode, token read from {p} (mode {mode_bits:o})")


# ---------------------------------------------------------------- the model cache

def _mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, fs type, options) for the filesystem holding path; '?' where unknown."""
    p = path.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    if sys.platform.startswith("linux"):
        try:
            found = [line.split()[2:4] for line in Path("/proc/mounts").read_text().splitlines()
                     if len(line.split()) >= 4 and line.split()[1] == str(p)]
        except OSError:
            found = []
        if found:
            return str(p), *found[-1]  # the last entry for a mount point is the visible one
    elif sys.platform == "darwin":
        res = subprocess.run(["mount"], capture_output=True, text=True)
        for line in res.stdout.splitlines():
            m = re.match(r"^(.*) on (.*) \((.*)\)$", line)
            if m and m.group(2) == str(p):
                opts = m.group(3).split(", ")
                return str(p), opts[0], ",".join(opts[1:])
    return str(p), "?", "?"


def check_cache(cache_dir: str | None, deep: bool) -> list[Check]:
    try:
        from mlx_ray.conversion.cache import cache_root, list_models, verify_model
    except ImportError as e:
        return [Check("cache", WARN, f"model cache tools not installed ({e})", "pip install -e . (mlx-ray)")]
    root = cache_root(cache_dir)
    if not root.is_dir():
        return [Check("cache", FAIL, f"model cache {root} does not exist or is not mounted",
                      "mount the NFS cache there (read-only is fine) or pass --cache-dir / set MLX_RAY_CACHE")]
    if not os.access(root, os.R_OK | os.X_OK):
        return [Check("cache", FAIL, f"model cache {root} is not readable by this user", f"check permissions of {root}")]
    mount, fs, opts = _mount_of(root)
    writable = os.access(root, os.W_OK) and "ro" not in opts.split(",")
    out = [Check("cache", PASS, f"{root} readable, {'writable' if writable else 'read-only'} "
                                f"({fs} at {mount}{', ' + opts.split(',')[0] if opts != '?' else ''})")]
    usage = shutil.disk_usage(root)
    free_msg = f"{fmt_bytes(usage.free)} free of {fmt_bytes(usage.total)}"
    if writable and usage.free < 20 * 1024**3:
        out.append(Check("cache-space", WARN, free_msg + " (a 32B q4 model needs ~18 GiB)", f"free space on {mount}"))
    else:
        out.append(Check("cache-space", PASS, free_msg))
    models = list_models(cache_dir=root)
    if not models:
        out.append(Check("models", WARN, f"no models in {root}", "mlx-ray convert <hf-id> on a node that can write"))
    for m in models:
        problems = verify_model(m.path, deep=deep)
        how = "sha256" if deep else "sizes"
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            out.append(Check("model", FAIL, f"{m.name} is corrupt: {problems[0]}{more}",
                             f"re-convert it: mlx-ray models rm {m.name} && mlx-ray convert {m.source or m.name}"))
        else:
            out.append(Check("model", PASS, f"{m.name}: {fmt_bytes(m.size)}, manifest verified ({how})"))
    return out


# ---------------------------------------------------------------- the machine

def check_memory(cache_dir: str | None) -> Check:
    import psutil

    vm = psutil.virtual_memory()
    try:
        from mlx_ray.conversion.cache import list_models

        models = list_models(cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - the cache check reports cache problems
        models = []
    if not models:
        return Check("memory", PASS, f"{fmt_bytes(vm.available)} available of {fmt_bytes(vm.total)} (no cached models)")
    big = max(models, key=lambda m: m.size)
    need = int(big.size * 1.15)  # weights plus a little KV cache and activations
    msg = (f"{fmt_bytes(vm.available)} available of {fmt_bytes(vm.total)}; largest cached model {big.name} "
           f"needs ~{fmt_bytes(need)}")
    limit, what = _gpu_working_set() or (int(vm.total * 0.75), "75% of RAM")
    if need > limit:
        return Check("memory", FAIL, f"{msg}, more than {what} ({fmt_bytes(limit)})",
                     "use a smaller or more quantized model on this machine")
    if need > vm.available:
        return Check("memory", WARN, msg, "close other applications before loading it")
    return Check("memory", PASS, msg)


def _gpu_working_set() -> tuple[int, str] | None:
    """Metal's recommended working set: the most MLX can keep resident on the GPU."""
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            wss = mx.device_info().get("max_recommended_working_set_size")
            return (int(wss), "the Metal working set") if wss else None
    except Exception:  # noqa: BLE001
        return None
    return None


def check_sleep() -> Check:
    if sys.platform != "darwin":
        return Check("sleep", SKIP, "macOS only (pmset)")
    res = subprocess.run(["pmset", "-g"], capture_output=True, text=True, timeout=10)
    m = re.search(r"^\s*sleep\s+(\d+)", res.stdout, re.MULTILINE)
    if not m:
        return Check("sleep", WARN, "could not read the sleep setting from `pmset -g`", "check System Settings > Energy")
    if m.group(1) != "0":
        return Check("sleep", WARN, f"system sleep after {m.group(1)} min (the worker drops off the cluster)",
                     "sudo pmset -c sleep 0 (and keep the worker under caffeinate: mlx-ray worker start --block)")
    return Check("sleep", PASS, "system sleep disabled (pmset sleep 0)")


def check_agent(label: str) -> Check:
    from .launchd import agent_state

    state, detail = agent_state(label)
    if state == "n/a":
        return Check("launchd", SKIP, detail)
    if state == "running":
        return Check("launchd", PASS, f"{label} running ({detail})")
    return Check("launchd", WARN, f"{label} {state} ({detail})",
                 "sudo mlx-ray worker install --address HEAD:6379 --token-file FILE (a LaunchDaemon: "
                 "starts at boot)")
