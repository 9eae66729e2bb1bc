"""Load a model for the engine: resolve the name, load with mlx-lm, describe it.

The engine never parses weights itself: ``mlx_lm.load`` knows 100+
architectures, the tokenizer and the streaming detokenizer. This module only
resolves ``model`` (a cache name as ``mlx-ray models list`` shows it, or a
path), guards against the transformers-5 config renames (FACTS.md), refuses
models whose cache the engine cannot batch and budget, swaps in the CPU
kernels when available (on Metal: the kernels whose on-device verdict enables
them), and measures what the memory policy needs (weight bytes, KV bytes per
token, context length).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import BadRequest, NotFound

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096  # when config.json names no context length


@dataclass
class ModelInfo:
    model_id: str  # what the user asked for (cache name or path)
    path: Path
    weights_bytes: int
    kv_bytes_per_token: int  # K and V over all layers, at the cache dtype
    vocab_size: int  # rows of the output layer (may exceed the tokenizer's)
    max_model_len: int
    dtype: str
    device: str
    cpu_kernel: bool  # mlx_ray.kernels (qmm, dense) patched the model
    metal_kernels: int = 0  # layers routed through a Metal kernel its on-device verdict enabled (skinny_qmm)


def resolve_path(model: str | Path) -> Path:
    """A cache name or a path -> the model directory."""
    try:  # the model cache (mlx_ray.conversion) knows names and paths
        from mlx_ray.conversion.cache import resolve_model
    except ImportError:  # a build without the converter: paths only
        resolve_model = None
    if resolve_model is not None:
        return Path(resolve_model(str(model)))
    path = Path(model).expanduser()
    if not path.is_dir():
        raise NotFound(f"model {model!r} is neither a directory nor a cached model; run `mlx-ray models list`")
    if not (path / "config.json").is_file():
        raise NotFound(f"{path} has no config.json; convert it first with `mlx-ray convert`")
    return path


def _config_overrides(config: dict) -> dict:
    """Keys mlx-lm would otherwise misread, for models not converted by mlx-ray
    (FACTS.md: RoPE theta silently defaults to 10000). The converter's own
    normalization decides which; this only applies it at load time."""
    from mlx_ray.conversion.hfconfig import normalize_config

    fixed = normalize_config(config)
    over = {k: v for k, v in fixed.items() if k != "torch_dtype" and config.get(k) != v}
    if over:
        log.warning("config.json needs normalizing for mlx-lm (%s); `mlx-ray convert` writes it fixed", ", ".join(over))
    return over


def _context_length(config: dict) -> int:
    text = config.get("text_config") or {}
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions", "n_ctx"):
        for src in (config, text):
            if isinstance(src.get(key), int) and src[key] > 0:
                return int(src[key])
    return DEFAULT_CONTEXT


def check_batchable(model: nn.Module, model_type: str) -> None:
    """BadRequest unless every layer's mlx-lm cache is a KVCache or a RotatingKVCache.

    Those are what the engine batches and budgets: mlx-lm's BatchGenerator
    merges them into BatchKVCache / BatchRotatingKVCache, and their size grows
    with the tokens, which is what ``memory.batch_kv_bound`` bounds. Caches
    without ``merge`` (ChunkedKVCache, QuantizedKVCache, ...) cannot be batched
    at all. ArraysCache (the recurrent state of gated-delta / Mamba layers,
    e.g. qwen3_next) is merged by mlx-lm 0.32 and decodes correctly in a
    batch, but it is a fixed state per sequence (tens of MB a row at 80B
    scale) that the per-token KV budget does not count, and on Linux a failed
    allocation is a crash, not an error: refused until the budget models it.
    """
    from mlx_lm.models.cache import CacheList, KVCache, RotatingKVCache, make_prompt_cache

    def leaves(caches):
        for c in caches:
            yield from leaves(c.caches) if isinstance(c, CacheList) else (c,)

    bad = {type(c) for c in leaves(make_prompt_cache(model))} - {KVCache, RotatingKVCache}
    if bad:
        kinds = ", ".join(sorted(t.__name__ for t in bad))
        why = "a per-sequence state the engine's KV budget does not count" if all(hasattr(t, "merge") for t in bad) \
            else "which mlx-lm's BatchGenerator cannot batch"
        raise BadRequest(f"model type {model_type} cannot run in the mlx-ray engine: its mlx-lm cache has {kinds} "
                         f"layers ({why}); the engine batches KVCache and RotatingKVCache models only")


def probe(model: nn.Module) -> tuple[int, int]:
    """(KV-cache bytes one token takes over all layers, vocabulary size), from a 1-token forward."""
    cache = model.make_cache() if hasattr(model, "make_cache") else None
    if cache is None:
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(model)
    logits = model(mx.array([[0]]), cache=cache)
    per_step = 0
    for c in cache:
        for a in c.state if isinstance(c.state, (list, tuple)) else [c.state]:
            if isinstance(a, mx.array) and a.ndim >= 3:
                # KV arrays are (batch, heads, steps, dim); the buffer may be over-allocated.
                per_step += a.nbytes // max(1, a.shape[2])
    return max(1, per_step), int(logits.shape[-1])


def patch_cpu_kernels(model: nn.Module) -> bool:
    """Route matmuls through mlx-ray's CPU kernels (quantized and float weights); True if any layer was."""
    if mx.default_device() != mx.cpu and mx.metal.is_available():
        return False
    try:
        from mlx_ray.kernels import dense, qmm
    except ImportError:
        return False
    patched = 0
    for kernel in (qmm, dense):
        try:
            patched += kernel.patch_model(model)
        except Exception as e:  # a kernel bug must not stop the model from loading
            log.warning("CPU kernel %s not applied: %s", kernel.NAME, e)
    return patched > 0


