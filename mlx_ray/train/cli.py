"""``mlx-ray finetune``: LoRA / DoRA / QLoRA on a cached model as a Ray Train job; the adapter lands next
to its base (``<base>-adapters/NAME``) and is served as ``<base>:NAME``."""

from __future__ import annotations

import argparse
import json
import sys

from mlx_ray.errors import BadRequest

from .config import DEFAULT_RESOURCES, FinetuneConfig


def configure_parser(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig.model_fields
    p.add_argument("--model", required=True, help="base model: cache name (`mlx-ray models list`) or directory; "
                                                  "a quantized base trains QLoRA")
    p.add_argument("--data", required=True, help="training JSONL: chat `messages`, `prompt`/`completion` or `text`")
    p.add_argument("--valid", help="validation JSONL (same format)")
    p.add_argument("--name", required=True, help="the adapter's name")
    p.add_argument("--fine-tune-type", choices=("lora", "dora"), default="lora")
    for flag, kind in (("rank", int), ("scale", float), ("dropout", float), ("num-layers", int), ("iters", int),
                       ("batch-size", int), ("learning-rate", float), ("max-seq-length", int),
                       ("grad-accumulation-steps", int), ("seed", int), ("steps-per-report", int),
                       ("steps-per-eval", int), ("val-batches", int), ("save-every", int),
                       ("max-failures", int)):
        field = d[flag.replace("-", "_")]
        p.add_argument(f"--{flag}", type=kind, default=field.default,
                       help=f"{field.description + '; ' if field.description else ''}default {field.default}")
    p.add_argument("--keys", help="comma-separated modules to adapt in a layer (default: every linear layer)")
    p.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing (less memory)")
    p.add_argument("--mask-prompt", action="store_true", help="train on the answer only")
    p.add_argument("--address", help="Ray cluster to run on (default: an embedded local Ray declaring --resources)")
    p.add_argument("--resources", default=json.dumps(DEFAULT_RESOURCES),
                   help="Ray resources per worker, JSON (default %(default)s)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per worker (default 1)")
    p.add_argument("--storage-path", help="where Ray Train keeps checkpoints (shared by all nodes on a cluster)")
    p.add_argument("--cache-dir", help="model cache root (default: $MLX_RAY_CACHE or ~/.cache/mlx-ray/models)")
    p.add_argument("--force", action="store_true", help="replace an adapter of the same name")
    p.add_argument("--no-memory-check", action="store_true", help="skip the memory check")
    p.add_argument("--sleep-serving", action="store_true",
                   help="put the mlx-ray replicas on the job's node to sleep for the job (found through Ray "
                        "Serve on the cluster) and wake them afterwards, even when the job fails")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    try:
        resources = json.loads(args.resources)
    except ValueError as e:
        raise BadRequest(f"--resources is not JSON ({e})", param="resources") from None
    if not isinstance(resources, dict):
        raise BadRequest("--resources must be a JSON object, e.g. '{\"gpu_apple_mps\": 1}'", param="resources")
    fields = {k: getattr(args, k) for k in FinetuneConfig.model_fields if hasattr(args, k)}
    fields.update(resources=resources, check_memory=not args.no_memory_check,
                  keys=[k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None)
    return FinetuneConfig.parse(**fields)


def progress_line(m: dict) -> str:
    val = f"  val {m['val_loss']:.3f}" if m.get("val_loss") is not None else ""
    mark = "  [checkpoint]" if m.get("checkpoint") else ""
    return (f"[mlx-ray] iter {m['iteration']:>5}/{m['iters']}  loss {m['train_loss']:.3f}{val}  "
            f"{m['tokens_per_second']:.0f} tok/s  peak {m['peak_memory_gb']:.2f} GB{mark}")


def main(args: argparse.Namespace) -> int:
    from .job import finetune

    cfg = config_from_args(args)
    result = finetune(cfg, address=args.address,
                      progress=lambda m: print(progress_line(m), file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        m = result.manifest
        val = f", validation loss {m['val_loss']:.3f}" if m.get("val_loss") is not None else ""
        print(f"published {result.adapter} (train loss {m['train_loss']:.3f}{val}, {m['iterations']} iterations); "
              f"serve it as {result.model}")
    return 0
