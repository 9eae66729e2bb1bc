"""What this node offers to the cluster: CPUs, accelerator, memory, labels.

Ray's own detection is wrong for an inference Mac in two ways: it counts the
efficiency cores as CPUs, and it gives the object store 30% of the (unified)
memory that MLX needs for weights and KV cache. So we detect here and pass
explicit numbers to ``ray start``; every value can be overridden.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from ..errors import BadRequest

GiB = 1024**3
MiB = 1024**2
# The resource name the Serve deployments ask for to land on an Apple GPU.
APPLE_GPU_RESOURCE = "gpu_apple_mps"
# Ray refuses an object store smaller than this (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES).
OBJECT_STORE_MIN = 75 * MiB
DEFAULT_MLX_FRACTION = 0.75  # of physical memory kept out of Ray's hands for MLX


@dataclass
class NodeResources:
    num_cpus: int
    num_gpus: int | None  # None: let Ray detect (NVIDIA GPUs on Linux)
    resources: dict[str, float]
    memory: int  # bytes Ray may hand out as the logical "memory" resource
    object_store_memory: int  # bytes of Ray's shared-memory object store
    total_memory: int
    accelerator: str  # "metal", "cuda" or "cpu"
    device: str  # human-readable device description
    node_name: str
    labels: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        gpus = "auto" if self.num_gpus is None else str(self.num_gpus)
        return (f"{self.accelerator} ({self.device}); CPUs {self.num_cpus}, GPUs {gpus}, "
                f"resources {json.dumps(self.resources, sort_keys=True)}, memory {fmt_bytes(self.memory)}, "
                f"object store {fmt_bytes(self.object_store_memory)} of {fmt_bytes(self.total_memory)}")


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'8GiB', '8G', '512m', '1000000' -> bytes (binary multiples, like Ray's own docs)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise BadRequest(f"invalid size {text!r}: use bytes or a number with K/M/G/T (e.g. 8GiB)")
    mult = {"": 1, "k": 1024, "m": MiB, "g": GiB, "t": 1024**4}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def detect_cpus() -> tuple[int, str]:
    """(count, how): performance cores on Apple Silicon, usable CPUs elsewhere."""
    if sys.platform == "darwin":
        perf = _sysctl("hw.perflevel0.physicalcpu")
        if perf and perf.isdigit():
            return int(perf), "performance cores (sysctl hw.perflevel0.physicalcpu)"
        phys = _sysctl("hw.physicalcpu")
        if phys and phys.isdigit():
            return int(phys), "physical cores (sysctl hw.physicalcpu)"
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)), "CPUs this process may run on (sched_getaffinity)"
    return os.cpu_count() or 1, "os.cpu_count()"


def total_memory() -> int:
    import psutil  # light, and a declared dependency

    return int(psutil.virtual_memory().total)


def detect_accelerator() -> tuple[str, str, int | None]:
    """(kind, description, device memory bytes or None) as MLX sees it.

    Imports MLX lazily; a missing or broken MLX is reported as "cpu" with the
    reason, never raised: the node can still join as a CPU worker.
    """
    try:
        import mlx.core as mx
    except Exception as e:  # noqa: BLE001 - any import failure means "no MLX device"
        return "cpu", f"MLX not importable ({type(e).__name__}: {e})", None
    try:
        if mx.metal.is_available():
            info = mx.device_info()
            mem = info.get("memory_size")
            return "metal", f"Metal {info.get('device_name', 'GPU')} ({info.get('architecture', '?')})", mem
        if hasattr(mx, "cuda") and mx.cuda.is_available():
            info = mx.device_info()
            return "cuda", f"CUDA {info.get('device_name', 'GPU')}", info.get("memory_size")
        info = mx.device_info()
        return "cpu", f"CPU {info.get('device_name', platform.processor() or platform.machine())}", None
    except Exception as e:  # noqa: BLE001
        return "cpu", f"MLX device query failed ({type(e).__name__}: {e})", None


def default_node_name() -> str:
    return socket.gethostname().split(".")[0] or "worker"


def memory_split(total: int, mlx_fraction: float = DEFAULT_MLX_FRACTION) -> tuple[int, int]:
    """(Ray logical memory, object store) leaving ``mlx_fraction`` of ``total`` to MLX.

    The object store gets 5% of the memory, clamped to [512 MiB, 4 GiB]: model
    weights never travel through it (they are read from the cache), only
    requests and responses do. Ray's logical memory gets the rest of Ray's share.
    """
    if not 0.0 <= mlx_fraction < 1.0:
        raise BadRequest(f"--mlx-memory-fraction must be in [0, 1), got {mlx_fraction}")
    ray_share = int(total * (1.0 - mlx_fraction))
    store = min(max(int(total * 0.05), 512 * MiB), 4 * GiB, max(ray_share // 2, OBJECT_STORE_MIN))
    return max(ray_share - store, 256 * MiB), store


def parse_resources_json(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(f"--resources-override is not valid JSON ({e.msg}): expected e.g. '{{\"gpu_apple_mps\": 1}}'")
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in value.values()):
        raise BadRequest("--resources-override must be a JSON object of resource name -> non-negative number")
    bad = [k for k in value if k in ("CPU", "GPU", "memory", "object_store_memory")]
    if bad:
        raise BadRequest(f"--resources-override cannot set {bad[0]!r}; use --num-cpus/--num-gpus/--memory instead")
    return {str(k): float(v) for k, v in value.items()}


def parse_labels(items: list[str] | None) -> dict[str, str]:
    labels = {}
    for item in items or []:
        for pair in item.split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise BadRequest(f"invalid --label {pair!r}: expected KEY=VALUE")
            labels[key.strip()] = value.strip()
    return labels


def detect(*, num_cpus: int | None = None, num_gpus: int | None = None, resources_override: str | None = None,
           memory: str | None = None, object_store_memory: str | None = None,
           mlx_memory_fraction: float = DEFAULT_MLX_FRACTION, node_name: str | None = None,
           labels: list[str] | None = None) -> NodeResources:
    """Detect this node's resources and apply the user's overrides."""
    notes = []
    cpus, how = detect_cpus()
    notes.append(f"CPUs: {cpus} {how}" if num_cpus is None else f"CPUs: {num_cpus} (--num-cpus; detected {cpus})")
    kind, device, _dev_mem = detect_accelerator()
    resources: dict[str, float] = {}
    gpus = num_gpus
    if kind == "metal":
        resources[APPLE_GPU_RESOURCE] = 1.0
        gpus = 1 if num_gpus is None else num_gpus
    elif kind == "cuda":
        notes.append("GPUs: NVIDIA GPUs are counted by Ray itself (CUDA_VISIBLE_DEVICES / NVML)")
    elif num_gpus is None:
        gpus = 0
        notes.append(f"GPUs: none ({device}); no {APPLE_GPU_RESOURCE} resource")
    override = parse_resources_json(resources_override)
    if override:
        resources = override  # the override is the whole custom-resource set
        notes.append(f"resources: {json.dumps(override, sort_keys=True)} (--resources-override)")
    total = total_memory()
    ray_mem, store = memory_split(total, mlx_memory_fraction)
    if memory is not None:
        ray_mem = parse_size(memory)
    if object_store_memory is not None:
        store = parse_size(object_store_memory)
        if store < OBJECT_STORE_MIN:
            raise BadRequest(f"--object-store-memory must be at least {fmt_bytes(OBJECT_STORE_MIN)} (Ray's minimum)")
    left = total - ray_mem - store
    notes.append(f"memory: Ray {fmt_bytes(ray_mem)} + object store {fmt_bytes(store)} of {fmt_bytes(total)}; "
                 f"{fmt_bytes(left)} left to MLX")
    node_labels = {"mlx-ray.io/accelerator": kind}
    node_labels.update(parse_labels(labels))
    return NodeResources(num_cpus=num_cpus if num_cpus is not None else cpus, num_gpus=gpus, resources=resources,
                         memory=ray_mem, object_store_memory=store, total_memory=total, accelerator=kind,
                         device=device, node_name=node_name or default_node_name(), labels=node_labels, notes=notes)
