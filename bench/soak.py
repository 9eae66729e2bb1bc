"""Soak: minutes of mixed traffic against mlx-ray serve; memory and slots must stay flat.

    python bench/soak.py [--minutes 10] [--model PATH]        # starts `mlx-ray serve` (embedded Ray) itself
    python bench/soak.py --url http://HOST:PORT --ray-address ADDR [--app-name A] --model-name M --admission-limit N

**Traffic.** A load generator in its own process keeps C = ceil(1.5 x the
engine's admission limit, max_num_seqs + max_queue) clients busy, closed loop,
so 429s happen. Each request is, at random (seeded): a streamed chat, a
non-streamed chat or completion, a stream the client drops after two chunks
(disconnect mid-stream), max_tokens past the context, a prompt past the
context, or a parameter out of range. The over-limit kinds must get 400 (or
429), the others 200 (or 429); anything else, a 5xx, a stream without
``[DONE]`` or with an error event, or no answer within ``--request-timeout``
(a hang) fails the run.

**Samples.** Every ``--sample-s``, through Serve's handle to the model's
deployment (this process is a Ray driver): the engine's ``stats()`` (running,
waiting, in flight, prefix-cache bytes) and the replica's resident memory (its
pid from ``info()``, read with psutil on its node).

**Verdict.** After load stops, the engine must drain to 0 running, 0 waiting,
0 in flight within ``--drain-s``; /health and a normal chat request must
succeed, from the same replica. *RSS flat*: the samples after the warm-up
(the first ``--warmup-frac`` of the run) are split in thirds by time; the
median of the last third, net of the prefix cache (which grows by design up
to its budget, and is reported on its own), must be within ``--rss-tol-pct``
percent or ``--rss-tol-mib`` MiB (whichever is larger) of the first third's.
The slope over the same samples is reported too.

Prints a table; ``--json PATH`` writes everything (``-``: stdout). Exit 0 when
the verdict passes, 1 when it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

MIB = 2**20
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
             "Give a synonym for happy.", "Which planet is the largest?", "Say hello in Spanish.",
             "What do bees make?", "How many days are in a week?"]
# kind -> (weight, statuses that are correct for it)
KINDS = {
    "stream": (30, {200, 429}),
    "nonstream": (20, {200, 429}),
    "cancel": (20, {200, 429}),
    "over_max_tokens": (10, {400, 429}),
    "over_context": (10, {400, 429}),
    "bad_param": (10, {400}),  # refused by validation, before any queue
}


# ---- the load generator (its own process) ------------------------------------------------


async def one_request(client, kind: str, rng: random.Random, model: str, max_len: int) -> dict:
    """One request of ``kind``: {"kind", "status", "outcome", "latency_s"}."""
    msgs = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    temp = rng.choice([0.0, 0.8])
    body: dict = {"model": model, "messages": msgs, "max_tokens": rng.randint(8, 24), "temperature": temp,
                  "seed": rng.randrange(1 << 30)}
    path = "/v1/chat/completions"
    stream = kind in ("stream", "cancel")
    if kind == "nonstream" and rng.random() < 0.5:
        path, body = "/v1/completions", {**body, "prompt": msgs[0]["content"]}
        del body["messages"]
    elif kind == "cancel":
        body.update(max_tokens=256, ignore_eos=True)
    elif kind == "over_max_tokens":
        body["max_tokens"] = max_len + rng.randint(1, 1000)
    elif kind == "over_context":
        body["messages"] = [{"role": "user", "content": "word " * (max_len + 64)}]
    elif kind == "bad_param":
        body.update(rng.choice([{"temperature": 3.5}, {"top_p": 0}, {"n": 1000}, {"top_logprobs": 50, "logprobs": True},
                                {"max_tokens": 0}, {"presence_penalty": -9}]))
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    t0 = time.monotonic()
    status, outcome = 0, "ok"
    try:
        async with client.stream("POST", path, json=body) as r:
            status = r.status_code
            if status != 200 or not stream:
                await r.aread()
                outcome = "ok" if status == 200 else f"http_{status}"
            else:
                outcome = await _read_stream(r, kind)
    except Exception as e:  # noqa: BLE001 - every failure is counted, by kind
        outcome = f"transport:{type(e).__name__}"
    return {"kind": kind, "status": status, "outcome": outcome, "latency_s": time.monotonic() - t0}


async def _read_stream(r, kind: str) -> str:
    chunks, done = 0, False
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        if '"error"' in line[:20]:
            return "error_event"
        chunks += 1
        if kind == "cancel" and chunks >= 2:
            return "cancelled"  # leaving the block closes the connection mid-stream
    return "ok" if done else "incomplete"


async def generate_load(url: str, model: str, concurrency: int, seconds: float, seed: int,
                        request_timeout: float, headers: dict) -> list[dict]:
    import httpx

    kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(request_timeout),
                                 limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        info = (await client.get("/v1/models")).json()["data"]
        max_len = next(m for m in info if m["id"] == model).get("max_model_len") or 2048
        stop_at = time.monotonic() + seconds
        records: list[dict] = []

        async def worker(i: int):
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < stop_at:
                kind = rng.choices(kinds, weights)[0]
                try:
                    rec = await asyncio.wait_for(one_request(client, kind, rng, model, max_len), request_timeout)
                except asyncio.TimeoutError:
                    rec = {"kind": kind, "status": 0, "outcome": "hang", "latency_s": request_timeout}
                rec["t"] = time.monotonic()
                records.append(rec)
                if rec["status"] == 429:
                    await asyncio.sleep(rng.uniform(0.05, 0.2))  # keep the pressure on, without spinning

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return records


def load_main(args) -> int:
    records = asyncio.run(generate_load(args.url, args.model_name, args.concurrency, args.seconds, args.seed,
                                        args.request_timeout, _auth_headers(args)))
    Path(args.load_out).write_text(json.dumps(records))
    return 0


# ---- the sampler (this process, a Ray driver) ----------------------------------------------


class Sampler:
    """Engine stats and the replica's RSS through Serve's handle to the model's deployment."""

    def __init__(self, ray_address: str, app_name: str, model_name: str):
        import ray
        from ray import serve

        from mlx_ray.serve.config import ModelConfig

        if not ray.is_initialized():
            ray.init(address=ray_address, logging_level="ERROR", log_to_driver=False)
        self.handle = serve.get_deployment_handle(ModelConfig(model="-", name=model_name).deployment_name,
                                                  app_name=app_name)
        self.here = ray.get_runtime_context().get_node_id()
        self.rep = self.replica()
        self._remote_rss = None

    def replica(self) -> dict:
        """The replica's pid and node (``info()``; read at the start and at the end: a restart shows)."""
        info = self.handle.info.remote().result(timeout_s=60)
        return {"pid": info["pid"], "node_id": info["node_id"]}

    def sample(self) -> dict:
        stats = self.handle.stats.remote().result(timeout_s=30)
        return {"t": time.monotonic(), "pid": self.rep["pid"], "rss_bytes": self._rss(),
                **{k: stats.get(k, 0) for k in ("running", "waiting", "inflight", "prefix_cache_bytes")}}

    def _rss(self) -> int:
        pid, node = self.rep["pid"], self.rep["node_id"]
        if node in (None, self.here):
            return _process_rss(pid)
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._remote_rss is None:  # a task on the replica's node reads it there
            self._remote_rss = ray.remote(num_cpus=0)(_process_rss).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        return ray.get(self._remote_rss.remote(pid), timeout=60)


