"""Load-test any OpenAI-compatible endpoint with streaming chat completions.

``run_load`` (or ``await arun_load``) keeps ``concurrency`` requests in flight
until ``num_requests`` have finished, and returns one JSON-able dict:

* ``output_tok_s``: output tokens of all requests divided by the wall time;
* ``ttft_s``: time to first content token, p50/p99/mean/max over requests;
* ``itl_s``: inter-token latency, the gaps between content chunks of every
  request pooled together, p50/p99/mean/max (a chunk that carries several
  tokens counts as one gap, so servers that coalesce show larger gaps);
* ``tpot_s``: per request, (last chunk - first chunk) / (tokens - 1);
* ``errors`` and ``error_kinds`` (HTTP status or exception class -> count),
  plus the first few error messages.

Output tokens are the server's ``usage.completion_tokens`` when it sends usage
(we ask for it with ``stream_options.include_usage``), otherwise the number of
non-empty content chunks (one token per chunk on mlx-lm, vLLM and mlx-ray).

It uses the official ``openai`` client (SSE parsing, error types) with retries
off so that every failure is counted, and an own ``httpx`` pool sized to the
concurrency. Used by ``mlx-ray bench serve`` and by the server and engine
benchmarks; nothing here knows which server is on the other side.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence, Union

import numpy as np

Prompt = Union[str, list[dict]]  # a user message, or a full chat messages list
MAX_ERROR_SAMPLES = 5


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None  # seconds from send to first content chunk
    latency: float = 0.0  # seconds from send to end of stream
    output_tokens: int = 0
    prompt_tokens: int | None = None
    gaps: list[float] = field(default_factory=list)  # seconds between content chunks
    error_kind: str | None = None
    error: str | None = None


def normalize_base_url(url: str) -> str:
    """``http://h:p`` -> ``http://h:p/v1``; a URL that already ends in ``/v1`` is kept."""
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url if url.endswith("/v1") else url + "/v1"


def _messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _error_kind(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    return f"http_{status}" if status else type(exc).__name__


async def _one_request(client, model: str, prompt: Prompt, max_tokens: int, temperature: float | None,
                       extra_body: dict | None, seed: int | None = None) -> RequestResult:
    kwargs: dict[str, Any] = dict(model=model, messages=_messages(prompt), max_tokens=max_tokens, stream=True,
                                  stream_options={"include_usage": True})
    if seed is not None:
        kwargs["seed"] = seed
    if temperature is not None:
        kwargs["temperature"] = temperature
    if extra_body:
        kwargs["extra_body"] = extra_body
    t0 = time.perf_counter()
    res = RequestResult(ok=False)
    chunks = 0
    last = None
    usage_tokens = None
    try:
        stream = await client.chat.completions.create(**kwargs)
        async for chunk in stream:
            now = time.perf_counter()
            if getattr(chunk, "usage", None) is not None:
                usage_tokens = chunk.usage.completion_tokens
                res.prompt_tokens = chunk.usage.prompt_tokens
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if delta is None or not (delta.content or getattr(delta, "reasoning_content", None)):
                continue
            if last is None:
                res.ttft = now - t0
            else:
                res.gaps.append(now - last)
            last = now
            chunks += 1
        res.ok = True
    except Exception as exc:  # every failure is a data point, never a crash of the run
        res.error_kind, res.error = _error_kind(exc), " ".join(str(exc).split())[:300]
    res.latency = time.perf_counter() - t0
    res.output_tokens = usage_tokens if usage_tokens is not None else chunks
    return res


def _stats(values: Sequence[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "mean": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean()),
            "max": float(a.max()), "n": int(a.size)}


def summarize(results: list[RequestResult], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    kinds: dict[str, int] = {}
    for r in results:
        if not r.ok:
            kinds[r.error_kind or "unknown"] = kinds.get(r.error_kind or "unknown", 0) + 1
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": kinds,
        "error_samples": [r.error for r in results if not r.ok][:MAX_ERROR_SAMPLES],
        "duration_s": wall,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok) or None,
        "output_tok_s": out_tokens / wall if wall > 0 else 0.0,
        "requests_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft_s": _stats([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": _stats([g for r in ok for g in r.gaps]),
        "tpot_s": _stats(tpot),
        "latency_s": _stats([r.latency for r in ok]),
    }


async def arun_load(url: str, model: str, concurrency: int, num_requests: int, prompts: Sequence[Prompt],
                    max_tokens: int = 64, api_key: str | None = None, temperature: float | None = 0.0,
                    timeout: float = 300.0, extra_body: dict | None = None, warmup: int = 0,
                    seeded: bool = False) -> dict:
    """Async form of :func:`run_load`."""
    import httpx
    from openai import AsyncOpenAI

    if concurrency < 1 or num_requests < 1 or not prompts:
        raise ValueError("concurrency and num_requests must be >= 1 and prompts non-empty")
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        client = AsyncOpenAI(base_url=normalize_base_url(url), api_key=api_key or "EMPTY", max_retries=0,
                             timeout=timeout, http_client=http)
        for i in range(warmup):
            await _one_request(client, model, prompts[i % len(prompts)], max_tokens, temperature, extra_body)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(num_requests):
            queue.put_nowait(i)
        results: list[RequestResult] = []

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await _one_request(client, model, prompts[i % len(prompts)], max_tokens,
                                                  temperature, extra_body, i if seeded else None))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
        wall = time.perf_counter() - t0
    summary = summarize(results, wall, concurrency)
    summary.update(url=url, model=model, max_tokens=max_tokens, warmup=warmup)
    return summary


def run_load(url: str, model: str, concurrency: int, num_requests: int, prompts: Sequence[Prompt],
             max_tokens: int = 64, api_key: str | None = None, **kw) -> dict:
    """Run a closed-loop load test and return its summary dict (see the module docstring).

    ``url`` is the server root or its ``/v1`` base. ``prompts`` are user
    messages or full message lists, used round-robin. Extra keywords:
    ``temperature`` (default 0.0; None leaves it to the server), ``timeout``
    per request, ``extra_body`` (e.g. ``{"ignore_eos": True}``), ``warmup``
    requests sent one by one before the clock starts, ``seeded`` (request i
    sends ``seed: i``, as the in-process engine bench seeds its requests).
    """
    return asyncio.run(arun_load(url, model, concurrency, num_requests, prompts, max_tokens, api_key, **kw))


def result_dict(r: RequestResult) -> dict:
    return asdict(r)
