"""Shard-by-shard weight conversion with bounded memory.

mlx-lm's ``convert`` loads the whole model (lazily), quantizes it with
``nn.quantize`` and then writes 5 GB shards; how much is resident at once is up
to MLX's graph evaluation. Here one source shard is processed at a time, each
tensor is evaluated on its own and dropped once written, and MLX's buffer
cache is cleared between shards. Peak memory is then about one source shard
plus its output, whatever the model size (see ``bench/convert_memory.py``).

``Model.sanitize`` is mlx-lm's and runs per shard. A few architectures need
tensors from several shards at once (e.g. stacking MoE experts); when sanitize
raises ``KeyError`` the shard is carried over and merged with the next one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from mlx_ray.errors import CorruptModel

from . import awq as awq_mod
from .quant import QuantSpec, layer_decider


@dataclass
class WriteResult:
    files: list[str] = field(default_factory=list)
    per_layer: dict = field(default_factory=dict)   # path -> quant params differing from the default
    n_quantized: int = 0
    n_tensors: int = 0


def _to_numpy(a: mx.array) -> np.ndarray:
    return np.asarray(a) if a.dtype != mx.bfloat16 else np.asarray(a.astype(mx.float32))


def _load(shard: Path) -> dict:
    try:
        return mx.load(str(shard))
    except Exception as e:  # noqa: BLE001 - MLX raises RuntimeError/ValueError for bad files
        raise CorruptModel(f"cannot read safetensors file {shard}: {e}; re-download or re-convert it") from e


class ShardWriter:
    def __init__(self, model, spec: QuantSpec, cast_dtype: str | None, awq_cfg: dict | None, progress: bool):
        self.model = model
        self.spec = spec
        self.cast = getattr(mx, cast_dtype) if cast_dtype else None
        self.awq = awq_cfg
        self.modules = dict(model.named_modules())
        self.decide = layer_decider(spec, model) if spec.quantized and not awq_cfg else None
        self.cast_pred = getattr(model, "cast_predicate", None) or (lambda _k: True)
        self.progress = progress
        self.result = WriteResult()

    # -- one tensor ---------------------------------------------------------
    def _quantize(self, path: str, w: mx.array, params: dict) -> dict:
        if self.cast is not None:
            w = w.astype(self.cast)
        packed = mx.quantize(w, params["group_size"], params["bits"], mode=params["mode"])
        out = {f"{path}.weight": packed[0], f"{path}.scales": packed[1]}
        if len(packed) > 2 and packed[2] is not None:
            out[f"{path}.biases"] = packed[2]
        self.result.n_quantized += 1
        if params != self.spec.params() or self.spec.recipe:
            self.result.per_layer[path] = params
        return out

    def _tensor(self, key: str, v: mx.array) -> dict:
        if key.endswith(".weight") and self.decide is not None:
            path = key[: -len(".weight")]
            module = self.modules.get(path)
            params = self.decide(path, module, v.shape) if module is not None else None
            if params:
                return self._quantize(path, v, params)
        if self.cast is not None and mx.issubdtype(v.dtype, mx.floating) and self.cast_pred(key):
            v = v.astype(self.cast)
        return {key: v}

    def _requantize_awq(self, prefix: str, w: np.ndarray) -> dict:
        """Fallback for AWQ group sizes MLX lacks, or --no-quantize: AWQ's floats, then our spec."""
        arr = mx.array(w)
        if self.spec.quantized:
            params = {**self.spec.params()}
            return self._quantize(prefix, arr, params)
        return {f"{prefix}.weight": arr.astype(self.cast or mx.float16)}

    # -- the stream ---------------------------------------------------------
    def run(self, shards: list[Path], headers: dict, out_dir: Path) -> WriteResult:
        total = sum(sum(int(np.prod(v["shape"])) * _itemsize(v["dtype"]) for k, v in h.items()
                        if k != "__metadata__") for h in headers.values())
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not self.progress,
                   leave=False)
        pending: dict = {}
        parts: list[tuple[Path, list[str]]] = []
        try:
            for i, shard in enumerate(shards):
                last = i == len(shards) - 1
                weights = {**pending, **_load(shard)}
                pending = {}
                if self.awq:
                    weights, pending = awq_mod.split_ready(weights, self.awq["zero_point"])
                    need_float = self.awq["group_size"] not in awq_mod.MLX_GROUPS or not self.spec.quantized
                    weights = awq_mod.transform(weights, self.awq, _to_numpy, mx.array,
                                                requantize=self._requantize_awq if need_float else None)
                if hasattr(self.model, "sanitize"):
                    try:
                        weights = self.model.sanitize(weights)
                    except KeyError:
                        if last:
                            raise
                        pending.update(weights)  # needs tensors from the next shard
                        continue
                out: dict = {}
                for key in list(weights):
                    v = weights.pop(key)
                    nbytes = v.nbytes
                    produced = self._tensor(key, v)
                    mx.eval(*produced.values())
                    out.update(produced)
                    self.result.n_tensors += 1
                    bar.update(nbytes)
                del weights
                if out:
                    part = out_dir / f".part-{len(parts):05d}.safetensors"
                    _save(part, out)
                    parts.append((part, sorted(out)))
                del out
                mx.clear_cache()
            if pending:
                raise CorruptModel(f"incomplete checkpoint: {len(pending)} tensor(s) such as "
                                   f"{next(iter(pending))} could not be matched with their other parts")
        finally:
            bar.close()
        return self._finish(parts, out_dir)

    def _finish(self, parts, out_dir: Path) -> WriteResult:
        n = len(parts)
        weight_map, total = {}, 0
        for i, (part, keys) in enumerate(parts):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            part.rename(out_dir / name)
            total += (out_dir / name).stat().st_size
            weight_map.update({k: name for k in keys})
            self.result.files.append(name)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return self.result


def _save(path: Path, arrays: dict) -> None:
    """mx.save_safetensors, with its errno-less RuntimeError turned back into an OSError."""
    try:
        mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
    except RuntimeError as e:
        need = sum(v.nbytes for v in arrays.values())
        if shutil.disk_usage(path.parent).free < need + (1 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise OSError(errno.EIO, str(e), str(path)) from e


_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 4)
