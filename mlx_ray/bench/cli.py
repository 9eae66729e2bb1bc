"""``mlx-ray bench``: MLX against torch on one model; ``bench serve``: load-test
an OpenAI endpoint; ``bench compare A.json B.json``: the change between runs.

Thin argparse glue; the work is in ``runner`` / ``serve`` / ``compare``.
"""

from __future__ import annotations


def configure_parser(parser) -> None:
    from . import serve

    sub = parser.add_subparsers(dest="action", metavar="{serve,compare}")
    serve.configure(sub.add_parser("serve", help="load-test an OpenAI-compatible endpoint"))
    c = sub.add_parser("compare", help="show the change between two bench JSON files")
    c.add_argument("a", help="baseline JSON (before)")
    c.add_argument("b", help="new JSON (after)")


def main(args) -> int:
    if args.action == "serve":
        from .serve import main_serve

        return main_serve(args)
    raise SystemExit("not implemented yet")
