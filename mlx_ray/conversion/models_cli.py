"""``mlx-ray models list|verify|rm``: the model cache from the command line.

``list`` and ``verify`` only read, so they work on a read-only mount.
"""

from __future__ import annotations

import argparse
import json

from mlx_ray.errors import CorruptModel

from . import cache


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", help="model cache root (default: $MLX_RAY_CACHE or ~/.cache/mlx-ray/models)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="show the models on the cache")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ve = sub.add_parser("verify", help="re-hash a model against its manifest")
    ve.add_argument("model", help="cache name (as `models list` prints it), model directory, or BASE:ADAPTER")
    ve.add_argument("--fast", action="store_true", help="check sizes and headers only, no hashing")
    ve.add_argument("--json", action="store_true", help="machine-readable output")
    rm = sub.add_parser("rm", help="remove a model from the cache")
    rm.add_argument("model", help="cache name, as `models list` prints it (with its adapters), or BASE:ADAPTER")
    for p in (ls, ve, rm):
        p.add_argument("--cache-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # unreachable


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _list(args) -> int:
    models = cache.list_models(args.cache_dir)
    if args.json:
        print(json.dumps([m.as_dict() for m in models], indent=2))
        return 0
    if not models:
        print(f"no models in {cache.cache_root(args.cache_dir)}")
        return 0
    rows = [["NAME", "QUANTIZATION", "SIZE", "SOURCE"]]
    for m in models:
        rows.append([m.name, m.quantization, human_size(m.size), m.source or "?"])
        rows += [_adapter_row(a) for a in m.adapters]
    print(_table(rows))
    return 0


def _adapter_row(a: dict) -> list[str]:
    """An adapter's row under its base: ``  :NAME``, its type and rank, size, final losses."""
    if a.get("error"):
        return [f"  :{a['name']}", "adapter", "?", f"broken: {a['error']}"]
    kind = f"{'q' if a['base_quantized'] else ''}{a['fine_tune_type']} r{a['rank']}"
    losses = f"loss {a['train_loss']:.3f}" if a.get("train_loss") is not None else ""
    if a.get("val_loss") is not None:
        losses += f", val {a['val_loss']:.3f}"
    return [f"  :{a['name']}", kind, human_size(a["size"]), f"adapter, {a['iterations']} iters{', ' + losses if losses else ''}"]


def _verify(args) -> int:
    from mlx_ray.adapters import parse_model_name, resolve_adapter, verify_adapter

    if parse_model_name(args.model)[1] is not None:
        _, path = resolve_adapter(args.model, args.cache_dir)
        problems = verify_adapter(path, deep=not args.fast)
    else:
        path = cache.resolve_model(args.model, args.cache_dir)
        problems = cache.verify_model(path, deep=not args.fast)
    if args.json:
        print(json.dumps({"path": str(path), "ok": not problems, "problems": problems}, indent=2))
    else:
        for p in problems:
            print(f"  {p}")
    if problems:
        raise CorruptModel(f"{path}: {len(problems)} problem(s), first: {problems[0]}; re-convert with --force")
    if not args.json:
        print(f"{path}: OK")
    return 0


def _rm(args) -> int:
    print(f"removed {cache.remove_model(args.model, args.cache_dir)}")
    return 0


def main(args: argparse.Namespace) -> int:
    return {"list": _list, "verify": _verify, "rm": _rm}[args.action](args)
