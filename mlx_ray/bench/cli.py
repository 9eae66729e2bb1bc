"""``mlx-ray bench``: MLX against torch on one model; ``bench serve``: load-test
an OpenAI endpoint; ``bench compare A.json B.json``: the change between runs.

Thin argparse glue; the work is in ``runner`` / ``serve`` / ``report``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadRequest


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadRequest(f"{flag} wants comma-separated integers, got {text!r}") from None
    if not vals:
        raise BadRequest(f"{flag} is empty")
    return vals


def configure_parser(parser) -> None:
    from . import serve

    parser.add_argument("--model", help="MLX model: cache name or directory")
    parser.add_argument("--hf", help="HF source for the torch side (default: the model's conversion manifest)")
    parser.add_argument("--backends", default="mlx,torch", help="comma list of mlx, torch (default both)")
    parser.add_argument("--prompt-lengths", default="128,256", help="comma list (default 128,256)")
    parser.add_argument("--batch-sizes", default="1,4", help="comma list (default 1,4)")
    parser.add_argument("--gen-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per shape; figures are medians (default 3)")
    parser.add_argument("--device", help="torch device: mps, cuda[:N] or cpu (default: mps, then cuda, then cpu)")
    parser.add_argument("--torch-dtype", choices=["float32", "bfloat16", "float16"],
                        help="torch dtype (default: the MLX model's float dtype)")
    parser.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the roofline (default: measure)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes for tests: prompt 32, batch 1,2, 8 tokens, 2 repeats")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--plot", help="write a PNG plot (MLX against torch per shape) here")
    from ..kernels_cli import add_kernels_flag

    add_kernels_flag(parser)
    sub = parser.add_subparsers(dest="action", metavar="{serve,compare}")
    serve.configure(sub.add_parser("serve", help="load-test an OpenAI-compatible endpoint"))
    c = sub.add_parser("compare", help="show the change between two bench (or bench serve) JSON files")
    c.add_argument("a", help="baseline JSON (before)")
    c.add_argument("b", help="new JSON (after)")


def main(args) -> int:
    from ..kernels_cli import apply_kernels_flag

    apply_kernels_flag(getattr(args, "kernels", None))  # before any kernel loads; the torch side ignores it
    if args.action == "serve":
        from .serve import main_serve

        return main_serve(args)
    if args.action == "compare":
        from .report import compare

        print(compare(args.a, args.b))
        return 0
    if not args.model:
        raise BadRequest("--model is required (or use `bench serve` / `bench compare`)")
    from . import report as rep
    from .runner import QUICK, BenchConfig, run_bench

    cfg = BenchConfig(model=args.model, hf=args.hf, backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
                      prompt_lengths=_ints(args.prompt_lengths, "--prompt-lengths"),
                      batch_sizes=_ints(args.batch_sizes, "--batch-sizes"), gen_tokens=args.gen_tokens,
                      repeats=args.repeats, device=args.device, torch_dtype=args.torch_dtype,
                      bandwidth_gbs=args.bandwidth_gbs)
    if args.quick:
        cfg.prompt_lengths, cfg.batch_sizes = tuple(QUICK["prompt_lengths"]), tuple(QUICK["batch_sizes"])
        cfg.gen_tokens, cfg.repeats = QUICK["gen_tokens"], QUICK["repeats"]
    result = run_bench(cfg)
    if args.kernels:
        result["kernels"] = args.kernels
    print(rep.describe(result))
    print()
    print(rep.table(result))
    print()
    print(rep.headline_line(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        rep.plot(result, args.plot)
    return 0
