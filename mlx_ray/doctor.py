"""``mlx-ray doctor``: is this machine ready to serve models in the cluster?

Prints one line per check (pass, warn, fail or skip) with a one-line fix for
each warn and fail; exits non-zero when anything fails. ``--json`` prints the
same as a JSON object for machines. The checks live in
``mlx_ray.worker.checks``; nothing heavy is imported until a check runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

STATUS_WIDTH = 4


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="the head's GCS HOST:PORT to check (default $RAY_ADDRESS; skipped when unset)")
    parser.add_argument("--token-file", help="the cluster token file the worker uses (sets RAY_AUTH_MODE=token)")
    parser.add_argument("--cache-dir", help="model cache root (default $MLX_RAY_CACHE, else ~/.cache/mlx-ray/models)")
    parser.add_argument("--deep", action="store_true", help="re-hash every model file (default: sizes and headers)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the head (default 5)")
    parser.add_argument("--service-label", default="io.ray.worker", help="launchd label to check (macOS)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="print only warnings and failures")


def run_checks(args) -> list:
    from .worker import checks as c
    from .worker.command import token_env

    env = dict(os.environ)
    env.update(token_env(args.token_file))
    results = []

    def safe(name, fn, *a):
        try:
            got = fn(*a)
        except Exception as e:  # noqa: BLE001 - a crashing check is a failed check, not a crashed doctor
            got = c.Check(name, c.FAIL, f"check crashed: {type(e).__name__}: {e}", "report this as a bug")
        results.extend(got if isinstance(got, list) else [got])

    safe("mlx", c.check_mlx)
    safe("blas", c.check_blas)
    safe("kernels", c.check_kernels)
    safe("kernels", c.check_metal_kernels)
    safe("torch", c.check_torch)
    safe("head", c.check_head, args.address, args.timeout, env)
    safe("token-auth", c.check_token, env)
    safe("cache", c.check_cache, args.cache_dir, args.deep)
    safe("memory", c.check_memory, args.cache_dir)
    safe("memory-plan", _plan_check, args.cache_dir)
    safe("sleep", c.check_sleep)
    safe("launchd", c.check_agent, args.service_label)
    return results


def _plan_check(cache_dir):
    from .plan_cli import doctor_check  # imports MLX: only when the check runs

    return doctor_check(cache_dir)


def render(results, quiet: bool = False) -> str:
    width = max((len(r.name) for r in results), default=0)
    lines = []
    for r in results:
        if quiet and r.status not in ("warn", "fail"):
            continue
        lines.append(f"{r.status.upper():<{STATUS_WIDTH}}  {r.name:<{width}}  {r.message}")
        if r.fix and r.status in ("warn", "fail"):
            lines.append(f"{'':<{STATUS_WIDTH}}  {'':<{width}}  fix: {r.fix}")
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "warn", "fail", "skip")}
    if not quiet or counts["fail"] or counts["warn"]:
        lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def main(args) -> int:
    results = run_checks(args)
    failed = any(r.status == "fail" for r in results)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [r.as_dict() for r in results]}, indent=2))
    else:
        text = render(results, quiet=args.quiet)
        if text:
            print(text)
    sys.stdout.flush()
    return 1 if failed else 0
