"""Benchmark: the mlx-ray engine against mlx-lm (``mlx_lm.generate`` and ``mlx_lm.server``).

    python bench/engine_vs_mlxlm.py [--model PATH] [--levels 1,4,16,32] [--json out.json]

* **Single stream**: decode tok/s of one greedy request, engine vs mlx-lm's own
  generation loop (``stream_generate``, what ``mlx_lm.generate`` runs), same
  prompt, timed the same way (tokens after the first / time after the first).
* **Concurrency sweep**: closed-loop load at each level against the engine
  (in process, the way the Serve replica embeds it) and against
  ``mlx_lm.server`` (started here on loopback with ``setsid`` on a free port,
  same model path, same BLAS preload), through ``mlx_ray.bench.openai_load``.
  Each side runs in its own worker process started with ``setsid`` (the
  engine with its load generator; mlx_lm.server plus its load generator), so
  with the kernel's per-session CPU autogroups both sides get the same CPU
  share on a shared machine; with ``--repeats`` the sides alternate. Metrics: aggregate output tok/s, TTFT and inter-token
  latency p50/p99, peak resident memory of the serving process (kernel
  high-water mark), output tokens per CPU second of the side.

* **Through Ray Serve** (``--serve``): ``mlx-ray serve`` (embedded Ray, the
  model's replica answering HTTP) with the engine side's limits, warmed the
  same way, the load generator in the worker process (its own process, at the
  same priority as every side's); each level and mode is reported against the
  engine in process of the same repeat. ``--cold-burst N`` times a burst of N
  fresh prompts right after ready and another after the warm-up.

The sides decode greedily with the same prompts, so they produce the same
tokens. ``--sampling greedy,top_p,topk_minp`` also runs the engine side at each
level with temperature 0.7 + top_p 0.9 and with temperature 0.7 + top_k 40 +
min_p 0.05 (seeded per request), right after the greedy run of the same level
in the same process (the order rotated per repeat), and reports each against
the greedy run of the same level and repeat (the server side stays greedy);
``--ignore-eos`` makes every request produce ``--max-tokens`` tokens, so the
modes decode the same number of tokens, and ``--prefix-cache-mib 0`` keeps the
prefix cache out of it (sampled completions all differ and fill it; greedy
repeats of the same prompts do not). The machine is shared and noisy: repeat with ``--repeats`` and read
medians. Without ``--model`` the fixture is converted to float32 (or q4-g64
with ``--q4``) in a temporary cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from mlx_ray.bench.openai_load import RequestResult, arun_load, summarize
from mlx_ray.bench.sides import PROMPTS, MlxLmServer, MlxRayServe, Usage, fixture_model
from mlx_ray.bench.table import markdown_table
from mlx_ray.blas import env_with_fast_blas, loaded_blas, reexec_with_fast_blas

# -- helpers -------------------------------------------------------------------------------
# Sampling modes of --sampling (engine side): SamplingParams fields.
SAMPLING = {
    "greedy": {"temperature": 0.0},
    "top_p": {"temperature": 0.7, "top_p": 0.9},
    "topk_minp": {"temperature": 0.7, "top_k": 40, "min_p": 0.05},
}


def level_key(c, mode: str) -> str:
    return str(c) if mode == "greedy" else f"{c}:{mode}"


# -- the engine side -------------------------------------------------------------------------
async def engine_request(engine, rid: str, ids: list[int], max_tokens: int, sampling: dict | None = None,
                         seed: int | None = None, ignore_eos: bool = False) -> RequestResult:
    """One request, measured exactly like openai_load measures an HTTP stream (content chunks)."""
    from mlx_ray.engine.protocol import GenerationRequest, SamplingParams, TokenEvent

    params = SamplingParams(max_tokens=max_tokens, **(sampling or {"temperature": 0.0}), seed=seed,
                            ignore_eos=ignore_eos)
    res, t0, last = RequestResult(ok=False), time.perf_counter(), None
    async for ev in engine.generate(GenerationRequest(rid, ids, params)):
        now = time.perf_counter()
        if isinstance(ev, TokenEvent):
            if ev.text:
                if res.ttft is None:
                    res.ttft = now - t0
                else:
                    res.gaps.append(now - last)
                last = now
            continue
        res.ok = ev.error is None
        res.output_tokens, res.prompt_tokens = ev.completion_tokens, ev.prompt_tokens
        res.error_kind = ev.error.kind if ev.error else None
    res.latency = time.perf_counter() - t0
    return res


async def engine_load(engine, prompts: list[list[int]], concurrency: int, n: int, max_tokens: int,
                      sampling: dict | None = None, ignore_eos: bool = False) -> dict:
    todo = list(range(n))
    results: list[RequestResult] = []

    async def worker():
        while todo:
            i = todo.pop(0)
            results.append(await engine_request(engine, f"bench-{concurrency}-{i}-{time.monotonic_ns()}",
                                                prompts[i % len(prompts)], max_tokens, sampling, seed=i,
                                                ignore_eos=ignore_eos))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return summarize(results, time.perf_counter() - t0, concurrency)


def single_stream(engine, model_dir: Path, ids: list[int], max_tokens: int, repeats: int) -> dict:
    """Decode tok/s of one greedy request: engine vs mlx-lm's generation loop, same prompt and timing."""
    from mlx_lm import load, stream_generate

    model, tok = load(str(model_dir))

    def rate(stamps: list[float]) -> float:
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0

    def mlxlm_once():
        stamps = [time.perf_counter() for _ in stream_generate(model, tok, prompt=ids, max_tokens=max_tokens)]
        return rate(stamps), len(stamps)

    async def engine_once():
        from mlx_ray.engine.protocol import GenerationRequest, SamplingParams, TokenEvent

        stamps = []
        req = GenerationRequest(f"single-{time.monotonic_ns()}", ids, SamplingParams(max_tokens=max_tokens, temperature=0))
        async for ev in engine.generate(req):
            if isinstance(ev, TokenEvent):
                stamps += [time.perf_counter()] * len(ev.token_ids)
        return rate(stamps), len(stamps)

    mlxlm_once()  # warm-up
    ours, theirs = [], []
    for _ in range(repeats):  # alternate, so drift in machine load hits both
        ours.append(asyncio.run(engine_once()))
        theirs.append(mlxlm_once())
    del model
    return {"engine_decode_tok_s": statistics.median(r for r, _ in ours),
            "mlx_lm_decode_tok_s": statistics.median(r for r, _ in theirs),
            "tokens": ours[0][1], "mlx_lm_tokens": theirs[0][1], "repeats": repeats,
            "engine_runs": [r for r, _ in ours], "mlx_lm_runs": [r for r, _ in theirs]}


