"""The router of issue 31 (``mlx_ray.router``) measured in one run: its own cost, goodput under overload against
the primary alone and against LiteLLM's router on the same pair of arms, and an outage of the secondary.

    python bench/router.py [--quick] [--json OUT.json] [--plot OUT.png] [--burst-s 60] [--slo-s S]

Every arm is a real mlx-ray server without Ray (``tests/arm_server.py``: the engine and the SmolLM2-135M
fixture, f32, under uvicorn); the router is its own process (``python -m mlx_ray.router.standalone``, the app
the Serve deployment serves); LiteLLM's proxy is its own process from its own venv
(``build/litellm-venv``, made on first use, pinned ``LITELLM_PIN``); the load generator runs in a process of
its own for every measurement (``--load-worker``: httpx, streaming chat completions, raw SSE), the same for
every side. Requests alternate greedy and sampled (temperature 0.7, top_p 0.9, seeded), short prompts, 32
output tokens (``ignore_eos``).

1. **The router's own cost.** A third arm (16 sequences, not pinned) alone; at 1 and 16 concurrent streams,
   greedy and sampled, each side in turn (straight to the arm, through the router, through LiteLLM; the order
   rotated per round): TTFT median and p90, and CPU seconds per request of the router's (LiteLLM's) process
   from ``/proc/<pid>/stat`` around the measured requests (its idle probe loop included; its idle cores are
   printed). The other arms are stopped (SIGSTOP) meanwhile. Target: the router adds <= 3 ms to the median
   TTFT at 16 concurrent.
2. **Overload goodput.** The primary (2 sequences, a queue of 64: like vLLM it queues, never refuses; pinned to
   CPU 0) and the secondary (2 sequences, a queue of 4; pinned to CPU 1), so each arm has a core of its own as
   on two machines. First the primary alone is measured at its capacity (2 closed-loop streams): C requests/s,
   and L, the median whole-request latency. The SLO on time to first token is ``2 L`` unless ``--slo-s``:
   a request may wait about one request ahead of it per slot. Then, per side, an open-loop burst (Poisson
   arrivals, the same seed on every side) at 3 C for ``--burst-s``; a client that has no first token within the
   SLO gives up (closes the stream), as a client with a deadline does, so no side serves a backlog nobody waits
   for. Goodput: requests that end with ``[DONE]`` and a TTFT within the SLO, per second of burst. Sides: the
   primary alone; both arms behind this router (``policy: overflow``, the primary's load from its ``/metrics``
   vLLM gauges, ``max_waiting: 0``; the secondary's from its ``/v1/load``, ``max_running: 2``;
   ``ttft_slo_s`` = the SLO; other settings default); both arms behind LiteLLM (see ``litellm_config``).
   Targets: goodput >= 1.3x the primary alone and >= LiteLLM's.
3. **An outage.** Both arms behind this router with ``policy: ab`` 50/50 (every request its own user), 4
   closed-loop streams; the secondary is stopped (SIGSTOP) at 1/3 of the run and resumed (SIGCONT) at 2/3.
   Failed requests (streams already running on the secondary at the stop, and the others), seconds until its
   circuit opened (``/health``, polled every 0.1 s), and after SIGCONT until its circuit closed and until it
   served a request again. Targets: no failure but those running streams; it stops sending within 5 s.

Whole run about 10-11 minutes (``--quick``: about 4, 15 s bursts, one round; figures for a smoke test only).
Run it on a quiet machine: everything here shares the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LITELLM_PIN = "1.105.7"  # the newest whose [proxy] extra installs from PyPI (1.108+ needs packages not published there)
LITELLM_VENV = REPO / "build" / "litellm-venv"
MAX_TOKENS = 32
SAMPLED = {"temperature": 0.7, "top_p": 0.9}
SHORT_PROMPTS = [  # short prompts: ~20-30 prompt tokens with the chat template
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "Describe the water cycle to a child.",
    "Write a letter to a friend about the sea.",
    "What caused the French Revolution?",
    "Give me a recipe for vegetable soup.",
    "Describe a busy market in a large city.",
    "Explain weather and climate with examples.",
    "Write a poem about autumn leaves.",
    "How do bees make honey?",
    "Tell me about the history of the bicycle.",
    "Write a dialogue between a cat and a dog.",
    "Explain why the sky is blue.",
    "Describe a weekend in the mountains.",
    "What should a beginner know about the guitar?",
    "Write a fairy tale about a brave mouse.",
]


# -- the load generator (its own process: --load-worker) ---------------------------------------------------------

def _body(model: str, i: int, mode: str, max_tokens: int, user: str | None = None) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": SHORT_PROMPTS[i % len(SHORT_PROMPTS)]}],
         "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    if mode == "sampled":
        b.update(SAMPLED, seed=i)
    else:
        b["temperature"] = 0.0
    if user:
        b["user"] = user
    return b


async def _one(client, url: str, body: dict, deadline_s: float | None) -> dict:
    """One streamed request. ``deadline_s``: give up (close the stream) if no first token by then."""
    rec = {"t0": time.monotonic(), "mode": "sampled" if "seed" in body else "greedy", "ok": False, "ttft": None,
           "t_first": None, "t_end": None, "tokens": 0, "chunks": 0, "arm": None, "route": None, "status": None,
           "error": None, "abandoned": False}
    done = False
    try:
        async with asyncio.timeout(deadline_s) as tmo:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                rec["status"] = r.status_code
                rec["arm"] = r.headers.get("x-mlx-ray-arm") or r.headers.get("x-litellm-model-api-base")
                rec["route"] = r.headers.get("x-mlx-ray-route")
                if r.status_code != 200:
                    text = (await r.aread()).decode("utf-8", "replace")
                    rec["error"] = f"http_{r.status_code}: {' '.join(text.split())[:200]}"
                    return rec
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if obj.get("error"):
                        rec["error"] = "stream_error: " + " ".join(str(obj["error"].get("message", obj["error"])).split())[:200]
                        continue
                    if obj.get("usage"):
                        rec["tokens"] = obj["usage"].get("completion_tokens") or 0
                    ch = obj.get("choices") or []
                    if ch and (ch[0].get("delta") or {}).get("content"):
                        rec["chunks"] += 1
                        if rec["t_first"] is None:
                            rec["t_first"] = time.monotonic()
                            rec["ttft"] = rec["t_first"] - rec["t0"]
                            tmo.reschedule(None)  # the deadline is on the first token only
    except TimeoutError:
        rec["abandoned"], rec["error"] = True, "abandoned: no first token within the deadline"
    except Exception as e:  # noqa: BLE001 - every failure is a data point
        rec["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    rec["t_end"] = time.monotonic()
    if done and rec["error"] is None:
        rec["ok"] = True
        rec["tokens"] = rec["tokens"] or rec["chunks"]
    elif rec["error"] is None:
        rec["error"] = "stream ended without [DONE]"
    return rec


async def _load(job: dict) -> list[dict]:
    import httpx

    url, model, mt = job["url"], job["model"], job.get("max_tokens", MAX_TOKENS)
    modes = job.get("modes", ["greedy", "sampled"])
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0, connect=10.0)) as client:
        # warm-up: the side's connections and first-call paths, the same on every side, not recorded
        w = job.get("warmup", 0)
        if w:
            await asyncio.gather(*(_one(client, url, _body(model, 1000 + i, modes[i % len(modes)], 4), None)
                                   for i in range(w)))
        print("warm", flush=True)
        out: list[dict] = []
        if job["kind"] == "closed":  # `concurrency` streams back to back until `requests` (or `duration_s`) are done
            n, conc, dur = job.get("requests"), job["concurrency"], job.get("duration_s")
            counter = iter(range(10 ** 9))
            t_end = time.monotonic() + dur if dur else None

            async def worker() -> None:
                while True:
                    i = next(counter)
                    if (n is not None and i >= n) or (t_end is not None and time.monotonic() >= t_end):
                        return
                    user = f"user-{job.get('user_tag', '')}{i}" if job.get("users") else None
                    out.append(await _one(client, url, _body(model, i, modes[i % len(modes)], mt, user), None))

            await asyncio.gather(*(worker() for _ in range(conc)))
        else:  # open loop: Poisson arrivals at `rate` for `duration_s`, each abandoned without a first token by `deadline_s`
            rng = random.Random(job.get("seed", 0))
            t, arrivals = 0.0, []
            while True:
                t += rng.expovariate(job["rate"])
                if t >= job["duration_s"]:
                    break
                arrivals.append(t)
            t0 = time.monotonic()
            tasks = []
            for i, at in enumerate(arrivals):
                delay = t0 + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_one(client, url, _body(model, i, modes[i % len(modes)], mt),
                                                      job["deadline_s"])))
            out = list(await asyncio.gather(*tasks))
    return out


def load_worker() -> int:
    job = json.loads(sys.stdin.readline())
    recs = asyncio.run(_load(job))
    print(json.dumps(recs), flush=True)
    return 0


class Load:
    """One measurement by a load worker process; ``on_warm`` runs when its warm-up is done."""

    def __init__(self, job: dict):
        self.job = job
        self.proc = subprocess.Popen([sys.executable, __file__, "--load-worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=plain_env())
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self.t_warm: float | None = None

    def wait_warm(self) -> float:
        line = self.proc.stdout.readline()
        if line.strip() != "warm":
            raise RuntimeError(f"load worker: {line!r}")
        self.t_warm = time.monotonic()
        return self.t_warm

    def result(self) -> list[dict]:
        if self.t_warm is None:
            self.wait_warm()
        out = self.proc.stdout.readline()
        self.proc.wait(30)
        return json.loads(out)


# -- processes -----------------------------------------------------------------------------------------------------

def plain_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` and its children alive now, in seconds (/proc/<pid>/stat)."""
    import psutil

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        pids = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        pids = [pid]
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