def _process_rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


# ---- the verdict ------------------------------------------------------------------------------


def rss_flatness(samples: list[dict], warmup_s: float, tol_pct: float, tol_mib: float) -> dict:
    """Last third vs first third of the post-warm-up samples (RSS net of the prefix cache)."""
    post = [s for s in samples if s["t"] >= warmup_s]
    k = len(post) // 3
    if k < 1:
        return {"ok": False, "why": f"only {len(post)} samples after the warm-up; run longer or sample more often"}
    net = [(s["t"], s["rss_bytes"] - s.get("prefix_cache_bytes", 0)) for s in post]
    first, last = statistics.median(v for _, v in net[:k]), statistics.median(v for _, v in net[-k:])
    limit = max(tol_pct / 100 * first, tol_mib * MIB)
    ts, vs = [t for t, _ in net], [v for _, v in net]
    tm, vm = statistics.fmean(ts), statistics.fmean(vs)
    den = sum((t - tm) ** 2 for t in ts)
    slope = sum((t - tm) * (v - vm) for t, v in net) / den * 60 / MIB if den else 0.0
    return {"ok": last - first <= limit, "first_mib": first / MIB, "last_mib": last / MIB,
            "growth_mib": (last - first) / MIB, "growth_pct": 100 * (last - first) / first, "limit_mib": limit / MIB,
            "slope_mib_per_min": slope, "samples": len(post)}


