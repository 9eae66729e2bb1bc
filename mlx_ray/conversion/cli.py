"""``mlx-ray convert SOURCE ...``: thin argparse glue over :func:`convert.convert`."""

from __future__ import annotations

import argparse
import signal

from .quant import AFFINE_BITS, AFFINE_GROUPS, DTYPES, MODES


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source",
                        help="hub repo id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or local HF directory")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", help="write exactly this directory instead of a cache entry")
    where.add_argument("--cache-dir", metavar="ROOT",
                       help="model cache root (default: $MLX_RAY_CACHE or ~/.cache/mlx-ray/models)")
    parser.add_argument("--q-bits", type=int, default=None, metavar="N",
                        help=f"bits per weight (affine: {'/'.join(map(str, AFFINE_BITS))}; default 4)")
    parser.add_argument("--q-group-size", type=int, default=None, metavar="G",
                        help=f"quantization group size (affine: {'/'.join(map(str, AFFINE_GROUPS))}; default 64; "
                             f"mxfp4/mxfp8 need 32, nvfp4 16)")
    parser.add_argument("--q-mode", default="affine", metavar="MODE", help=f"quantization mode: {', '.join(MODES)}")
    parser.add_argument("--quant-recipe", default=None, metavar="R",
                        help="mixed precision (mlx-lm's recipes), e.g. mixed_4_6: 6 bits for v_proj/down_proj in "
                             "sensitive layers and lm_head, 4 elsewhere")
    parser.add_argument("--dtype", default=None, metavar="D",
                        help=f"dtype of unquantized tensors: {', '.join(DTYPES)} (default: the source's)")
    parser.add_argument("--no-quantize", action="store_true", help="keep full precision (see --dtype)")
    parser.add_argument("--quantize-embeddings", action="store_true",
                        help="AWQ sources: also quantize the float embedding and output layers (4-bit, group 64; "
                             "2.2 GB less on Qwen2.5-32B-AWQ; `mlx-ray plan` shows what it buys)")
    parser.add_argument("--revision", default=None, metavar="REV", help="hub revision (branch, tag or commit)")
    parser.add_argument("--force", action="store_true", help="replace an existing target")
    parser.add_argument("--verify", action="store_true",
                        help="load the result and run one forward pass before publishing")
    parser.add_argument("--lock-wait", type=float, default=None, metavar="SECONDS",
                        help="seconds to wait for a concurrent convert of the same target (default: wait)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _exit_on_sigterm(signum, _frame) -> None:
    # Unwind like Ctrl-C so the staging directory and the lock are cleaned up.
    raise SystemExit(128 + signum)


def main(args: argparse.Namespace) -> int:
    from .convert import convert

    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    path = convert(args.source, out=args.out, cache_dir=args.cache_dir, quantize=not args.no_quantize,
                   q_bits=args.q_bits, q_group_size=args.q_group_size, q_mode=args.q_mode,
                   quant_recipe=args.quant_recipe, dtype=args.dtype, revision=args.revision, force=args.force,
                   verify=args.verify, progress=not args.quiet, lock_wait=args.lock_wait,
                   quantize_embeddings=args.quantize_embeddings)
    print(path)
    return 0