class Proc:
    def __init__(self, name: str, cmd: list[str], logdir: Path, env: dict, cpus: list[int] | None = None):
        self.name = name
        self.log = logdir / f"{name}.log"
        with open(self.log, "w") as out:
            pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=pre,
                                         start_new_session=True)
        self.pid = self.proc.pid

    def signal(self, sig) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, sig)

    def wait_http(self, url: str, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(url, timeout=3).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready in {timeout:.0f}s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(15)


class Arm(Proc):
    def __init__(self, name: str, model_dir: Path, seqs: int, queue: int, logdir: Path, cpus: list[int] | None):
        from mlx_ray.blas import env_with_fast_blas

        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.model = name
        env = env_with_fast_blas(plain_env())
        env["HF_HUB_OFFLINE"] = "1"
        super().__init__(name, [sys.executable, str(REPO / "tests" / "arm_server.py"), str(model_dir), str(self.port),
                                name, str(seqs), str(queue)], logdir, env, cpus)

    def load(self) -> dict:
        import httpx

        return httpx.get(self.root + "/v1/load", timeout=10).json()

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = self.load()
                if r.get("waiting", 1) == 0 and r.get("running", 1) == 0:
                    return
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.2)
        print(f"(warning: arm {self.name} not idle after {timeout:.0f}s)", file=sys.stderr)


