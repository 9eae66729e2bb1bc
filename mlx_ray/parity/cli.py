"""``mlx-ray parity --hf SOURCE --mlx MODEL``: prove the MLX path answers like
the PyTorch path. Exit 0 when every threshold passes, 1 when one fails, 2 on
bad usage (including a tokenizer/vocabulary mismatch). Any other failure is one
line on stderr and exit 1, never a traceback (``MLX_RAY_DEBUG=1`` raises it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import MlxRayError


def configure_parser(p) -> None:
    p.add_argument("--hf", required=True, help="HF repo id or directory, run through transformers (the reference)")
    p.add_argument("--mlx", required=True, help="converted MLX model: cache name or directory, any quantization")
    p.add_argument("--prompts", help="prompts file (.json/.jsonl/.txt); default: the built-in set")
    p.add_argument("--device", help="torch device: mps, cuda[:N] or cpu (default: mps, then cuda, then cpu)")
    p.add_argument("--torch-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="torch side dtype (default float32, the reference)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy continuation length (default 32)")
    p.add_argument("--ppl-tokens", type=int, default=512, help="reference-text tokens for perplexity (default 512)")
    p.add_argument("--thresholds", help="JSON/YAML overriding the default thresholds (see mlx_ray.parity.thresholds)")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                   help="also run the MLX side through the paged KV cache quantized to 4 or 8 bits (affine, per "
                        "group) and report it against torch and against float KV")
    p.add_argument("--kv-group-size", type=int, choices=(32, 64, 128), default=32,
                   help="group size of the quantized KV cache (default 32, the engine's)")
    p.add_argument("--json", help="write the full report (every number) here")
    p.add_argument("--report", help="write the Markdown report here (it is also printed)")
    from ..kernels_cli import add_kernels_flag

    add_kernels_flag(p)


def main(args) -> int:
    try:
        return _main(args)
    except MlxRayError:
        raise  # one line already (mlx_ray.cli prints it)
    except Exception as e:  # noqa: BLE001 - whatever broke inside torch, transformers or MLX: one line, exit 1
        if os.environ.get("MLX_RAY_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ParityFailed(f"{type(e).__name__}: {first} (MLX_RAY_DEBUG=1 shows the traceback)") from None


class ParityFailed(MlxRayError):
    """``mlx-ray parity`` broke on something outside the error taxonomy (exit 1, one line)."""

    kind = "parity_error"


def _main(args) -> int:
    from ..kernels_cli import apply_kernels_flag

    apply_kernels_flag(args.kernels)  # before the MLX side loads any kernel; the torch child does not use them
    from .harness import run_parity, write_json
    from .report import markdown

    report = run_parity(args.hf, args.mlx, prompts=args.prompts, device=args.device, torch_dtype=args.torch_dtype,
                        max_new_tokens=args.max_new_tokens, ppl_tokens=args.ppl_tokens,
                        thresholds_file=args.thresholds, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    if args.kernels:
        report["kernels"] = args.kernels
    md = markdown(report)
    print(md)
    if args.report:
        Path(args.report).write_text(md)
    if args.json:
        write_json(report, args.json)
    if not report["passed"]:
        print(f"mlx-ray parity: {report['verdict']}", file=sys.stderr)
    return 0 if report["passed"] else 1
