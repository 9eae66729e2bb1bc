"""``convert()``: a Hugging Face (or AutoAWQ) checkpoint -> an MLX model on the cache.

The steps, each in its own module:

1. validate the quantization request (:mod:`.quant`), before touching any file;
2. resolve the source, local or hub, and check every safetensors header (:mod:`.source`);
3. normalize config.json for mlx-lm, RoPE included (:mod:`.hfconfig`);
4. take the target's lock and stream the shards into a hidden staging directory
   (:mod:`.publish`, :mod:`.writer`, :mod:`.awq`);
5. copy the tokenizer files, write ``manifest.json`` (:mod:`.manifest`), optionally
   load the result and run one forward (``verify``);
6. fsync and rename the staging directory to its final name.

The output loads with plain ``mlx_lm.load``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from mlx_ray.errors import BadRequest, Conflict, CorruptModel, MlxRayError

from . import hfconfig, publish
from .awq import MLX_GROUPS, awq_config
from .cache import cache_root
from .manifest import verify_model, write_manifest
from .quant import QuantSpec, make_spec, normalize_dtype
from .source import Source, copy_files, read_header, resolve_source, sha256_file


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[mlx-ray] {msg}", file=sys.stderr, flush=True)


def _source_dtype(config: dict) -> str | None:
    d = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype")
    try:
        return normalize_dtype(d) if isinstance(d, str) else None
    except MlxRayError:
        return None


def _output_config(config: dict, spec: QuantSpec, awq: dict | None, cast: str | None, per_layer: dict) -> dict:
    cfg = hfconfig.normalize_config(config)
    if cast:  # the dtype the unquantized tensors were written in
        cfg["torch_dtype"] = cfg["dtype"] = cast
    for k in ("quantization", "quantization_config"):
        cfg.pop(k, None)
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"].pop(k, None)
    if awq and spec.quantized and awq["group_size"] in MLX_GROUPS:
        q = {"group_size": awq["group_size"], "bits": 4, "mode": "affine"}
    elif spec.quantized:
        q = spec.params()
    else:
        return cfg
    q.update(per_layer)
    cfg["quantization"] = q
    cfg["quantization_config"] = q
    return cfg


def _embedding_rows(model) -> int:
    """Rows of the model's input embedding (the largest valid token id + 1)."""
    emb = getattr(getattr(model, "model", model), "embed_tokens", None)
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(getattr(model.args, "vocab_size", 1 << 62))


def verify_loads(model_dir: Path) -> None:
    """Load the model with mlx-lm and run one forward pass; CorruptModel if anything is off."""
    import mlx.core as mx
    from mlx_lm import load

    try:
        model, tokenizer = load(str(model_dir))
        # Only ids the embedding has: MLX's gather does not bounds-check on CPU, so an id past
        # the embedding's rows (a tokenizer larger than the model's vocab, as in test
        # checkpoints) reads arbitrary memory and made this check fail at random.
        vocab = _embedding_rows(model)
        ids = [t for t in tokenizer.encode("Hello, world") if t < vocab] or [0]
        logits = model(mx.array([ids]))
        mx.eval(logits)
    except Exception as e:  # noqa: BLE001 - anything here means the output is unusable
        raise CorruptModel(f"--verify failed: the converted model does not load/run with mlx-lm: "
                           f"{type(e).__name__}: {e}") from e
    if logits.shape[-1] == 0 or not bool(mx.all(mx.isfinite(logits.astype(mx.float32))).item()):
        raise CorruptModel("--verify failed: the forward pass produced non-finite logits")


def _check_prequantized(config: dict, awq: dict | None, spec: QuantSpec, **asked) -> None:
    """Only AWQ checkpoints are accepted already quantized, and their quantization is fixed."""
    qc = config.get("quantization") or config.get("quantization_config") or \
        (config.get("text_config") or {}).get("quantization_config")
    if qc and not awq:
        method = qc.get("quant_method") or ("mlx" if "bits" in qc else "unknown")
        raise BadRequest(f"source is already quantized ({method}); only AutoAWQ GEMM checkpoints can be "
                         f"repacked: convert from the original float weights instead")
    if not awq or not spec.quantized or awq["group_size"] not in MLX_GROUPS:
        return
    clash = [f"--{k.replace('_', '-')} {v}" for k, v in asked.items()
             if v is not None and not (k == "q_bits" and v == 4) and not (k == "q_mode" and v == "affine")
             and not (k == "q_group_size" and v == awq["group_size"])]
    if clash:
        raise BadRequest(f"AWQ checkpoints are repacked as-is (4-bit affine, group {awq['group_size']}); drop "
                         f"{' '.join(clash)}, or pass --no-quantize to dequantize them")


@dataclasses.dataclass
class Plan:
    """Everything decided before writing: what to read, what to do with it, where it goes."""

    src: Source
    config: dict              # the source config.json, as is
    spec: QuantSpec
    awq: dict | None          # the AWQ settings when the source is an AutoAWQ checkpoint
    cast: str | None          # dtype of the unquantized tensors (None: keep the source's)
    tag: str                  # cache variant name, e.g. q4-g64
    target: Path
    quantize_embeddings: bool = False  # AWQ: also quantize the (float) embedding and output layers


