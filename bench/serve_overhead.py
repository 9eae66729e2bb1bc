"""CPU time the Serve path spends per streamed token, around a null engine (no model compute).

    python bench/serve_overhead.py [--concurrency 16] [--repeats 2] [--idle-s 20] [--variant NAME=K=V,...]
        [--json out.json]

``mlx-ray serve`` serves ``mlx_ray.bench.null_engine:NullEngine`` (the fixture's
tokenizer, one token per request every ``--step-s``, as a decode step) and the
same load generator as the other benches drives it from this process. Every
process of the server's tree and the client is measured (user + system CPU
seconds over the run), so the report is cores and milliseconds of CPU per
streamed token, by process; before the load, the idle server's cores by
process (the control plane's floor, which a small machine pays per token too). On 2 vCPUs the engine's own speed drifts more than
this path costs; CPU time does not. Variants are serve config fields
(``--variant nobudget=stream_messages_per_s=0``), as in ``bench/serve_ab.py``.

With the hidden ``--ghost-fd`` it is instead the load of ``bench/serve_ab.py --ghost``
(``ghost_worker``): the same Serve path around the null engine, streaming on command
beside the engine in process, so that what the path's own CPU costs the engine can be
measured apart from what sharing the replica's process with it costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_ab import parse_variant  # noqa: E402

from mlx_ray.bench.openai_load import _one_request, arun_load, normalize_base_url  # noqa: E402
from mlx_ray.bench.sides import PROMPTS, MlxRayServe, fixture_model  # noqa: E402
from mlx_ray.bench.table import markdown_table  # noqa: E402
from mlx_ray.blas import reexec_with_fast_blas  # noqa: E402


def role(p: psutil.Process, me: int) -> str:
    if p.pid == me:
        return "client"
    cmd = " ".join(p.cmdline())
    for key, name in (("ServeReplica", "replica"), ("ProxyActor", "proxy"), ("ServeController", "controller"),
                      ("gcs_server", "gcs"), ("raylet", "raylet"), ("DashboardAgent", "agent"),
                      ("RuntimeEnvAgent", "agent"), ("log_monitor", "log_monitor"), ("mlx-ray", "driver"),
                      ("mlx_ray", "driver")):
        if key in cmd or key in p.name():
            return name
    return "other"


def cpu_by_role(server: MlxRayServe, work, client: bool = True) -> tuple[object, float, dict[str, float]]:
    """Run ``work()``; returns its result, the wall seconds and the CPU seconds of each role meanwhile."""
    me = os.getpid()
    procs = [psutil.Process(pid) for pid in server.pids()] + ([psutil.Process(me)] if client else [])
    before = {p.pid: p.cpu_times() for p in procs}
    t0 = time.monotonic()
    out = work()
    wall = time.monotonic() - t0
    cpu: dict[str, float] = {}
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        b = before[p.pid]
        cpu[role(p, me)] = cpu.get(role(p, me), 0.0) + (t.user + t.system - b.user - b.system)
    return out, wall, cpu


def measure(server: MlxRayServe, c: int, max_tokens: int) -> dict:
    r, wall, cpu = cpu_by_role(server, lambda: asyncio.run(arun_load(
        server.url, server.model, c, 4 * c, PROMPTS, max_tokens=max_tokens, extra_body={"ignore_eos": True})))
    tokens = r["output_tok_s"] * wall
    return {"tok_s": r["output_tok_s"], "cores": sum(cpu.values()) / wall,
            "ms_per_token": {k: 1000 * v / tokens for k, v in cpu.items()},
            "ms_per_token_total": 1000 * sum(cpu.values()) / tokens, "errors": r.get("errors", 0)}


def measure_idle(server: MlxRayServe, seconds: float) -> dict:
    """Cores each process of the server's tree takes with the app deployed and no traffic."""
    _, wall, cpu = cpu_by_role(server, lambda: time.sleep(seconds), client=False)
    cores = {k: v / wall for k, v in cpu.items()}
    return {"cores": sum(cores.values()), "by_process": cores}


NULL_ENGINE = "mlx_ray.bench.null_engine:NullEngine"


async def _stream_forever(server: MlxRayServe, c: int, max_tokens: int, tally: dict, flowing: threading.Event):
    """``c`` streaming requests in flight, back to back, until cancelled; ``tally`` counts what finished."""
    import httpx
    from openai import AsyncOpenAI

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=c + 4), timeout=300) as http:
        client = AsyncOpenAI(base_url=normalize_base_url(server.url), api_key="EMPTY", max_retries=0, http_client=http)

        async def one(i: int) -> None:
            while True:
                r = await _one_request(client, server.model, PROMPTS[i % len(PROMPTS)], max_tokens, 0.0,
                                       {"ignore_eos": True})
                tally["tokens"] += r.output_tokens
                tally["errors"] += 0 if r.ok else 1
                tally["last"] = time.monotonic()
                flowing.set()

        await asyncio.gather(*(one(i) for i in range(c)))


