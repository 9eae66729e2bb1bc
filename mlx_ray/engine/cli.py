"""``mlx-ray generate``: stream one completion to stdout through the engine.

The same ``MLXEngine`` the server runs (continuous batching loop, sampling,
stop handling), with one request. The prompt goes through the model's chat
template unless ``--raw``. A summary (tokens, speeds, finish reason) goes to
stderr so that stdout carries only the generated text.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

from ..errors import BadRequest


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="cache name (see `mlx-ray models list`) or model directory")
    p.add_argument("--prompt", "-p", required=True, help="the prompt; '-' reads it from stdin")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p filter (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same output)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--system", default=None, help="system message (chat template only)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")


def main(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise BadRequest("--max-tokens must be at least 1")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return asyncio.run(_generate(args, prompt))


async def _generate(args: argparse.Namespace, prompt: str) -> int:
    from .engine import MLXEngine
    from .protocol import EngineConfig, GenerationRequest, SamplingParams, TokenEvent

    # One request: a warm-up would only delay it.
    config = EngineConfig(max_num_seqs=1, max_queue=0, max_model_len=args.max_model_len, warmup=False)
    engine = MLXEngine(args.model, config)
    t0 = time.perf_counter()
    await engine.start()
    try:
        if args.raw:
            ids = engine.encode(prompt)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            ids = engine.encode_chat(messages + [{"role": "user", "content": prompt}])
        sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, seed=args.seed, stop=args.stop)
        t_load = time.perf_counter()
        t_first = None
        out = sys.stdout
        async for ev in engine.generate(GenerationRequest(uuid.uuid4().hex, ids, sp)):
            if isinstance(ev, TokenEvent):
                t_first = t_first or time.perf_counter()
                if ev.text:
                    out.write(ev.text)
                    out.flush()
                continue
            out.write("\n")
            out.flush()
            if ev.error is not None:
                raise ev.error
            if not args.quiet:
                t_end = time.perf_counter()
                decode = (ev.completion_tokens - 1) / (t_end - t_first) if t_first and ev.completion_tokens > 1 else 0.0
                print(f"[{ev.finish_reason}] prompt {ev.prompt_tokens} tokens, time to first token "
                      f"{(t_first or t_end) - t_load:.2f} s; generated {ev.completion_tokens} tokens at "
                      f"{decode:.1f} tok/s; load {t_load - t0:.1f} s", file=sys.stderr)
    finally:
        await engine.shutdown()
    return 0