def _patch_metal_kernels(model: nn.Module) -> int:
    """On a Metal device: route the model's quantized layers through skinny_qmm if its verdict enables it.

    The verdict (mlx_ray/kernels/gate.py, measured in a child process) is on the
    model's own layer shapes at every decode row bucket. Paged attention and the
    sampler are checked on the engine's production variants when the engine
    builds its KV cache (``engine/backend.py``), where the config is known.
    """
    try:
        from mlx_ray.kernels import gate, skinny_qmm
    except ImportError:
        return 0
    device = gate.current_device()
    if not device.metal or (device.mx_device is not None and mx.default_device() != device.mx_device):
        return 0
    try:
        return skinny_qmm.patch_model(model, device=device)
    except Exception as e:  # a kernel bug must not stop the model from loading
        log.warning("Metal kernels not applied: %s", e)
        return 0


def load(model: str | Path) -> tuple[nn.Module, Any, ModelInfo]:
    """Resolve and load ``model``; returns (model, TokenizerWrapper, ModelInfo)."""
    from mlx_lm import load as mlx_load

    path = resolve_path(model)
    config = json.loads((path / "config.json").read_text())
    try:
        mdl, tokenizer = mlx_load(str(path), model_config=_config_overrides(config))
    except (ValueError, FileNotFoundError) as e:
        raise BadRequest(f"cannot load {path} with mlx-lm: {e}") from e
    check_batchable(mdl, config.get("model_type", "?"))
    cpu_kernel = patch_cpu_kernels(mdl)
    metal_kernels = _patch_metal_kernels(mdl)
    params = tree_flatten(mdl.parameters())
    weights_bytes = sum(v.nbytes for _, v in params)
    dtypes = {str(v.dtype).removeprefix("mlx.core.") for _, v in params if v.dtype in (mx.float32, mx.float16, mx.bfloat16)}
    bpt, vocab = probe(mdl)
    info = ModelInfo(
        model_id=str(model),
        path=path,
        weights_bytes=weights_bytes,
        kv_bytes_per_token=bpt,
        vocab_size=vocab,
        max_model_len=_context_length(config),
        dtype=",".join(sorted(dtypes)) or "unknown",
        device=str(mx.default_device()),
        cpu_kernel=cpu_kernel,
        metal_kernels=metal_kernels,
    )
    return mdl, tokenizer, info
