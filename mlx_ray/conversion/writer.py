"""Tensor-by-tensor weight conversion with bounded memory.

``mx.load`` is lazy: it reads a safetensors header and returns arrays that are
read from disk only when evaluated. So every shard is "loaded" at once (no
data is read), the AWQ repack (:mod:`.awq`) and mlx-lm's ``Model.sanitize``
run once on the whole lazy dict (so sanitize sees every tensor, e.g. all MoE
experts it stacks, whichever shard they are in), and then each output tensor is
evaluated on its own, collected into an output shard no larger than the
largest source shard, written, and dropped. Peak memory is about one shard
plus one tensor's temporaries, whatever the model size (see
``bench/convert_memory.py``); mlx-lm's own ``convert`` quantizes the whole
model before writing and peaks higher.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm import tqdm

from mlx_ray.errors import CorruptModel

from . import awq as awq_mod
from .quant import QuantSpec, layer_decider


EMBED_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
EMBED_Q = {"group_size": 64, "bits": 4, "mode": "affine"}


@dataclass
class WriteResult:
    files: list[str] = field(default_factory=list)
    per_layer: dict = field(default_factory=dict)   # path -> quant params differing from the default
    n_quantized: int = 0
    n_tensors: int = 0


def _load(shard: Path) -> dict:
    try:
        return mx.load(str(shard))
    except Exception as e:  # noqa: BLE001 - MLX raises RuntimeError/ValueError for bad files
        raise CorruptModel(f"cannot read safetensors file {shard}: {e}; re-download or re-convert it") from e


class ShardWriter:
    def __init__(self, model, spec: QuantSpec, cast_dtype: str | None, awq_cfg: dict | None, progress: bool,
                 quantize_embeddings: bool = False):
        self.model = model
        self.spec = spec
        self.cast = getattr(mx, cast_dtype) if cast_dtype else None
        self.awq = awq_cfg
        self.modules = dict(model.named_modules())
        # AWQ layers are repacked exactly where MLX has the group size; otherwise (or
        # with --no-quantize) they become floats and go through the normal path.
        self.awq_exact = bool(awq_cfg) and spec.quantized and awq_cfg["group_size"] in awq_mod.MLX_GROUPS
        self.decide = layer_decider(spec, model) if spec.quantized and not self.awq_exact else None
        # AWQ leaves the embedding and output layers float (3.1 GB of the seed's 32B in fp16); on request they
        # are quantized here with MLX's default affine 4-bit group 64 (0.56 bytes a weight).
        self.embed_q = EMBED_Q if quantize_embeddings and self.awq_exact else None
        self.cast_pred = getattr(model, "cast_predicate", None) or (lambda _k: True)
        self.progress = progress
        self.result = WriteResult()
        self.param_names = {k for k, _ in tree_flatten(model.parameters())}  # lazy: nothing is evaluated
        self.model_type = getattr(getattr(model, "args", None), "model_type", type(model).__module__)

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
        if self.embed_q is not None and key in EMBED_KEYS:
            self.result.per_layer[key[: -len(".weight")]] = self.embed_q  # differs from the AWQ default: say so
            return self._quantize(key[: -len(".weight")], v, self.embed_q)
        if key.endswith(".weight") and self.decide is not None:
            path = key[: -len(".weight")]
            module = self.modules.get(path)
            params = self.decide(path, module, v.shape) if module is not None else None
            if params:
                return self._quantize(path, v, params)
        if self.cast is not None and mx.issubdtype(v.dtype, mx.floating) and self.cast_pred(key):
            v = v.astype(self.cast)
        return {key: v}

    def _known(self, key: str) -> bool:
        if key in self.param_names:
            return True
        head, _, tail = key.rpartition(".")
        return tail in ("scales", "biases") and f"{head}.weight" in self.param_names  # repacked AWQ

    def _sanitize(self, weights: dict) -> dict:
        """mlx-lm's sanitize on the whole (lazy) model; every key left must be a model parameter."""
        fn = getattr(self.model, "sanitize", None)
        try:
            out = fn(weights) if fn is not None else weights
        except KeyError as e:
            raise CorruptModel(f"incomplete checkpoint: tensor {e} that mlx-lm's {self.model_type} model "
                               f"needs is missing; re-download it") from e
        unknown = [k for k in out if not self._known(k)]
        if unknown:
            raise CorruptModel(f"checkpoint does not match mlx-lm's {self.model_type} model: {len(unknown)} "
                               f"unexpected tensor(s) such as {', '.join(unknown[:3])}")
        return out

    # -- the stream ---------------------------------------------------------
    def run(self, shards: list[Path], out_dir: Path) -> WriteResult:
        weights: dict = {}
        for shard in shards:
            weights.update(_load(shard))             # lazy: headers only
        limit = max(max(s.stat().st_size for s in shards), 64 << 20)
        if self.awq:
            weights = awq_mod.transform(weights, self.awq, exact=self.awq_exact)
        weights = self._sanitize(weights)
        bar = tqdm(total=sum(v.nbytes for v in weights.values()), unit="B", unit_scale=True, desc="convert",
                   disable=not self.progress, leave=False)
        parts: list[tuple[Path, list[str]]] = []
        out: dict = {}
        size = 0

        def flush() -> None:
            nonlocal out, size
            part = out_dir / f".part-{len(parts):05d}.safetensors"
            _save(part, out)
            parts.append((part, sorted(out)))
            out, size = {}, 0
            mx.clear_cache()

        try:
            for key in list(weights):
                v = weights.pop(key)
                nbytes = v.nbytes
                produced = self._tensor(key, v)
                del v
                new = sum(a.nbytes for a in produced.values())  # known from shapes, before evaluation
                if out and size + new > limit:
                    flush()                              # keep the resident output under one shard
                mx.eval(*produced.values())
                out.update(produced)
                size += new
                self.result.n_tensors += 1
                bar.update(nbytes)
            if out:
                flush()
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