def start_router(name: str, cfg: dict, logdir: Path) -> tuple[Proc, str]:
    port = free_port()
    path = logdir / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    p = Proc(name, [sys.executable, "-m", "mlx_ray.router.standalone", "--config", str(path), "--port", str(port)],
             logdir, plain_env())
    url = f"http://127.0.0.1:{port}"
    p.wait_http(url + "/health", 60)
    return p, url


# -- LiteLLM ----------------------------------------------------------------------------------------------------------

def ensure_litellm() -> Path:
    """LiteLLM's proxy in its own venv under build/ (made on first use), so its pins never touch this environment."""
    exe = LITELLM_VENV / "bin" / "litellm"
    py = LITELLM_VENV / "bin" / "python"
    if exe.exists():
        got = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True).stdout.strip()
        if got == LITELLM_PIN:
            return exe
    print(f"installing litellm[proxy]=={LITELLM_PIN} into {LITELLM_VENV} (once; about a minute)", flush=True)
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_PIN}"], check=True)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"could not install litellm[proxy]=={LITELLM_PIN} into {LITELLM_VENV} ({e}). Is PyPI "
                         "reachable? Install it by hand (python -m venv build/litellm-venv && build/litellm-venv/bin/pip "
                         f"install 'litellm[proxy]=={LITELLM_PIN}'), or run with --no-litellm.") from None
    return exe


def litellm_config(primary: Arm, secondary: Arm, solo: Arm | None) -> dict:
    """LiteLLM configured for overflow the way its docs say: the primary as model group ``chat`` with
    ``max_parallel_requests: 2`` (its sequences, the point where vLLM starts queuing, the same threshold as the
    router's ``max_waiting: 0``; over it LiteLLM's limiter answers 429 at once) and a fallback group ``chat-mac``
    (the secondary, no limit of LiteLLM's: its own queue of 4 and its 429s bound it), ``fallbacks: [{chat:
    [chat-mac]}]`` and ``num_retries: 0`` so a full primary falls back at once rather than after backoffs.
    Cooldowns at their defaults. ``solo``: part 1's arm as group ``solo``."""
    def dep(name: str, arm: Arm, **kw) -> dict:
        return {"model_name": name, "litellm_params": {"model": f"openai/{arm.model}", "api_base": arm.root + "/v1",
                                                       "api_key": "unused", **kw}}

    models = [dep("chat", primary, max_parallel_requests=2), dep("chat-mac", secondary)]
    if solo is not None:
        models.append(dep("solo", solo))
    return {"model_list": models,
            "router_settings": {"fallbacks": [{"chat": ["chat-mac"]}], "num_retries": 0},
            "litellm_settings": {"drop_params": True, "telemetry": False, "request_timeout": 300},
            "general_settings": {}}