def plan(source: str, *, out=None, cache_dir=None, quantize=True, q_bits=None, q_group_size=None, q_mode="affine",
         quant_recipe=None, dtype=None, revision=None, quantize_embeddings=False) -> Plan:
    """Validate everything that can be checked without writing anything."""
    spec = make_spec(quantize=quantize, q_bits=q_bits, q_group_size=q_group_size, q_mode=q_mode,
                     quant_recipe=quant_recipe, dtype=dtype)
    src = resolve_source(source, revision)
    try:
        config = json.loads((src.path / "config.json").read_text())
    except ValueError as e:
        raise CorruptModel(f"{src.path / 'config.json'} is not valid JSON: {e}") from e
    hfconfig.model_classes(config)  # unsupported architecture -> one-line BadRequest
    awq = awq_config(config)
    _check_prequantized(config, awq, spec, q_bits=q_bits, q_group_size=q_group_size, q_mode=q_mode,
                        quant_recipe=quant_recipe)
    for shard in src.shards:
        read_header(shard)
    src_dtype = "float16" if awq else _source_dtype(config)
    cast = spec.dtype or src_dtype
    if not spec.quantized:
        spec = dataclasses.replace(spec, dtype=cast or "float32")
        tag = spec.tag()
    elif awq and awq["group_size"] in MLX_GROUPS:
        tag = f"awq-q4-g{awq['group_size']}" + ("-qembed" if quantize_embeddings else "") + \
            (f"-{spec.tag().rsplit('-', 1)[-1]}" if spec.dtype else "")
    else:
        tag = spec.tag()
    if quantize_embeddings and not (awq and spec.quantized and awq["group_size"] in MLX_GROUPS):
        raise BadRequest("--quantize-embeddings applies to AWQ checkpoints (the other quantized conversions "
                         "quantize the embeddings already); drop it")
    target = Path(out).expanduser() if out else cache_root(cache_dir) / src.name / tag
    return Plan(src, config, spec, awq, cast, tag, target.absolute(), quantize_embeddings)


def convert(source: str, *, out=None, cache_dir=None, quantize=True, q_bits=None, q_group_size=None, q_mode="affine",
            quant_recipe=None, dtype=None, revision=None, force=False, verify=False, progress=True,
            lock_wait: float | None = None, quantize_embeddings: bool = False) -> Path:
    """Convert ``source`` (hub id or local HF dir) and return the published model directory.

    ``q_bits`` / ``q_group_size`` default (None) to the mode's own: affine 4 bits
    group 64, mxfp4 4/32, nvfp4 4/16, mxfp8 8/32.

    ``lock_wait``: seconds to wait for a concurrent convert of the same target
    (None = wait as long as it takes; that convert's result is then returned).
    """
    p = plan(
        source, out=out, cache_dir=cache_dir, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
        q_mode=q_mode, quant_recipe=quant_recipe, dtype=dtype, revision=revision,
        quantize_embeddings=quantize_embeddings)
    target = p.target
    if target.exists() and not force:
        raise Conflict(f"{target} already exists; pass --force to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise publish.writable_error(target.parent, e) from e
    with publish.TargetLock(target, wait=lock_wait) as lock:
        if target.exists() and not force:
            if lock.waited and not verify_model(target, deep=False):
                _log(f"{target} was converted meanwhile by a concurrent convert; using it", progress)
                return target
            raise Conflict(f"{target} already exists; pass --force to replace it")
        publish.remove_leftovers(target)
        stage = publish.staging_dir(target)
        try:
            stage.mkdir()
            _build(p, stage, progress)
            if verify:
                _log("verifying: load + one forward pass", progress)
                verify_loads(stage)
            publish.publish(stage, target, replace=force, lock=lock)
        except OSError as e:
            raise publish.writable_error(target, e) from e
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
    _log(f"wrote {target}", progress)
    return target


def _build(p: Plan, stage: Path, progress: bool) -> None:
    from mlx_lm.utils import save_config

    from .writer import ShardWriter

    model = hfconfig.build_model(hfconfig.normalize_config(p.config))
    desc = "AWQ repack" if p.awq else (p.tag if p.spec.quantized else f"cast to {p.cast}")
    _log(f"converting {p.src.spec} ({len(p.src.shards)} shard(s), {desc}) in {stage}", progress)
    result = ShardWriter(model, p.spec, p.cast, p.awq, progress, p.quantize_embeddings).run(p.src.shards, stage)
    save_config(_output_config(p.config, p.spec, p.awq, p.cast, result.per_layer), config_path=stage / "config.json")
    for f in copy_files(p.src.path):
        shutil.copyfile(f, stage / f.name)
    source_files = {f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)}
                    for f in sorted(p.src.path.iterdir()) if f.is_file()}
    quant = {**p.spec.as_dict(), "cast_dtype": p.cast, "tag": p.tag, "quantized_layers": result.n_quantized,
             "quantized_embeddings": p.quantize_embeddings}
    if p.awq:
        quant["awq"] = p.awq
    write_manifest(stage, name=f"{p.src.name}/{p.tag}",
                   source={"id": p.src.repo_id or str(p.src.path), "spec": p.src.spec, "path": str(p.src.path),
                           "revision": p.src.revision, "files": source_files},
                   quantization=quant)
