"""``mlx-ray bench serve``: sweep concurrency levels against an OpenAI endpoint."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from ..errors import BadRequest
from .openai_load import run_load
from .table import fmt, markdown_table


def builtin_user_prompts() -> list:
    """The parity harness's built-in prompts, as chat messages lists."""
    from ..parity.prompts import load_prompts

    return [p.messages or [{"role": "user", "content": p.text}] for p in load_prompts(None)]


def read_api_key(path: str | None) -> str | None:
    if not path:
        return None
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise BadRequest(f"cannot read --api-key-file {path}: {e.strerror}") from None
    if not key:
        raise BadRequest(f"--api-key-file {path} is empty")
    return key


def sweep(url: str, model: str, levels: list[int], *, num_requests: int | None = None, prompts=None,
          max_tokens: int = 64, api_key: str | None = None, warmup: int = 1, **kw) -> dict:
    """One ``run_load`` per concurrency level (the first level also does the warm-up)."""
    prompts = prompts or builtin_user_prompts()
    runs = []
    for i, c in enumerate(levels):
        n = num_requests or max(2 * c, 4)
        runs.append(run_load(url, model, c, n, prompts, max_tokens, api_key=api_key,
                             warmup=warmup if i == 0 else 0, **kw))
    return {"kind": "serve", "url": url, "model": model, "max_tokens": max_tokens,
            "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs}


def ms(x: float | None) -> str:
    return "-" if x is None else fmt(1000 * x)


def table(report: dict) -> str:
    rows = [[r["concurrency"], f"{r['completed']}/{r['requests']}", r["errors"], fmt(r["output_tok_s"]),
             ms(r["ttft_s"]["p50"]), ms(r["ttft_s"]["p99"]), ms(r["itl_s"]["p50"]), ms(r["itl_s"]["p99"]),
             fmt(r["duration_s"])] for r in report["runs"]]
    head = ["concurrency", "ok", "errors", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
            "ITL p99 ms", "wall s"]
    out = markdown_table(head, rows)
    errs = {k: v for r in report["runs"] for k, v in r["error_kinds"].items()}
    if errs:
        sample = next(s for r in report["runs"] for s in r["error_samples"])
        out += f"\nerrors: {errs}; first: {sample}"
    return out


def main_serve(args) -> int:
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        raise BadRequest(f"--concurrency wants comma-separated integers, got {args.concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise BadRequest("--concurrency levels must be >= 1")
    prompts = None
    if args.prompts:
        from ..parity.prompts import load_prompts

        prompts = [p.messages or [{"role": "user", "content": p.text}] for p in load_prompts(args.prompts)]
    report = sweep(args.url, args.model, levels, num_requests=args.num_requests, prompts=prompts,
                   max_tokens=args.max_tokens, api_key=read_api_key(args.api_key_file), warmup=args.warmup,
                   timeout=args.timeout, temperature=args.temperature)
    print(f"{args.url}  model={args.model}  max_tokens={args.max_tokens}")
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    total = sum(r["requests"] for r in report["runs"])
    failed = sum(r["errors"] for r in report["runs"])
    return 1 if failed == total else 0


def configure(p) -> None:
    p.add_argument("--url", required=True, help="server root or its /v1 base, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name to send in each request")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated levels (default 1,4,16,32)")
    p.add_argument("--num-requests", type=int, default=None, help="requests per level (default 2x concurrency, >= 4)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompts", help="JSON or text file of prompts (default: the built-in set)")
    p.add_argument("--api-key-file", help="file holding the bearer token")
    p.add_argument("--warmup", type=int, default=1, help="requests sent before the first level is timed")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    p.add_argument("--json", help="write every number to this JSON file")