def start_litellm(cfg: dict, logdir: Path) -> tuple[Proc, str]:
    exe = ensure_litellm()
    port = free_port()
    path = logdir / "litellm.yaml"
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    env = plain_env()
    env.pop("PYTHONPATH", None)
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", DISABLE_SCHEMA_UPDATE="True",
               LITELLM_TELEMETRY="False",
               # no key on either proxy (the router runs without api_key_env here): LiteLLM refuses that unless told
               LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true")
    p = Proc("litellm", [str(exe), "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
                         "--num_workers", "1"], logdir, env)
    url = f"http://127.0.0.1:{port}"
    p.wait_http(url + "/health/liveliness", 180)
    return p, url


# -- figures ---------------------------------------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def steal_now() -> list[int] | None:
    try:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError):
        return None


def steal_pct(a, b) -> float | None:
    if a is None or b is None:
        return None
    d = [y - x for x, y in zip(a, b)]
    return 100.0 * d[7] / max(1, sum(d))


def table(headers, rows) -> str:
    from mlx_ray.bench.table import markdown_table

    return markdown_table(headers, rows)


# -- part 1: the router's own cost --------------------------------------------------------------------------------------

def part_cost(a, solo: Arm, router: tuple[Proc, str], litellm: tuple[Proc, str] | None) -> dict:
    sides = {"direct": (None, solo.root, solo.model), "router": (router[0], router[1], "chat")}
    if litellm is not None:
        sides["litellm"] = (litellm[0], litellm[1], "solo")
    idle = {}
    for name, (proc, _, _) in sides.items():
        if proc is not None:
            c0 = cpu_s(proc.pid)
            time.sleep(a.idle_s)
            idle[name] = (cpu_s(proc.pid) - c0) / a.idle_s
    # the arm warmed once for all sides: every prompt, both modes, a full batch (not recorded)
    Load({"kind": "closed", "url": solo.root, "model": solo.model, "concurrency": 16, "requests": 48,
          "warmup": 16}).result()
    solo.wait_idle()
    cells: dict[str, dict] = {}
    names = list(sides)
    for rnd in range(a.rounds):
        for conc in (1, 16):
            n = a.requests_1 if conc == 1 else a.requests_16
            for mode in ("greedy", "sampled"):
                order = names[rnd % len(names):] + names[:rnd % len(names)]
                for side in order:
                    proc, url, model = sides[side]
                    ld = Load({"kind": "closed", "url": url, "model": model, "concurrency": conc, "requests": n,
                               "modes": [mode], "warmup": conc})
                    ld.wait_warm()
                    c0 = cpu_s(proc.pid) if proc else 0.0
                    recs = ld.result()
                    c1 = cpu_s(proc.pid) if proc else 0.0
                    cell = cells.setdefault(f"{side}/{conc}/{mode}", {"recs": [], "cpu_s": 0.0, "requests": 0})
                    cell["recs"] += recs
                    cell["cpu_s"] += c1 - c0
                    cell["requests"] += len(recs)
                    solo.wait_idle()
    # Paired: 8 streams direct and 8 through the router at the same time, on the same arm, so both see the same
    # batch and the arm's own noise cancels out of the difference (the sequential cells above carry it whole).
    paired: dict[str, dict] = {}
    for mode in ("greedy", "sampled"):
        got: dict[str, list] = {"direct": [], "router": []}
        for _ in range(a.rounds):
            lds = {s: Load({"kind": "closed", "url": sides[s][1], "model": sides[s][2], "concurrency": 8,
                            "duration_s": a.paired_s, "modes": [mode], "warmup": 8}) for s in got}
            for ld in lds.values():
                ld.wait_warm()
            for s, ld in lds.items():
                got[s] += [r["ttft"] for r in ld.result() if r["ok"]]
            solo.wait_idle()
        paired[mode] = {s: {"requests": len(v), "ttft_p50": pct(v, 50)} for s, v in got.items()}
    out = {"idle_cores": idle, "cells": {}, "paired_16": paired}
    for key, cell in cells.items():
        ok = [r for r in cell["recs"] if r["ok"]]
        tt = [r["ttft"] for r in ok]
        toks = [r["tokens"] for r in ok]
        out["cells"][key] = {"requests": cell["requests"], "errors": cell["requests"] - len(ok),
                             "ttft_p50": pct(tt, 50), "ttft_p90": pct(tt, 90), "tokens_mean": statistics.mean(toks) if toks else 0,
                             "cpu_s_per_request": cell["cpu_s"] / cell["requests"] if key.split("/")[0] != "direct" else None}
    return out