def http_sampling(mode: str, ignore_eos: bool) -> tuple[float, dict]:
    """(temperature, extra_body) of a --sampling mode for an OpenAI request."""
    params = dict(SAMPLING[mode])
    body = {k: v for k, v in params.items() if k != "temperature"}
    if ignore_eos:
        body["ignore_eos"] = True
    return params["temperature"], body


def http_prompt_warmup(url: str, model: str, args) -> None:
    """The engine side's warm-up, over HTTP: one short request, each sampled path, every prompt prefilled once."""
    asyncio.run(arun_load(url, model, 1, 1, PROMPTS[:1], max_tokens=8))
    for mode in modes(args)[1:]:
        t, body = http_sampling(mode, False)
        asyncio.run(arun_load(url, model, 2, 2, PROMPTS, max_tokens=8, temperature=t, extra_body=body, seeded=True))
    if len(modes(args)) > 1:
        asyncio.run(arun_load(url, model, 4, len(PROMPTS), PROMPTS, max_tokens=1))


def burst(url: str, model: str, n: int, tag: str) -> dict:
    """``n`` concurrent requests, one each, of prompts no earlier request used (no prefix-cache hit)."""
    prompts = [f"[{tag} {i}] {p}" for i, p in enumerate((PROMPTS * (n // len(PROMPTS) + 1))[:n])]
    return asyncio.run(arun_load(url, model, n, n, prompts, max_tokens=16))


class EngineSession:
    """The engine in this process, warmed up; ``measure`` runs one level and mode of the load."""

    def __init__(self, args, engine_cfg: dict):
        from mlx_ray.engine.engine import MLXEngine
        from mlx_ray.engine.protocol import EngineConfig

        self.args = args
        self.engine = MLXEngine(args.model, EngineConfig(**engine_cfg))
        asyncio.run(self.engine.start())
        try:
            self.prompts = [self.engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
            asyncio.run(engine_load(self.engine, self.prompts, 1, 1, 8))  # warm-up
            for mode in modes(args)[1:]:  # warm-up of each sampling path
                asyncio.run(engine_load(self.engine, self.prompts, 2, 2, 8, SAMPLING[mode]))
            if len(modes(args)) > 1:  # every prompt in the prefix cache first, so no mode pays the others' prefill
                asyncio.run(engine_load(self.engine, self.prompts, 4, len(self.prompts), 1))
        except BaseException:
            self.close()
            raise

    def pids(self) -> list[int]:
        return [os.getpid()]

    def measure(self, c: int, mode: str) -> dict:
        import mlx.core as mx

        mx.reset_peak_memory()
        with Usage(os.getpid()) as mem:
            r = asyncio.run(engine_load(self.engine, self.prompts, c, requests_for(self.args, c), self.args.max_tokens,
                                        SAMPLING[mode], self.args.ignore_eos))
        return dict(r, peak_rss_bytes=mem.peak, cpu_s=mem.cpu_s, mlx_peak_bytes=mx.get_peak_memory())

    def extra(self) -> dict:
        return {"engine_stats": self.engine.stats()}

    def close(self) -> None:
        asyncio.run(self.engine.shutdown())


class ServeSession:
    """``mlx-ray serve`` with the engine side's limits, warmed up the same way; the load generator in this process."""

    def __init__(self, args, engine_cfg: dict):
        self.args, self.extras = args, {}
        self.server = MlxRayServe(Path(args.model), engine_cfg, serve_config=json.loads(args.serve_config))
        try:
            self.server.wait_ready()
            if args.cold_burst:
                self.extras["burst_cold"] = burst(self.server.url, self.server.model, args.cold_burst, "cold")
            http_prompt_warmup(self.server.url, self.server.model, args)
            if args.cold_burst:
                self.extras["burst_warm"] = burst(self.server.url, self.server.model, args.cold_burst, "warm")
        except BaseException:
            self.close()
            raise

    def pids(self) -> list[int]:
        return [*self.server.pids(), os.getpid()]

    def measure(self, c: int, mode: str) -> dict:
        t, body = http_sampling(mode, self.args.ignore_eos)
        with Usage(*self.server.pids(), os.getpid()) as mem:
            r = asyncio.run(arun_load(self.server.url, self.server.model, c, requests_for(self.args, c), PROMPTS,
                                      max_tokens=self.args.max_tokens, temperature=t, extra_body=body,
                                      seeded=mode != "greedy"))
        return dict(r, peak_rss_bytes=mem.peak, cpu_s=mem.cpu_s)

    def extra(self) -> dict:
        return self.extras

    def close(self) -> None:
        self.server.stop()


def engine_cfg_of(args) -> dict:
    levels = [int(x) for x in args.levels.split(",")]
    cfg = dict(max_num_seqs=max(levels), max_queue=max(levels) * 4, prefill_chunk=args.prefill_chunk)
    if args.prefix_cache_mib is not None:
        cfg["prefix_cache_bytes"] = args.prefix_cache_mib << 20
    if args.kv_budget_mib is not None:
        cfg["kv_budget_bytes"] = args.kv_budget_mib << 20
    if args.segments_fd is not None:
        # serve_ab freezes this worker (SIGSTOP) while other sides measure; the wall clock runs on meanwhile, so
        # the engine's stall check would take a long freeze for a wedged loop.
        cfg["health_timeout_s"] = 3600.0
    return cfg


# -- one side, in its own session ----------------------------------------------------------
def run_side(args) -> dict:
    """The sweep for one side (``--side engine|serve|server``); prints nothing but the JSON file."""
    levels = [int(x) for x in args.levels.split(",")]
    out = {}
    if args.side == "server":
        # a listen backlog of 128, not the 5 of `python -m mlx_lm.server`: with 5, connections opened at once
        # beyond it are reset while its accept loop is held up (bench/multi_lora.py's docstring)
        server = MlxLmServer(Path(args.model), max(levels), listen_backlog=128)
        try:
            server.wait_ready()
            asyncio.run(arun_load(server.url, server.model, 1, 1, PROMPTS[:1], max_tokens=8))  # warm-up
            for c in levels:
                with Usage(server.proc.pid, os.getpid()) as mem:
                    r = asyncio.run(arun_load(server.url, server.model, c, requests_for(args, c), PROMPTS,
                                              max_tokens=args.max_tokens))
                out[c] = dict(r, peak_rss_bytes=mem.peak, cpu_s=mem.cpu_s)
        finally:
            server.stop()
        return out
    session = (ServeSession if args.side == "serve" else EngineSession)(args, engine_cfg_of(args))
    try:
        for c in levels:
            for mode in rotated_modes(args):
                out[level_key(c, mode)] = session.measure(c, mode)
        out.update(session.extra())
    finally:
        session.close()
    return out


def serve_segments(args) -> None:
    """Worker of ``bench/serve_ab.py``'s paired segments: set the side up and warm it, write its process ids as
    one JSON line to fd ``--segments-fd``, then for each ``LEVEL MODE`` line on stdin run that load and write
    its result as one JSON line; stop at ``quit`` or end of input. (Its own stdout is the server's log.)"""
    session = (ServeSession if args.side == "serve" else EngineSession)(args, engine_cfg_of(args))
    out = os.fdopen(args.segments_fd, "w", buffering=1)
    try:
        out.write(json.dumps({"pids": session.pids()}) + "\n")
        for line in sys.stdin:
            if line.strip() in ("", "quit"):
                break
            c, mode = line.split()
            out.write(json.dumps(session.measure(int(c), mode), default=str) + "\n")
    finally:
        session.close()


def modes(args) -> list[str]:
    """The --sampling modes, greedy first (the baseline of the others)."""
    ms = [m.strip() for m in (args.sampling or "greedy").split(",") if m.strip()]
    bad = [m for m in ms if m not in SAMPLING]
    if bad:
        raise SystemExit(f"--sampling: unknown mode(s) {bad}; choose from {', '.join(SAMPLING)}")
    return ["greedy"] + [m for m in ms if m != "greedy"]


def rotated_modes(args) -> list[str]:
    """The modes in the order of this repeat: repeats rotate it, so no mode always runs first at a level."""
    order = modes(args)
    k = args.mode_rotate % len(order)
    return order[k:] + order[:k]


def requests_for(args, c: int) -> int:
    return max(args.min_requests, args.requests_per_slot * c)


def side_command(args, side: str, model_dir: Path, rep: int = 0, serve_config: dict | None = None) -> list[str]:
    """The command line of a side's worker process (``--side``)."""
    cmd = [sys.executable, __file__, "--side", side, "--model", str(model_dir),
           "--levels", args.levels, "--max-tokens", str(args.max_tokens), "--prefill-chunk", str(args.prefill_chunk),
           "--requests-per-slot", str(args.requests_per_slot), "--min-requests", str(args.min_requests)]
    if side in ("engine", "serve"):
        cmd += ["--sampling", ",".join(modes(args)), "--mode-rotate", str(rep)] + (["--ignore-eos"] if args.ignore_eos else [])
        if args.prefix_cache_mib is not None:
            cmd += ["--prefix-cache-mib", str(args.prefix_cache_mib)]
        if args.kv_budget_mib is not None:
            cmd += ["--kv-budget-mib", str(args.kv_budget_mib)]
    if side == "serve" and args.cold_burst:
        cmd += ["--cold-burst", str(args.cold_burst)]
    if side == "serve" and serve_config:
        cmd += ["--serve-config", json.dumps(serve_config)]
    return cmd


def spawn_side(args, side: str, model_dir: Path, rep: int = 0, extra_env: dict | None = None,
               serve_config: dict | None = None) -> dict:
    """Run one side in a worker process with its own session (``extra_env`` on top of this one's; the serve
    side's ``serve_config`` on top of its config); kill its whole group afterwards."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = side_command(args, side, model_dir, rep, serve_config) + ["--side-out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True, env={**env_with_fast_blas(), **(extra_env or {})})
    try:
        if proc.wait() != 0:
            raise RuntimeError(f"the {side} worker failed ({proc.returncode})")
        return json.loads(out.read_text())
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind (e.g. mlx_lm.server)
        except ProcessLookupError:
            pass
        out.unlink(missing_ok=True)


# -- the driver --------------------------------------------------------------------------------
def run(args) -> dict:
    from mlx_ray.engine.engine import MLXEngine
    from mlx_ray.engine.protocol import EngineConfig

    model_dir = Path(args.model) if args.model else fixture_model(args.q4)
    engine = MLXEngine(model_dir, EngineConfig(max_num_seqs=1))
    asyncio.run(engine.start())
    ids = engine.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    report = {"model": str(model_dir), "dtype": engine.info.dtype, "blas": loaded_blas(), "max_tokens": args.max_tokens,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                          "load_avg_at_start": os.getloadavg()},
              "levels": {}}
    print(f"model {model_dir} ({engine.info.dtype}), BLAS {report['blas']}, load avg {os.getloadavg()[0]:.1f}",
          file=sys.stderr)
    try:
        if not args.skip_single:
            report["single_stream"] = single_stream(engine, model_dir, ids, args.single_tokens, args.repeats)
    finally:
        asyncio.run(engine.shutdown())
    if "single_stream" in report:
        print("single stream:", {k: v for k, v in report["single_stream"].items() if not k.endswith("runs")},
              file=sys.stderr)
    sides = ["engine"] + (["mlx-ray serve"] if args.serve else []) + ([] if args.skip_server else ["mlx_lm.server"])
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.repeats):
        for side in sides:
            r = spawn_side(args, SIDE_FLAGS[side], model_dir, rep)
            report.setdefault("engine_stats", r.pop("engine_stats", None))
            for k in ("burst_cold", "burst_warm"):
                if k in r:
                    report.setdefault("bursts", []).append({k: r.pop(k)})
            runs[side].append(r)
            print(f"[{rep + 1}/{args.repeats}] {side}: " + ", ".join(
                f"c={c} {v['output_tok_s']:.1f} tok/s ({v['cpu_s']:.0f} CPU s)" for c, v in r.items()), file=sys.stderr)
    for c in args.levels.split(","):
        report["levels"][int(c)] = {s: median_run([r[c] for r in runs[s]]) for s in sides}
    moded = [s for s in sides if SIDE_FLAGS[s] in ("engine", "serve")]
    if len(modes(args)) > 1:
        report["sampling"] = {s: {} for s in moded}
        for side in moded:
            for c in args.levels.split(","):
                by_mode = {}
                for m in modes(args):
                    r = median_run([run[level_key(c, m)] for run in runs[side]])
                    # Paired with the greedy run of the same level and repeat (machine load drifts between repeats).
                    r["x_greedy_runs"] = paired(runs[side], level_key(c, m), runs[side], level_key(c, "greedy"))
                    r["x_greedy_paired"] = statistics.median(r["x_greedy_runs"])
                    by_mode[m] = r
                report["sampling"][side][int(c)] = by_mode
        report["sampling_params"] = {m: SAMPLING[m] for m in modes(args)}
        report["ignore_eos"] = args.ignore_eos
    if args.serve:
        # Serve against the engine in process, per level and mode: the ratio of the same repeat's runs.
        report["serve_vs_engine"] = {}
        for c in args.levels.split(","):
            for m in modes(args):
                k = level_key(c, m)
                xs = paired(runs["mlx-ray serve"], k, runs["engine"], k)
                report["serve_vs_engine"][k] = {"x_engine_paired": statistics.median(xs), "x_engine_runs": xs}
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    return report


SIDE_FLAGS = {"engine": "engine", "mlx-ray serve": "serve", "mlx_lm.server": "server"}


def paired(runs_a: list[dict], key_a: str, runs_b: list[dict], key_b: str) -> list[float]:
    """tok/s of a over b, repeat by repeat."""
    return [a[key_a]["output_tok_s"] / b[key_b]["output_tok_s"] for a, b in zip(runs_a, runs_b)]


def median_run(runs: list[dict]) -> dict:
    """The run with the median aggregate tok/s (kept whole so its latencies stay consistent)."""
    ranked = sorted(runs, key=lambda r: r["output_tok_s"])
    out = dict(ranked[len(ranked) // 2])
    out["all_output_tok_s"] = [r["output_tok_s"] for r in runs]
    return out


def table(report: dict) -> str:
    rows = []
    for c, sides in report["levels"].items():
        for side, r in sides.items():
            rows.append([c, side, r["output_tok_s"], r["ttft_s"]["p50"], r["ttft_s"]["p99"], r["itl_s"]["p50"],
                         r["itl_s"]["p99"], r["peak_rss_bytes"] / 2**20,
                         r["output_tokens"] / r["cpu_s"] if r.get("cpu_s") else None, r["errors"]])
    t = markdown_table(["conc.", "server", "out tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 s", "ITL p99 s",
                        "peak RSS MiB", "tok/CPU-s", "errors"], rows)
    s = report.get("single_stream")
    head = (f"single stream decode: engine {s['engine_decode_tok_s']:.1f} tok/s, mlx_lm.generate "
            f"{s['mlx_lm_decode_tok_s']:.1f} tok/s (median of {s['repeats']})\n") if s else ""
    ratios = []
    for c, sides in report["levels"].items():
        m = sides.get("mlx_lm.server")
        for name, e in sides.items():
            if m is not None and name != "mlx_lm.server":
                ratios.append(f"c={c}: {name} x{e['output_tok_s'] / m['output_tok_s']:.2f} mlx_lm.server, "
                              f"TTFT p99 {e['ttft_s']['p99']:.2f} vs {m['ttft_s']['p99']:.2f} s")
    out = head + t + ("\n" + "\n".join(ratios) if ratios else "")
    for side, by_level in (report.get("sampling") or {}).items():
        rows = []
        for c, by_mode in by_level.items():
            for m, r in by_mode.items():
                rows.append([c, m, ", ".join(f"{k}={v}" for k, v in report["sampling_params"][m].items()),
                             r["output_tok_s"], r["x_greedy_paired"],
                             " ".join(f"{x:.2f}" for x in r["x_greedy_runs"]),
                             r["output_tokens"] / r["cpu_s"] if r.get("cpu_s") else None, r["itl_s"]["p50"],
                             r["errors"]])
        out += (f"\n\nsampled throughput, {side} (the modes back to back at each level, their order rotated per repeat"
                + (", ignore_eos" if report.get("ignore_eos") else "") + "):\n"
                + markdown_table(["conc.", "mode", "params", "out tok/s (median run)", "x greedy (median of pairs)",
                                  "x greedy per repeat", "tok/CPU-s", "ITL p50 s", "errors"], rows))
    if report.get("serve_vs_engine"):
        rows = [[k, v["x_engine_paired"], " ".join(f"{x:.2f}" for x in v["x_engine_runs"])]
                for k, v in report["serve_vs_engine"].items()]
        out += ("\n\nmlx-ray serve against the engine in process (tok/s ratio of the same repeat):\n"
                + markdown_table(["level[:mode]", "x engine (median)", "per repeat"], rows))
    for b in report.get("bursts", []):
        for k, r in b.items():
            out += f"\n{k}: {r['concurrency']} requests at once, TTFT p50 {r['ttft_s']['p50']:.2f} s, p99 {r['ttft_s']['p99']:.2f} s"
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """This script's options (``bench/serve_ab.py`` drives its workers with them)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="MLX model directory (default: the fixture, converted)")
    p.add_argument("--q4", action="store_true", help="without --model: use the fixture at q4-g64")
    p.add_argument("--levels", default="1,4,16,32", help="concurrency levels (default 1,4,16,32)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--single-tokens", type=int, default=128, help="tokens of the single-stream run (default 128)")
    p.add_argument("--requests-per-slot", type=int, default=2, help="requests per level = this x concurrency")
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="runs per side (alternating); medians are reported")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--skip-server", action="store_true", help="no mlx_lm.server side")
    p.add_argument("--serve", action="store_true",
                   help="also run `mlx-ray serve` (embedded Ray Serve, same engine limits, same modes, load generator "
                        "in its own process)")
    p.add_argument("--cold-burst", type=int, default=0,
                   help="with --serve: a burst of N requests right after the server is ready, and another after "
                        "the warm-up (fresh prompts each), to compare cold and warm TTFT")
    p.add_argument("--skip-single", action="store_true", help="no single-stream comparison")
    p.add_argument("--sampling", default="greedy",
                   help="sampling modes of the engine and serve sides, comma list of " + ", ".join(SAMPLING) + " (default greedy)")
    p.add_argument("--ignore-eos", action="store_true", help="every request decodes --max-tokens tokens")
    p.add_argument("--prefix-cache-mib", type=int,
                   help="engine prefix cache budget (default the engine's; 0 = off: sampled completions are all "
                        "different and fill it, greedy repeats do not, which skews a comparison of the modes)")
    p.add_argument("--kv-budget-mib", type=int,
                   help="engine KV budget (default the engine's: half the free memory, allocated at start by the "
                        "paged cache, so two sides alive at once need a smaller one)")
    p.add_argument("--mode-rotate", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--side", choices=sorted(SIDE_FLAGS.values()), help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    p.add_argument("--serve-config", default="{}", help=argparse.SUPPRESS)  # JSON: ServeConfig fields of the serve side
    p.add_argument("--segments-fd", type=int, help=argparse.SUPPRESS)  # worker of serve_ab's paired segments
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    reexec_with_fast_blas()
    if args.side and args.segments_fd is not None:
        serve_segments(args)
        return 0
    if args.side:
        Path(args.side_out).write_text(json.dumps(run_side(args), default=str))
        return 0
    report = run(args)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