def verdict(records: list[dict], samples: list[dict], after: dict, healthy: dict, args) -> dict:
    flat = rss_flatness(samples, args.warmup_frac * args.seconds, args.rss_tol_pct, args.rss_tol_mib)
    bad = [r for r in records if r["status"] not in KINDS[r["kind"]][1]
           or r["outcome"] not in ("ok", "cancelled", f"http_{r['status']}")]
    pids = {s["pid"] for s in samples} | {after.get("pid")}
    checks = {
        "rss_flat": flat["ok"],
        "slots_back_to_0": all(after.get(k) == 0 for k in ("running", "waiting", "inflight")),
        "no_5xx": not any(r["status"] >= 500 for r in records),
        "no_hang": not any(r["outcome"] == "hang" for r in records),
        "only_expected_answers": not bad,
        "overload_reached_429": any(r["status"] == 429 for r in records),
        "healthy_after": healthy["health"] == 200 and healthy["chat"] == 200,
        "same_replica": len(pids - {None}) == 1,
    }
    return {"pass": all(checks.values()), "checks": checks, "rss": flat,
            "unexpected": Counter(f"{r['kind']}:{r['status']}:{r['outcome']}" for r in bad)}


# ---- the run ----------------------------------------------------------------------------------


def _auth_headers(args) -> dict:
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> subprocess.Popen:
    """`mlx-ray serve` on a free loopback port, its own embedded Ray; sets args.url / ray_address / app_name."""
    model = args.model or _fixture_model()
    port = _free_port()
    log = open(tempfile.NamedTemporaryFile(prefix="soak_serve_", suffix=".log", delete=False).name, "w")
    cmd = [sys.executable, "-m", "mlx_ray.cli", "serve", "--model", model, "--served-model-name", args.model_name,
           "--port", str(port), "--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(args.max_queue),
           "--max-model-len", str(args.max_model_len)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while "ready at" not in Path(log.name).read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"soak: mlx-ray serve did not come up (see {log.name})")
        time.sleep(1)
    args.url, args.ray_address, args.app_name = f"http://127.0.0.1:{port}", "auto", "mlx-ray"
    args.admission_limit = args.max_num_seqs + args.max_queue
    return proc


def _fixture_model() -> str:
    from mlx_ray.conversion.convert import convert
    from mlx_ray.fixtures import smollm2_hf_dir

    cache = Path(tempfile.gettempdir()) / "mlx-ray-soak-cache"
    out = cache / "SmolLM2-135M-Instruct" / "f32"
    if not out.exists():
        convert(str(smollm2_hf_dir()), cache_dir=cache, quantize=False, dtype="float32")
    return str(out)


def check_after(args, headers: dict) -> dict:
    import httpx

    with httpx.Client(base_url=args.url, headers=headers, timeout=args.request_timeout) as c:
        health = c.get("/health").status_code
        body = {"model": args.model_name, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 8,
                "temperature": 0}
        chat = c.post("/v1/chat/completions", json=body)
    return {"health": health, "chat": chat.status_code}


def run(args) -> dict:
    sampler = Sampler(args.ray_address, args.app_name, args.model_name)
    out_file = tempfile.NamedTemporaryFile(prefix="soak_load_", suffix=".json", delete=False).name
    cmd = [sys.executable, os.path.abspath(__file__), "--role", "load", "--url", args.url, "--model-name",
           args.model_name, "--concurrency", str(args.concurrency), "--seconds", str(args.seconds), "--seed",
           str(args.seed), "--request-timeout", str(args.request_timeout), "--load-out", out_file,
           *(["--api-key-env", args.api_key_env] if args.api_key_env else [])]
    samples = [sampler.sample()]
    load = subprocess.Popen(cmd)
    try:
        while load.poll() is None:
            time.sleep(args.sample_s)
            samples.append(sampler.sample())
    finally:
        if load.poll() is None:
            load.kill()
    if load.returncode != 0:
        raise SystemExit(f"soak: the load generator failed (exit {load.returncode})")
    records = json.loads(Path(out_file).read_text())
    os.unlink(out_file)
    load_end = samples[-1]["t"]
    deadline = time.monotonic() + args.drain_s
    after = sampler.sample()
    while any(after[k] for k in ("running", "waiting", "inflight")) and time.monotonic() < deadline:
        time.sleep(0.5)
        after = sampler.sample()
    after.update(drain_s=after["t"] - load_end, pid=sampler.replica()["pid"])
    healthy = check_after(args, _auth_headers(args))
    t0 = samples[0]["t"]
    for s in samples + [after]:  # the verdict's clock: seconds since load started
        s["t"] -= t0
    return {"config": {k: v for k, v in vars(args).items() if k not in ("role", "load_out")},
            "records": records, "samples": samples, "after": after, "healthy_after": healthy,
            "verdict": verdict(records, samples, after, healthy, args)}