def print_cost(r: dict, have_litellm: bool) -> None:
    rows = []
    for conc in (1, 16):
        for mode in ("greedy", "sampled"):
            d = r["cells"].get(f"direct/{conc}/{mode}")
            for side in ("direct", "router", "litellm"):
                c = r["cells"].get(f"{side}/{conc}/{mode}")
                if c is None:
                    continue
                add = None if side == "direct" or c["ttft_p50"] is None else c["ttft_p50"] - d["ttft_p50"]
                rows.append([conc, mode, side, c["requests"], c["errors"], ms(c["ttft_p50"]), ms(c["ttft_p90"]),
                             "-" if add is None else f"{1000 * add:+.1f}",
                             "-" if c["cpu_s_per_request"] is None else f"{1000 * c['cpu_s_per_request']:.1f}",
                             f"{c['tokens_mean']:.1f}"])
    print("\n## 1. The router's own cost (one arm of 16 sequences; 32 tokens; TTFT in ms)")
    print(table(["conc", "mode", "side", "requests", "errors", "TTFT p50", "TTFT p90", "added p50",
                 "proxy CPU ms/request", "tokens"], rows))
    print("idle cores of the proxy process (probe loop, no traffic): "
          + ", ".join(f"{k} {v:.4f}" for k, v in r["idle_cores"].items()))
    for mode, p in r.get("paired_16", {}).items():
        d, x = p["direct"], p["router"]
        add = 1000 * (x["ttft_p50"] - d["ttft_p50"])
        print(f"paired at 16 concurrent ({mode}): 8 direct + 8 through the router at once, {d['requests']} + "
              f"{x['requests']} requests: TTFT p50 {ms(d['ttft_p50'])} vs {ms(x['ttft_p50'])} ms")
        print(f"target: router adds <= 3 ms to median TTFT at 16 concurrent ({mode}, paired): {add:+.1f} ms: "
              f"{'met' if add <= 3 else 'NOT met'}")


# -- part 2: overload goodput ------------------------------------------------------------------------------------------

def calibrate(a, primary: Arm) -> dict:
    ld = Load({"kind": "closed", "url": primary.root, "model": primary.model, "concurrency": 2,
               "duration_s": a.calib_s, "warmup": 2})
    t0 = ld.wait_warm()
    recs = ld.result()
    wall = max(r["t_end"] for r in recs) - t0
    ok = [r for r in recs if r["ok"]]
    lat = pct([r["t_end"] - r["t0"] for r in ok], 50)
    return {"requests": len(recs), "errors": len(recs) - len(ok), "capacity_rps": len(ok) / wall, "latency_p50": lat,
            "ttft_p50": pct([r["ttft"] for r in ok], 50)}


def goodput_side(a, name: str, url: str, model: str, rate: float, slo: float, arms: list[Arm], proc: Proc | None) -> dict:
    for arm in arms:
        arm.wait_idle()
    ld = Load({"kind": "open", "url": url, "model": model, "rate": rate, "duration_s": a.burst_s, "deadline_s": slo,
               "seed": 31, "warmup": 4})
    ld.wait_warm()
    st0, c0 = steal_now(), cpu_s(proc.pid) if proc else 0.0
    recs = ld.result()
    steal, cpu = steal_pct(st0, steal_now()), (cpu_s(proc.pid) - c0) if proc else None
    good = [r for r in recs if r["ok"] and r["ttft"] is not None and r["ttft"] <= slo]
    ok = [r for r in recs if r["ok"]]
    failed = [r for r in recs if not r["ok"] and not r["abandoned"]]
    kinds: dict[str, int] = {}
    for r in failed:
        k = r["error"].split(":")[0]
        kinds[k] = kinds.get(k, 0) + 1
    by_arm: dict[str, int] = {}
    names = {arm.root + "/v1": ("primary" if i == 0 else "secondary") for i, arm in enumerate(arms)}
    for r in good:  # the router's x-mlx-ray-arm; LiteLLM's x-litellm-model-api-base; none when direct
        arm = names.get(r["arm"], r["arm"] or "primary")
        by_arm[arm] = by_arm.get(arm, 0) + 1
    return {"offered": len(recs), "goodput": len(good), "goodput_rps": len(good) / a.burst_s,
            "goodput_by_mode": {m: sum(r["mode"] == m for r in good) for m in ("greedy", "sampled")},
            "completed": len(ok), "abandoned": sum(r["abandoned"] for r in recs), "failed": len(failed),
            "failed_kinds": kinds, "good_by_arm": by_arm, "ttft_p50": pct([r["ttft"] for r in ok], 50),
            "ttft_p90": pct([r["ttft"] for r in ok], 90), "steal_pct": steal, "proxy_cpu_s": cpu,
            "ttfts": sorted(r["ttft"] for r in recs if r["ttft"] is not None),
            "error_samples": [r["error"] for r in failed][:3]}


