"""Load the two sides of a comparison and describe the machine they ran on.

* MLX: ``mlx_lm.load`` on a converted model (a cache name or a directory),
  on MLX's default device (Metal on macOS, CPU or CUDA on Linux).
* torch: ``transformers`` on an HF repo id or directory, on ``mps``, then
  ``cuda``, then ``cpu`` (``device=`` overrides).

Both the parity harness and ``mlx-ray bench`` use these.
"""

from __future__ import annotations

import gc
import json
import platform
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadRequest, NotFound

TORCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Side:
    """One loaded backend: its model, tokenizer and what it is."""

    backend: str  # "mlx" or "torch"
    model: Any
    tokenizer: Any
    info: dict = field(default_factory=dict)  # path, device, dtype, quantization, weight_bytes
    config: dict = field(default_factory=dict)  # the model's config.json


def resolve_mlx_path(spec: str) -> Path:
    try:
        from mlx_ray.conversion.cache import resolve_model
    except ImportError:  # conversion package not installed: plain paths only
        p = Path(spec).expanduser()
        if (p / "config.json").is_file():
            return p
        raise NotFound(f"MLX model {spec!r} is not a model directory (no config.json)", param="mlx") from None
    return resolve_model(spec)


def mlx_device() -> str:
    import mlx.core as mx

    dev = mx.default_device()
    if dev.type == mx.gpu:
        return "gpu (Metal)" if mx.metal.is_available() else "gpu (CUDA)"
    return "cpu"


def quant_of(config: dict) -> dict | None:
    """The ``quantization`` block of an MLX config (bits, group_size, mode), or None."""
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        return None
    return {"bits": q["bits"], "group_size": q.get("group_size"), "mode": q.get("mode", "affine")}


def quant_label(q: dict | None, dtype: str) -> str:
    if not q:
        return dtype
    mode = q.get("mode", "affine")
    return f"q{q['bits']}-g{q['group_size']}" if mode == "affine" else f"{mode}-g{q['group_size']}"


def _mlx_load(path: Path):
    """The engine's loader (RoPE config guard, CPU quantized-matmul kernel): the path mlx-ray serves."""
    try:
        from mlx_ray.engine.loader import load
    except ImportError:  # a build without the engine: plain mlx-lm
        from mlx_lm import load as mlx_load

        try:
            model, tok = mlx_load(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise BadRequest(f"mlx_lm cannot load {path}: {e}") from None
        return model, tok, False
    model, tok, info = load(str(path))
    return model, tok, bool(info.cpu_kernel)


def load_mlx(spec: str) -> Side:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    path = resolve_mlx_path(spec)
    model, tok, cpu_kernel = _mlx_load(path)
    config = json.loads((path / "config.json").read_text())
    params = tree_flatten(model.parameters())
    weight_bytes = sum(v.nbytes for _, v in params)
    floats = [v.dtype for k, v in params if k.endswith("weight") and mx.issubdtype(v.dtype, mx.floating)]
    dtype = str(floats[0]).replace("mlx.core.", "") if floats else "unknown"
    q = quant_of(config)
    info = {"path": str(path), "device": mlx_device(), "dtype": dtype, "quantization": quant_label(q, dtype),
            "quant": q, "weight_bytes": int(weight_bytes), "cpu_kernel": cpu_kernel}
    return Side("mlx", model, tok, info, config)


def pick_torch_device(wanted: str | None = None) -> str:
    import torch

    if wanted:
        ok = {"cpu": True, "cuda": torch.cuda.is_available(),
              "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
        base = wanted.split(":")[0]
        if base not in ok:
            raise BadRequest(f"--device must be mps, cuda[:N] or cpu, got {wanted!r}")
        if not ok[base]:
            raise BadRequest(f"--device {wanted}: not available on this machine (torch {torch.__version__})")
        return wanted
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_torch(source: str, device: str | None = None, dtype: str = "float32") -> Side:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in TORCH_DTYPES:
        raise BadRequest(f"torch dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    dev = pick_torch_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
    except OSError as e:
        raise NotFound(f"transformers cannot load {source!r} (offline: pass a local directory): "
                       f"{str(e).splitlines()[0]}", param="hf") from None
    model.to(dev).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    from ..blas import loaded_blas

    info = {"path": source, "device": dev, "dtype": dtype, "quantization": dtype, "weight_bytes": int(weight_bytes),
            "threads": torch.get_num_threads() if dev == "cpu" else None,
            "process_blas": loaded_blas()}  # MLX's OpenBLAS preload must not be in torch's process
    return Side("torch", model, tok, info)


def free(side: Side | None) -> None:
    """Drop a side's model and return its memory to the device."""
    if side is None:
        return
    backend = side.backend
    side.model = None
    gc.collect()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            torch.mps.empty_cache()
    else:
        import mlx.core as mx

        mx.clear_cache()


def process_peak_rss() -> int:
    """Peak resident set size of this process, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def environment() -> dict:
    """Versions, machine and BLAS: every report carries this."""
    from importlib.metadata import PackageNotFoundError, version

    from ..blas import loaded_blas

    versions = {}
    for pkg in ("mlx", "mlx-lm", "torch", "transformers", "mlx-ray"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or None, "versions": versions, "mlx_blas": loaded_blas()}