def ghost_worker(a) -> None:
    """Worker of ``bench/serve_ab.py --ghost`` (module docstring). Once served and warm it writes its process ids
    as one JSON line to fd ``--ghost-fd``; then for each line on stdin: ``C`` starts C streams in flight (answered
    once the first requests have finished, i.e. in steady state), ``stop`` cancels them and answers the tok/s that
    finished meanwhile, ``quit`` (or end of input) ends."""
    server = MlxRayServe(fixture_model(False), {"max_num_seqs": 64}, engine_class=NULL_ENGINE)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="ghost-load", daemon=True).start()
    out = os.fdopen(a.ghost_fd, "w", buffering=1)
    try:
        server.wait_ready()
        asyncio.run_coroutine_threadsafe(arun_load(server.url, server.model, 16, 16, PROMPTS, max_tokens=16),
                                         loop).result()
        out.write(json.dumps({"pids": server.pids()}) + "\n")
        job = None
        for line in sys.stdin:
            cmd = line.strip()
            if cmd in ("", "quit"):
                break
            if cmd == "stop":
                job.cancel()
                time.sleep(0.5)  # the streams' disconnects reach the server before it is stopped
                wall = tally["last"] - t0
                out.write(json.dumps({"tok_s": tally["tokens"] / wall if wall > 0 else 0.0,
                                      "errors": tally["errors"]}) + "\n")
                continue
            tally, flowing = {"tokens": 0, "errors": 0, "last": 0.0}, threading.Event()
            t0 = time.monotonic()
            job = asyncio.run_coroutine_threadsafe(_stream_forever(server, int(cmd), a.max_tokens, tally, flowing),
                                                   loop)
            flowing.wait()
            out.write("ok\n")
    finally:
        server.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--step-s", type=float, default=0.11, help="the null engine's step (default 0.11 s)")
    p.add_argument("--step-per-row-s", type=float, default=0.0, help="and this per running request (default 0)")
    p.add_argument("--variant", action="append", default=[], help="NAME=K=V,...: serve config fields (or env)")
    p.add_argument("--idle-s", type=float, default=20.0, help="first measure the idle server this long (0: skip)")
    p.add_argument("--json")
    p.add_argument("--ghost-fd", type=int, help=argparse.SUPPRESS)  # serve_ab.py --ghost's load (ghost_worker)
    a = p.parse_args(argv)
    reexec_with_fast_blas()
    os.environ["NULL_STEP_S"] = str(a.step_s)
    os.environ["NULL_STEP_PER_ROW_S"] = str(a.step_per_row_s)
    if a.ghost_fd is not None:
        ghost_worker(a)
        return 0
    variants = dict(parse_variant(v) for v in a.variant) or {"default": {"env": {}, "config": {}}}
    model = fixture_model(False)
    report: dict = {"concurrency": a.concurrency, "step_s": a.step_s, "runs": {}}
    for name, v in variants.items():
        os.environ.update(v["env"])
        server = MlxRayServe(model, {"max_num_seqs": max(64, a.concurrency)},
                             serve_config={**v["config"]}, engine_class=NULL_ENGINE)
        try:
            server.wait_ready()
            asyncio.run(arun_load(server.url, server.model, a.concurrency, a.concurrency, PROMPTS, max_tokens=16))
            if a.idle_s > 0:
                time.sleep(5)  # the warm-up's stragglers
                report.setdefault("idle", {})[name] = measure_idle(server, a.idle_s)
            report["runs"][name] = [measure(server, a.concurrency, a.max_tokens) for _ in range(a.repeats)]
        finally:
            server.stop()
        for k in v["env"]:
            os.environ.pop(k, None)
    roles = sorted({k for runs in report["runs"].values() for r in runs for k in r["ms_per_token"]})
    rows = [[name, i + 1, f"{r['tok_s']:.1f}", f"{r['cores']:.3f}", f"{r['ms_per_token_total']:.2f}",
             *(f"{r['ms_per_token'].get(k, 0):.2f}" for k in roles)]
            for name, runs in report["runs"].items() for i, r in enumerate(runs)]
    print(f"the Serve path around a null engine: {a.concurrency} concurrent, {a.max_tokens} tokens each, "
          f"a step every {a.step_s * 1000:.0f} ms; CPU ms per streamed token by process")
    print(markdown_table(["variant", "run", "tok/s", "cores", "ms/token", *roles], rows))
    if report.get("idle"):
        roles = sorted({k for r in report["idle"].values() for k in r["by_process"]})
        print(f"idle (deployed, no traffic, {a.idle_s:.0f} s): cores by process")
        print(markdown_table(["variant", "cores", *roles],
                             [[name, f"{r['cores']:.3f}", *(f"{r['by_process'].get(k, 0):.3f}" for k in roles)]
                              for name, r in report["idle"].items()]))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