def part_goodput(a, primary: Arm, secondary: Arm, litellm: tuple[Proc, str] | None, logdir: Path) -> dict:
    cal = calibrate(a, primary)
    slo = a.slo_s or round(2 * cal["latency_p50"], 2)
    rate = a.overload * cal["capacity_rps"]
    print(f"calibration: the primary alone at 2 streams: {cal['capacity_rps']:.2f} requests/s, whole-request latency "
          f"p50 {cal['latency_p50']:.2f} s, TTFT p50 {ms(cal['ttft_p50'])} ms; SLO {slo:.2f} s "
          f"({'--slo-s' if a.slo_s else '2 x latency p50'}); burst {rate:.2f} requests/s for {a.burst_s:.0f} s",
          flush=True)
    cfg = {"public_model": "chat", "policy": "overflow", "ttft_slo_s": slo,
           "arms": [{"name": "primary", "role": "primary", "base_url": primary.root + "/v1", "model": primary.model,
                     "load": {"prometheus": primary.root + "/metrics"}, "max_waiting": 0},
                    {"name": "secondary", "role": "secondary", "base_url": secondary.root + "/v1",
                     "model": secondary.model, "load": {"mlx_ray": secondary.root + "/v1/load"}, "max_running": 2}]}
    sides: dict[str, dict] = {}
    arms = [primary, secondary]
    sides["primary alone"] = goodput_side(a, "primary alone", primary.root, primary.model, rate, slo, arms, None)
    router, url = start_router("router-overflow", cfg, logdir)
    try:
        sides["router"] = goodput_side(a, "router", url, "chat", rate, slo, arms, router)
    finally:
        router.stop()
    if litellm is not None:
        sides["litellm"] = goodput_side(a, "litellm", litellm[1], "chat", rate, slo, arms, litellm[0])
    return {"calibration": cal, "slo_s": slo, "rate_rps": rate, "burst_s": a.burst_s, "router_config": cfg,
            "sides": sides}


def print_goodput(r: dict) -> None:
    print(f"\n## 2. Overload goodput ({r['rate_rps']:.2f} requests/s = {r['rate_rps'] / r['calibration']['capacity_rps']:.1f}"
          f" x the primary's capacity, {r['burst_s']:.0f} s, SLO on TTFT {r['slo_s']:.2f} s)")
    base = r["sides"]["primary alone"]["goodput"]
    rows = []
    for name, s in r["sides"].items():
        rows.append([name, s["offered"], s["goodput"], f"{s['goodput_rps']:.2f}",
                     f"{s['goodput'] / base:.2f}x" if base else "-",
                     f"{s['goodput_by_mode']['greedy']}/{s['goodput_by_mode']['sampled']}", s["completed"],
                     s["abandoned"], s["failed"], ms(s["ttft_p50"]), ms(s["ttft_p90"]),
                     ", ".join(f"{k} {v}" for k, v in sorted(s["good_by_arm"].items())),
                     "-" if s["steal_pct"] is None else f"{s['steal_pct']:.1f}"])
    print(table(["side", "offered", "goodput", "goodput/s", "x primary", "greedy/sampled", "completed", "abandoned",
                 "failed", "TTFT p50 ms", "TTFT p90 ms", "good by arm", "steal %"], rows))
    for name, s in r["sides"].items():
        if s["failed_kinds"]:
            print(f"{name}: failed {s['failed_kinds']}; e.g. {s['error_samples'][:1]}")
    ro, li = r["sides"].get("router"), r["sides"].get("litellm")
    if ro and base:
        print(f"target: router goodput >= 1.3x the primary alone: {ro['goodput'] / base:.2f}x: "
              f"{'met' if ro['goodput'] >= 1.3 * base else 'NOT met'}")
    if ro and li:
        print(f"target: router goodput >= LiteLLM's: {ro['goodput']} vs {li['goodput']}: "
              f"{'met' if ro['goodput'] >= li['goodput'] else 'NOT met'}")