def report(res: dict) -> str:
    cfg, v = res["config"], res["verdict"]
    lines = [f"soak: {cfg['seconds']:.0f} s against {cfg['url']} (model {cfg['model_name']}), {cfg['concurrency']} "
             f"clients = ceil(1.5 x admission limit {cfg['admission_limit']})", "",
             f"{'kind':<16}{'n':>6}{'200':>6}{'400':>6}{'429':>6}{'other':>7}{'p50 s':>8}{'p99 s':>8}"]
    for kind in KINDS:
        rs = [r for r in res["records"] if r["kind"] == kind]
        if not rs:
            continue
        st = Counter(r["status"] for r in rs)
        lat = sorted(r["latency_s"] for r in rs)
        lines.append(f"{kind:<16}{len(rs):>6}{st[200]:>6}{st[400]:>6}{st[429]:>6}"
                     f"{len(rs) - st[200] - st[400] - st[429]:>7}{lat[len(lat) // 2]:>8.2f}"
                     f"{lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)]:>8.2f}")
    lines += ["", f"{'t s':>6}{'RSS MiB':>9}{'prefix MiB':>11}{'running':>9}{'waiting':>9}{'inflight':>9}"]
    samples = res["samples"]
    step = max(1, len(samples) // 12)
    for s in samples[::step] + [res["after"]]:
        lines.append(f"{s['t']:>6.0f}{s['rss_bytes'] / MIB:>9.0f}{s['prefix_cache_bytes'] / MIB:>11.1f}"
                     f"{s['running']:>9}{s['waiting']:>9}{s['inflight']:>9}")
    r = v["rss"]
    lines += ["", f"verdict: {'PASS' if v['pass'] else 'FAIL'}"]
    if "first_mib" in r:
        lines.append(f"  rss (net of prefix cache): first third {r['first_mib']:.0f} MiB, last third {r['last_mib']:.0f} "
                     f"MiB ({r['growth_mib']:+.1f} MiB, {r['growth_pct']:+.1f}%; limit +{r['limit_mib']:.0f} MiB), "
                     f"slope {r['slope_mib_per_min']:+.1f} MiB/min over {r['samples']} samples")
    else:
        lines.append(f"  rss: {r['why']}")
    lines.append(f"  drained to 0 in {res['after']['drain_s']:.1f} s after load stopped" if v["checks"]["slots_back_to_0"]
                 else f"  NOT drained after {cfg['drain_s']:.0f} s: {res['after']}")
    lines += [f"  {'ok  ' if ok else 'FAIL'} {name}" for name, ok in v["checks"].items()]
    if v["unexpected"]:
        lines.append(f"  unexpected answers: {dict(v['unexpected'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    p.add_argument("--url", help="an mlx-ray server's base URL (default: start `mlx-ray serve` here)")
    p.add_argument("--ray-address", default="auto", help="with --url: the Ray cluster it runs on (for the samples)")
    p.add_argument("--app-name", default="mlx-ray", help="with --url: its Serve application")
    p.add_argument("--model-name", default="soak", help="the served model name")
    p.add_argument("--admission-limit", type=int, help="with --url: the engine's max_num_seqs + max_queue")
    p.add_argument("--model", help="without --url: the model to serve (default: the fixture, as float32)")
    p.add_argument("--max-num-seqs", type=int, default=4, help="without --url (default 4)")
    p.add_argument("--max-queue", type=int, default=4, help="without --url (default 4)")
    p.add_argument("--max-model-len", type=int, default=1024, help="without --url (default 1024)")
    p.add_argument("--api-key-env", help="env var holding the server's bearer key")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--warmup-frac", type=float, default=0.2, help="share of the run left out of the RSS verdict")
    p.add_argument("--rss-tol-pct", type=float, default=10.0)
    p.add_argument("--rss-tol-mib", type=float, default=64.0)
    p.add_argument("--drain-s", type=float, default=30.0, help="how long the engine may take to drain after load")
    p.add_argument("--request-timeout", type=float, default=120.0, help="per request: past it, a hang")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the full report here ('-': stdout)")
    p.add_argument("--role", choices=["load"], help=argparse.SUPPRESS)  # the load generator's process
    p.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    p.add_argument("--load-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "load":
        return load_main(args)
    args.seconds = args.minutes * 60
    server = None
    if args.url is None:
        server = start_server(args)
    elif args.admission_limit is None:
        p.error("--url needs --admission-limit (the engine's max_num_seqs + max_queue)")
    args.concurrency = math.ceil(1.5 * args.admission_limit)
    try:
        res = run(args)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    print(report(res), flush=True)
    if args.json:
        text = json.dumps(res, indent=1, default=str)
        sys.stdout.write(text + "\n") if args.json == "-" else Path(args.json).write_text(text)
    return 0 if res["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