def plot_goodput(r: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in r["sides"].items():
        xs = s["ttfts"]
        if xs:
            ax.step(xs, [(i + 1) / s["offered"] for i in range(len(xs))], where="post", label=f"{name} ({s['goodput']} good)")
    ax.axvline(r["slo_s"], color="grey", linestyle="--", label=f"SLO {r['slo_s']:.2f} s")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("share of offered requests")
    ax.set_title(f"TTFT CDF under {r['rate_rps']:.2f} req/s ({r['burst_s']:.0f} s burst)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# -- part 3: an outage ----------------------------------------------------------------------------------------------------

def part_outage(a, primary: Arm, secondary: Arm, logdir: Path) -> dict:
    import httpx

    cfg = {"public_model": "chat", "policy": "ab",
           "arms": [{"name": "primary", "role": "primary", "base_url": primary.root + "/v1", "model": primary.model,
                     "load": {"prometheus": primary.root + "/metrics"}, "weight": 0.5},
                    {"name": "secondary", "role": "secondary", "base_url": secondary.root + "/v1",
                     "model": secondary.model, "load": {"mlx_ray": secondary.root + "/v1/load"}, "weight": 0.5}]}
    for arm in (primary, secondary):
        arm.wait_idle()
    router, url = start_router("router-ab", cfg, logdir)
    samples: list[tuple[float, str]] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=5) as c:
            while not stop.is_set():
                try:
                    samples.append((time.monotonic(), c.get(url + "/health").json()["arms"]["secondary"]["circuit"]))
                except Exception:  # noqa: BLE001
                    pass
                time.sleep(0.1)

    dur = a.outage_s
    try:
        ld = Load({"kind": "closed", "url": url, "model": "chat", "concurrency": 4, "duration_s": dur, "users": True,
                   "warmup": 4})
        t0 = ld.wait_warm()
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        time.sleep(dur / 3)
        secondary.signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        time.sleep(dur / 3)
        secondary.signal(signal.SIGCONT)
        t_cont = time.monotonic()
        recs = ld.result()
        time.sleep(0.3)
    finally:
        secondary.signal(signal.SIGCONT)
        stop.set()
        router.stop()
    opened = next((t for t, s in samples if t >= t_stop and s != "closed"), None)
    closed_again = next((t for t, s in samples if t >= t_cont and s == "closed"), None)
    served_again = min((r["t_first"] for r in recs if r["ok"] and r["arm"] == "secondary" and r["t0"] >= t_cont),
                       default=None)
    failed = [r for r in recs if not r["ok"]]
    running = [r for r in failed if r["arm"] == "secondary" and r["t_first"] is not None and r["t_first"] < t_stop]
    others = [r for r in failed if r not in running]
    during = [r for r in recs if t_stop <= r["t0"] < t_cont and r["ok"]]
    before = [r for r in recs if r["t0"] < t_stop and r["ok"] and r["t_end"] < t_stop]
    sent_after_open = sum(1 for r in recs if opened and opened <= r["t0"] < t_cont and r["arm"] == "secondary")
    return {"duration_s": dur, "stop_at_s": t_stop - t0, "cont_at_s": t_cont - t0, "requests": len(recs),
            "ok": len(recs) - len(failed), "failed_running_on_secondary": len(running), "failed_other": len(others),
            "failed_other_errors": [r["error"] for r in others][:5],
            "stopped_sending_s": None if opened is None else opened - t_stop,
            "circuit_closed_after_cont_s": None if closed_again is None else closed_again - t_cont,
            "served_again_after_cont_s": None if served_again is None else served_again - t_cont,
            "answered_by_secondary_after_open_before_cont": sent_after_open,
            "failovers": sum(1 for r in recs if r["route"] == "failover"),
            "ttft_p50_before": pct([r["ttft"] for r in before], 50), "ttft_max_before": pct([r["ttft"] for r in before], 100),
            "ttft_p50_outage": pct([r["ttft"] for r in during], 50), "ttft_max_outage": pct([r["ttft"] for r in during], 100),
            "by_arm": {k: sum(r["arm"] == k for r in recs) for k in ("primary", "secondary")}, "router_config": cfg}


def print_outage(r: dict) -> None:
    print(f"\n## 3. An outage (ab 50/50, 4 streams for {r['duration_s']:.0f} s; the secondary stopped at "
          f"{r['stop_at_s']:.1f} s, resumed at {r['cont_at_s']:.1f} s)")
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print(table(["requests", "ok", "failed: running on the secondary", "failed: other", "stopped sending (s)",
                 "circuit closed after SIGCONT (s)", "served again after SIGCONT (s)", "failovers",
                 "TTFT p50/max before (ms)", "TTFT p50/max in outage (ms)"],
                [[r["requests"], r["ok"], r["failed_running_on_secondary"], r["failed_other"], f(r["stopped_sending_s"]),
                  f(r["circuit_closed_after_cont_s"]), f(r["served_again_after_cont_s"]), r["failovers"],
                  f"{ms(r['ttft_p50_before'])} / {ms(r['ttft_max_before'])}",
                  f"{ms(r['ttft_p50_outage'])} / {ms(r['ttft_max_outage'])}"]]))
    if r["failed_other_errors"]:
        print(f"other failures, e.g.: {r['failed_other_errors'][:2]}")
    print(f"target: no failure but the streams already running: {'met' if r['failed_other'] == 0 else 'NOT met'}")
    s = r["stopped_sending_s"]
    print(f"target: stops sending within 5 s: {f(s)} s: {'met' if s is not None and s <= 5 else 'NOT met'}")


# -- main -------------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of about 4 minutes (figures not for reporting)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write the goodput sides' TTFT CDFs here (PNG; needs matplotlib)")
    p.add_argument("--parts", default="cost,goodput,outage", help="which parts (default: all three)")
    p.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    p.add_argument("--burst-s", type=float, help="seconds of overload per side (default 60; quick 20)")
    p.add_argument("--overload", type=float, default=3.0, help="arrival rate in multiples of the primary's capacity")
    p.add_argument("--slo-s", type=float, help="SLO on TTFT (default: 2 x the primary's whole-request latency p50)")
    p.add_argument("--outage-s", type=float, help="length of the outage run (default 60; quick 30)")
    p.add_argument("--rounds", type=int, help="part 1 rounds (default 2; quick 1)")
    p.add_argument("--paired-s", type=float, help="part 1: seconds of each paired round (default 20; quick 8)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the primary and the secondary to CPUs 0 and 1")
    p.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.load_worker:
        return load_worker()
    q = a.quick
    a.burst_s = a.burst_s or (15.0 if q else 60.0)
    a.outage_s = a.outage_s or (24.0 if q else 60.0)
    a.rounds = a.rounds or (1 if q else 2)
    a.paired_s = a.paired_s or (8.0 if q else 20.0)
    a.requests_1, a.requests_16 = (3, 32) if q else (6, 48)
    a.calib_s = 5.0 if q else 12.0
    a.idle_s = 1.0 if q else 5.0
    parts = set(a.parts.split(","))
    from mlx_ray.bench.sides import fixture_model, machine_info

    t_start = time.monotonic()
    info = machine_info()
    print(f"machine: {info['cpu_model']}, {info['cpus']} CPUs, {info['ram_gb']} GB; load average "
          f"{' '.join(f'{x:.2f}' for x in info['load_avg'])}{'; QUICK smoke run' if q else ''}", flush=True)
    model = fixture_model(False)
    logdir = Path(tempfile.mkdtemp(prefix="bench-router-"))
    cpus = sorted(os.sched_getaffinity(0))
    pin = (not a.no_pin) and len(cpus) >= 2
    procs: list[Proc] = []
    report: dict = {"machine": info, "quick": q, "logs": str(logdir), "max_tokens": MAX_TOKENS, "sampled": SAMPLED,
                    "pinned": pin, "litellm": None if a.no_litellm else LITELLM_PIN}
    try:
        if not a.no_litellm:
            ensure_litellm()
        primary = Arm("prim", model, 2, 64, logdir, [cpus[0]] if pin else None)
        secondary = Arm("mac", model, 2, 4, logdir, [cpus[1]] if pin else None)
        procs += [primary, secondary]
        solo = None
        if "cost" in parts:
            solo = Arm("solo", model, 16, 64, logdir, None)
            procs.append(solo)
        for arm in [x for x in (primary, secondary, solo) if x is not None]:
            arm.wait_http(arm.root + "/health", 300)
        litellm = None
        if not a.no_litellm:
            litellm = start_litellm(litellm_config(primary, secondary, solo), logdir)
            procs.append(litellm[0])
        print(f"arms and proxies up in {time.monotonic() - t_start:.0f} s (logs: {logdir})", flush=True)
        if "cost" in parts:
            primary.signal(signal.SIGSTOP)
            secondary.signal(signal.SIGSTOP)
            rcfg = {"public_model": "chat", "policy": "overflow",
                    "arms": [{"name": "solo", "role": "primary", "base_url": solo.root + "/v1", "model": solo.model,
                              "load": {"prometheus": solo.root + "/metrics"}, "max_waiting": 1000}]}
            router = start_router("router-solo", rcfg, logdir)
            try:
                report["cost"] = part_cost(a, solo, router, litellm)
            finally:
                router[0].stop()
                solo.stop()
                primary.signal(signal.SIGCONT)
                secondary.signal(signal.SIGCONT)
            print_cost(report["cost"], litellm is not None)
        if "goodput" in parts:
            report["goodput"] = part_goodput(a, primary, secondary, litellm, logdir)
            print_goodput(report["goodput"])
            if a.plot:
                plot_goodput(report["goodput"], a.plot)
        if "outage" in parts:
            report["outage"] = part_outage(a, primary, secondary, logdir)
            print_outage(report["outage"])
    finally:
        for pr in procs:
            pr.stop()
    report["wall_s"] = time.monotonic() - t_start
    report["load_avg_end"] = os.getloadavg()
    print(f"\nwall {report['wall_s']:.0f} s; load average at the end {' '.join(f'{x:.2f}' for x in report['load_avg_end'])}")
    if a.json:
        for s in report.get("goodput", {}).get("sides", {}).values():
            s["ttfts"] = [round(x, 4) for x in s["ttfts"]]
        Path(a.json).write_text(json.dumps(report, indent=1))
        print(f"report: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
