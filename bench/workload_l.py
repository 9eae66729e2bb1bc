"""Workload L (issue 15, the paged KV cache): long distinct prompts, base vs new vs mlx_lm.server.

    python bench/workload_l.py [--sides base,new,new-kv8,mlx_lm] [--levels 16,32] [--modes greedy,top_p]
                               [--admission] [--short] [--json OUT] [--plot OUT.png]

**Throughput** (always, unless ``--skip-throughput``): at each level (16 and 32
concurrent) and sampling mode (greedy; temperature 0.7 + top_p 0.9 seeded per
request), one wave of ``--requests-per-level`` (default: the level) requests
with distinct prompts of ``--prompt-min`` to ``--prompt-max`` tokens (the
chat-templated length, stratified uniform and seeded; the text is the system
message, so no two prompts share more than the template's first three tokens
and no prefix cache helps; every level and mode has its own prompts, the same
for every side), ``--max-tokens`` (128) output tokens each (mlx-ray:
``ignore_eos``; mlx_lm.server, which has no such field: ``logit_bias`` -100 on
the EOS ids). Sides, one after another, each in a worker process of its own
session (its load generator, ``mlx_ray.bench.openai_load``, in that process at
the same priority, the server's whole process tree in the same CPU autogroup):

* ``base``: ``mlx-ray serve`` of the tree at ``--base-ref`` (default 87c4112,
  the parent of the issue's first engine change), a ``git worktree`` under
  /tmp (made if missing, reused if present) imported through PYTHONPATH, with
  this checkout's compiled CPU extension (``mlx_ray/kernels/_qmm_cpu*.so``) copied in;
* ``new``: this checkout's ``mlx-ray serve``;
* ``new-kv8``: the same with ``--kv-bits 8`` (skipped, with a note, while the
  CLI has no such option);
* ``mlx_lm``: ``mlx_lm.server`` (``--decode-concurrency`` = the top level).

Every side is warmed the same way before timing (one short request, one
workload-L-like request of about ``--prompt-min`` tokens, one short sampled
request when a sampled mode runs). Figures per side, level and mode: aggregate
output tok/s, TTFT p50/p99, ITL p50, peak RSS of the serving process (the
replica; mlx_lm.server's process) during the run (its high-water mark reset
before each run), and for the mlx-ray sides the engine's ``stats()`` after the
run (fetched through Serve's handle by a short-lived Ray driver between runs),
with the paged cache's keys (``kv_cache``, ``kv_bits``, ``kv_block_size``,
``kv_blocks_*``, ``kv_*copy_bytes_total``) when the engine has them, and the KV
bytes copied per admission / per finish (the run's counter deltas over its
requests). Ratios: new / base and new / mlx_lm (targets >= 1.5x and >= 2x).

**Admission** (``--admission``): the in-process engine (``MLXEngine``) of each
mlx-ray side (base in a process of its own with the worktree's PYTHONPATH)
with ``kv_budget_bytes`` = ``--kv-budget-mib`` (256), ``max_num_seqs`` 64 and
no prefix cache is handed ``--admission-requests`` (64) workload-L requests of
``--max-tokens`` each (ignore_eos) at once; ``stats()["running"]`` is polled
every few ms until the first request finishes (so no row has been freed yet)
and the peak is reported, new / base (targets: >= 2x; >= 3.5x with 8-bit KV,
``EngineConfig.kv_bits``, skipped while the engine has no such field). Each new
side runs twice: with its default admission (backfilling: later requests that
cannot delay the waiting head start beside it) and with ``admission="fifo"``
(``<side>-fifo``: strictly in arrival order, as vLLM's and TGI's schedulers).

**Short** (``--short``): the short prompts of ``bench/engine_vs_mlxlm.py`` at
concurrency 1/4/16/32, 64 tokens, greedy, ignore_eos, ``max(4, 2 x level)``
requests, on the same servers after the workload-L runs: base vs new, so a
regression on short requests shows.

The machine is shared: the load average is printed before and after every
side, and a start above 1.5 is warned about (only a quiet machine's figures
count). ``--json OUT`` keeps everything, ``--plot OUT.png`` draws tok/s by
side and level (matplotlib). Develop with tiny settings:
``--levels 2 --max-tokens 8 --prompt-max 300 --sides base,mlx_lm``.

This file only imports the standard library at the top: its worker modes run
under the base tree's PYTHONPATH, which has none of this checkout's modules.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("base", "new", "new-kv8", "mlx_lm")
MLX_RAY_SIDES = ("base", "new", "new-kv8")
SAMPLING = {"greedy": {"temperature": 0.0}, "top_p": {"temperature": 0.7, "top_p": 0.9}}
USER_TURN = "Continue the text above."
# Stats keys of the paged KV cache (issue 15); printed when the engine reports them.
KV_KEYS = ("kv_cache", "kv_bits", "kv_block_size", "kv_blocks_total", "kv_blocks_used", "kv_blocks_free",
           "kv_blocks_cached", "kv_copy_bytes_total", "kv_admit_copy_bytes_total", "kv_finish_copy_bytes_total")
TARGETS = {"x_base": 1.5, "x_mlx_lm": 2.0, "admission_x_base": 2.0, "admission_kv8_x_base": 3.5}
LOUD_LOAD = 1.5
MIB = 2**20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- prompts ------------------------------------------------------------------------------------
class PromptMaker:
    """Distinct chat prompts of exact templated token lengths, from the model's own tokenizer.

    The text is random whole-word tokens of the vocabulary (so it tokenizes back
    one token a word) in the system message; the user turn is fixed."""

    def __init__(self, model_dir: Path):
        import numpy as np
        from transformers import AutoTokenizer

        self.np = np
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        words = [w[1:] for w in self.tok.get_vocab() if w.startswith("\u0120") and w[1:].isascii()
                 and w[1:].isalpha() and w[1:].islower() and 3 <= len(w) - 1 <= 10]
        self.words = sorted(words)
        self.seen: set[tuple[str, ...]] = set()

    def length(self, messages: list[dict]) -> int:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def messages(text: str) -> list[dict]:
        return [{"role": "system", "content": text}, {"role": "user", "content": USER_TURN}]

    def one(self, rng, n_tokens: int) -> list[dict]:
        overhead = self.length(self.messages(""))
        while True:  # the first words differ from every earlier prompt's
            words = list(rng.choice(self.words, max(8, n_tokens - overhead)))
            if tuple(words[:8]) not in self.seen:
                self.seen.add(tuple(words[:8]))
                break
        for _ in range(8):
            diff = n_tokens - self.length(self.messages(" ".join(words)))
            if diff == 0:
                break
            words = words + list(rng.choice(self.words, diff)) if diff > 0 else words[:max(8, len(words) + diff)]
        return self.messages(" ".join(words))

    def batch(self, n: int, lo: int, hi: int, seed: list[int]) -> list[list[dict]]:
        """``n`` prompts, lengths stratified uniform over [lo, hi] in a seeded order."""
        rng = self.np.random.default_rng(seed)
        strata = (self.np.arange(n) + rng.random(n)) / n
        lengths = [int(round(lo + (hi - lo) * u)) for u in rng.permutation(strata)]
        return [self.one(rng, L) for L in lengths]

    def eos_ids(self, model_dir: Path) -> list[int]:
        ids = {self.tok.eos_token_id}
        for name in ("config.json", "generation_config.json"):
            try:
                v = json.loads((model_dir / name).read_text()).get("eos_token_id")
            except (OSError, ValueError):
                continue
            ids |= set(v) if isinstance(v, list) else {v}
        return sorted(i for i in ids if isinstance(i, int))


# -- the sides ---------------------------------------------------------------------------------
def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def ensure_worktree(ref: str, path: str | None) -> tuple[Path, str]:
    """The base tree at ``ref``: a detached git worktree (made if missing, reused if it holds ``ref``).

    Before this checkout moved them into ``mlx_ray/``, the install mapped
    ``mlx_ray.kernels`` and ``mlx_ray.conversion`` onto top folders ``kernels/``
    and ``conversion/`` (package-dir); in such a base tree, on PYTHONPATH, they
    are found through links inside its ``mlx_ray/``. The compiled CPU
    extension of this checkout (a superset of the old one) is copied in."""
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    tree = Path(path) if path else Path(tempfile.gettempdir()) / f"mlx-ray-base-{sha[:7]}"
    if (tree / ".git").exists():
        head = git("rev-parse", "HEAD", cwd=tree)
        if head != sha:
            raise SystemExit(f"{tree} holds {head[:7]}, not {ref} ({sha[:7]}); remove it "
                             f"(git worktree remove {tree}) or pass --worktree")
    else:
        if tree.exists():
            raise SystemExit(f"{tree} exists and is no git worktree; remove it or pass --worktree")
        git("worktree", "prune")
        git("worktree", "add", "--detach", str(tree), sha)
        log(f"base: made worktree {tree} at {sha[:7]}")
    for sub in ("kernels", "conversion"):
        link = tree / "mlx_ray" / sub
        if (tree / sub).is_dir() and not link.exists():
            link.symlink_to(Path("..") / sub)
    kdir = tree / "kernels" if (tree / "kernels").is_dir() else tree / "mlx_ray" / "kernels"
    for so in (ROOT / "mlx_ray" / "kernels").glob("_qmm_cpu*.so"):
        dst = kdir / so.name
        if not dst.exists() or dst.read_bytes() != so.read_bytes():
            shutil.copy2(so, dst)
    return tree, sha


def checkout_commit() -> str:
    sha = git("rev-parse", "--short", "HEAD")
    dirty = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return sha + (f" + uncommitted changes in {len(dirty)} tracked files" if dirty else "")


def serve_supports_kv_bits(pythonpath: str | None = None) -> bool:
    from mlx_ray.bench.sides import env_with_pythonpath

    p = subprocess.run([sys.executable, "-m", "mlx_ray.cli", "serve", "--help"], capture_output=True, text=True,
                       env=env_with_pythonpath(pythonpath), timeout=120)
    return "--kv-bits" in p.stdout


def engine_has_kv_bits() -> bool:
    from mlx_ray.engine.protocol import EngineConfig

    fields = getattr(EngineConfig, "model_fields", None) or getattr(EngineConfig, "__fields__", {})
    return "kv_bits" in fields


def resolve_sides(args) -> tuple[dict, dict]:
    """name -> {kind, pythonpath, extra_args, engine_cfg_extra, commit}; and name -> why skipped."""
    sides, skipped = {}, {}
    for name in args.sides:
        if name == "base":
            tree, sha = ensure_worktree(args.base_ref, args.worktree)
            sides[name] = {"kind": "mlx-ray", "pythonpath": str(tree), "extra_args": [], "engine_extra": {},
                           "commit": f"{sha[:7]} ({args.base_ref}, worktree {tree})"}
        elif name == "new":
            sides[name] = {"kind": "mlx-ray", "pythonpath": None, "extra_args": [], "engine_extra": {},
                           "commit": checkout_commit()}
        elif name == "new-kv8":
            if serve_supports_kv_bits():
                sides[name] = {"kind": "mlx-ray", "pythonpath": None, "extra_args": ["--kv-bits", str(args.kv_bits)],
                               "engine_extra": {}, "commit": checkout_commit()}
            elif engine_has_kv_bits():
                sides[name] = {"kind": "mlx-ray", "pythonpath": None, "extra_args": [],
                               "engine_extra": {"kv_bits": args.kv_bits}, "commit": checkout_commit(),
                               "note": "no --kv-bits option yet: kv_bits set in the serve config's engine block"}
            else:
                skipped[name] = "`mlx-ray serve --help` has no --kv-bits and EngineConfig no kv_bits (not yet)"
        elif name == "mlx_lm":
            import mlx_lm

            sides[name] = {"kind": "mlx_lm", "pythonpath": None, "extra_args": [], "engine_extra": {},
                           "commit": f"mlx-lm {mlx_lm.__version__}"}
    return sides, skipped


def request_shape(kind: str, mode: str, eos_ids: list[int]) -> dict:
    """temperature, extra_body and seeding of a request of ``mode`` to a server of ``kind``."""
    params = dict(SAMPLING[mode])
    body = {k: v for k, v in params.items() if k != "temperature"}
    if kind == "mlx_lm":  # no ignore_eos: EOS made unreachable instead
        body["logit_bias"] = {str(i): -100.0 for i in eos_ids}
    else:
        body["ignore_eos"] = True
    return {"temperature": params["temperature"], "extra_body": body, "seeded": mode != "greedy"}


def side_spec(args, name: str, side: dict, model_dir: Path, plan: dict, eos_ids: list[int]) -> dict:
    kind = side["kind"]
    top = max([*args.levels, *(args.short_levels if args.short and kind == "mlx-ray" else [])])
    # Every mlx-ray side gets the same KV budget and context (their defaults differ: the paged pool is
    # allocated whole at start, so its default is capped by what the batch could hold).
    engine_cfg = dict(max_num_seqs=top, max_queue=top * 4, kv_budget_bytes=args.serve_kv_budget_mib * MIB,
                      max_model_len=args.prompt_max + args.max_tokens + 256, **side["engine_extra"])

    def run(key, level, mode, prompts, max_tokens):
        return {"key": key, "level": level, "mode": mode, "prompts": prompts, "max_tokens": max_tokens,
                **request_shape(kind, mode, eos_ids)}

    from mlx_ray.bench.sides import PROMPTS

    warmup = [run("warm-short", 1, "greedy", PROMPTS[:1], 8), run("warm-long", 1, "greedy", plan["warmup"], 16)]
    if "top_p" in args.modes:
        warmup.append(run("warm-sampled", 1, "top_p", PROMPTS[1:2], 8))
    runs = [] if args.skip_throughput else [run(f"{c}:{m}", c, m, plan["runs"][f"{c}:{m}"], args.max_tokens)
                                           for c in args.levels for m in args.modes]
    short = []
    if args.short and kind == "mlx-ray":
        short = [dict(run(str(c), c, "greedy", PROMPTS, args.short_max_tokens), n=max(4, 2 * c))
                 for c in args.short_levels]
    return {"name": name, "kind": kind, "model": str(model_dir), "pythonpath": side["pythonpath"],
            "extra_args": side["extra_args"], "engine_cfg": engine_cfg, "decode_concurrency": top,
            "warmup": warmup, "runs": runs, "short": short, "request_timeout": args.request_timeout}


def spawn(cmd: list[str], env: dict, what: str, cwd: str | None = None) -> None:
    """Run a worker in its own session (its own CPU autogroup); kill its whole group afterwards."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, cwd=cwd)
    try:
        if proc.wait() != 0:
            raise RuntimeError(f"the {what} worker failed ({proc.returncode})")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind
        except ProcessLookupError:
            pass


def run_worker(mode: str, spec: dict, env: dict, what: str, cwd: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="workload_l_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        spawn([sys.executable, str(Path(__file__).resolve()), mode, str(spec_path), str(out_path)], env, what, cwd)
        return json.loads(out_path.read_text())


# -- worker: one side through its server ---------------------------------------------------------
def serve_worker(spec: dict) -> dict:
    """Start the side's server, warm it, run the spec's runs; the load generator runs here."""
    from mlx_ray.bench.openai_load import arun_load
    from mlx_ray.bench.sides import MlxLmServer, MlxRayServe, Usage, peak_rss, reset_peak_rss

    mlx_ray_side = spec["kind"] == "mlx-ray"
    if mlx_ray_side:
        server = MlxRayServe(Path(spec["model"]), spec["engine_cfg"], spec["pythonpath"], spec["extra_args"])
    else:
        # a listen backlog of 128, not the 5 of `python -m mlx_lm.server`: with 5, connections opened at once
        # beyond it are reset while its accept loop is held up (bench/multi_lora.py's docstring)
        server = MlxLmServer(Path(spec["model"]), spec["decode_concurrency"], listen_backlog=128)
    out: dict = {"runs": {}, "short": {}}

    def load(r: dict, n: int | None = None) -> dict:
        return asyncio.run(arun_load(server.url, server.model, r["level"], n or len(r["prompts"]), r["prompts"],
                                     max_tokens=r["max_tokens"], temperature=r["temperature"],
                                     extra_body=r["extra_body"], seeded=r["seeded"], timeout=spec["request_timeout"]))

    try:
        t0 = time.monotonic()
        server.wait_ready()
        out["ready_s"] = time.monotonic() - t0
        if mlx_ray_side:
            probe = server.engine()
            pid, out["info"] = probe["info"]["pid"], probe["info"]
        else:
            pid = server.proc.pid
        out["serving_pid"] = pid
        out["serving_process"] = facts = serving_process_facts(pid)
        tree = spec["pythonpath"]
        if tree and (facts.get("kernel_ext") and not all(f.startswith(tree) for f in facts["kernel_ext"])
                     or not facts.get("cwd", "").startswith(tree)):
            raise RuntimeError(f"the {spec['name']} replica does not run {tree}: {facts}")
        for r in spec["warmup"]:
            w = load(r)
            if w["errors"]:
                raise RuntimeError(f"warm-up {r['key']} failed: {w['error_samples']}")
        prev = server.engine()["stats"] if mlx_ray_side else {}
        out["stats_after_warmup"] = prev
        for section in ("runs", "short"):
            for r in spec[section]:
                pids = server.pids() if mlx_ray_side else [server.proc.pid]
                reset = reset_peak_rss(pid)
                la0 = os.getloadavg()
                with Usage(*pids, os.getpid()) as use:
                    res = load(r, r.get("n"))
                res.pop("url", None)
                rec = dict(res, mode=r["mode"], peak_rss_bytes=peak_rss(pid), peak_rss_since="run" if reset else "start",
                           cpu_s=use.cpu_s, load_avg_before=la0, load_avg_after=os.getloadavg())
                if mlx_ray_side:
                    st = server.engine()["stats"]
                    rec["engine_stats"] = st
                    rec["engine_stats_delta"] = {k: v - prev.get(k, 0) for k, v in st.items()
                                                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 and (k.endswith("_total") or k in ("prefix_hits", "prefix_misses",
                                                                                    "prefix_hit_tokens"))}
                    prev = st
                out[section][r["key"]] = rec
                log(f"  {spec['name']} {section} {r['key']}: {rec['output_tok_s']:.1f} tok/s, "
                    f"{rec['completed']}/{rec['requests']} ok, TTFT p50 {fmt_s(rec['ttft_s']['p50'])}")
    finally:
        server.stop()
    return out


def fmt_s(x) -> str:
    return "-" if x is None else f"{x:.2f} s"


def serving_process_facts(pid: int) -> dict:
    """What the serving process runs: its PYTHONPATH, and where its compiled kernels came from."""
    facts: dict = {}
    try:
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        facts["PYTHONPATH"] = env.get("PYTHONPATH", "")
        facts["cwd"] = os.readlink(f"/proc/{pid}/cwd")
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        facts["kernel_ext"] = sorted({line.split()[-1] for line in maps if "_qmm_cpu" in line})
    except OSError as e:
        facts["error"] = str(e)
    return facts


# -- worker: admission in process ---------------------------------------------------------------
async def admission_async(spec: dict) -> dict:
    """Hand the engine every request at once; the peak of ``running`` until the first one finishes."""
    import mlx_ray
    from mlx_ray.engine.engine import MLXEngine
    from mlx_ray.engine.protocol import EngineConfig, FinishEvent, GenerationRequest, SamplingParams

    fields = getattr(EngineConfig, "model_fields", None) or getattr(EngineConfig, "__fields__", {})
    cfg = dict(kv_budget_bytes=spec["kv_budget_bytes"], max_num_seqs=spec["max_num_seqs"],
               max_queue=len(spec["prompts"]) + 4, prefix_cache_bytes=spec["prefix_cache_bytes"])
    if spec.get("kv_bits"):
        if "kv_bits" not in fields:
            return {"skipped": "EngineConfig has no kv_bits (not yet)", "mlx_ray": mlx_ray.__file__}
        cfg["kv_bits"] = spec["kv_bits"]
    if spec.get("admission"):
        if "admission" not in fields:
            return {"skipped": "EngineConfig has no admission policy (not yet)", "mlx_ray": mlx_ray.__file__}
        cfg["admission"] = spec["admission"]
    engine = MLXEngine(spec["model"], EngineConfig(**cfg))
    await engine.start()
    try:
        ids = [engine.encode_chat(m) for m in spec["prompts"]]
        warm = GenerationRequest("adm-warm", engine.encode_chat([{"role": "user", "content": "Hello there."}]),
                                 SamplingParams(max_tokens=4, temperature=0.0))
        async for _ in engine.generate(warm):
            pass
        first_finish = asyncio.Event()
        finished: list[str] = []

        async def one(i: int, prompt: list[int]) -> None:
            req = GenerationRequest(f"adm-{i}", prompt, SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0,
                                                                        ignore_eos=True))
            async for ev in engine.generate(req):
                if isinstance(ev, FinishEvent):
                    finished.append(ev.finish_reason if ev.error is None else f"error: {ev.error}")
                    first_finish.set()

        t0 = time.monotonic()
        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(ids)]
        peak, at_peak, samples = -1, {}, 0
        while not first_finish.is_set() and time.monotonic() - t0 < spec["max_s"]:
            st = engine.stats()
            samples += 1
            if st.get("running", 0) >= peak:  # the last sample at the peak (every request submitted by then)
                peak, at_peak = st["running"], dict(st, t_s=time.monotonic() - t0)
            await asyncio.sleep(0.003)
        t_end = time.monotonic() - t0
        end_stats = engine.stats()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"peak_running": peak, "stats_at_peak": at_peak, "stats_at_stop": end_stats,
                "stopped_by": "first finish" if first_finish.is_set() else f"time limit {spec['max_s']} s",
                "first_finish": finished[:1], "stop_s": t_end, "samples": samples, "submitted": len(ids),
                "prompt_tokens": [len(p) for p in ids], "engine_config": cfg, "mlx_ray": mlx_ray.__file__}
    finally:
        await engine.shutdown()


# -- the driver ----------------------------------------------------------------------------------
def plan_prompts(args, maker: PromptMaker) -> dict:
    mode_ix = {m: i for i, m in enumerate(SAMPLING)}
    plan = {"warmup": maker.batch(1, args.prompt_min, args.prompt_min, [args.seed, 999]), "runs": {}}
    if not args.skip_throughput:
        for c in args.levels:
            for m in args.modes:
                n = args.requests_per_level or c
                plan["runs"][f"{c}:{m}"] = maker.batch(n, args.prompt_min, args.prompt_max, [args.seed, c, mode_ix[m]])
    if args.admission:
        plan["admission"] = maker.batch(args.admission_requests, args.prompt_min, args.prompt_max, [args.seed, 777])
    return plan


def run(args) -> dict:
    from mlx_ray.bench.sides import env_with_pythonpath, fixture_model, machine_info
    from mlx_ray.blas import env_with_fast_blas, loaded_blas

    machine = machine_info()
    report: dict = {"machine": machine, "blas": loaded_blas(), "sides": {}, "skipped": {}, "notes": [],
                    "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")}}
    load0 = machine["load_avg"][0]
    log(f"machine: {machine['cpu_model']}, {machine['cpus']} cores, {machine['ram_gb']} GiB; "
        f"load avg {' '.join(f'{x:.2f}' for x in machine['load_avg'])}")
    if load0 > LOUD_LOAD:
        warn = (f"WARNING: load average {load0:.2f} > {LOUD_LOAD} at start: the machine is busy and these figures "
                "do not count; rerun on a quiet machine")
        report["notes"].append(warn)
        log("!" * 100 + "\n" + warn + "\n" + "!" * 100)
    model_dir = Path(args.model) if args.model else fixture_model(q4=False)
    report["model"] = str(model_dir)
    sides, skipped = resolve_sides(args)
    report["skipped"] = skipped
    for name, why in skipped.items():
        log(f"{name}: skipped ({why})")
    maker = PromptMaker(model_dir)
    eos_ids = maker.eos_ids(model_dir)
    plan = plan_prompts(args, maker)
    lengths = {k: [maker.length(p) for p in v] for k, v in plan["runs"].items()}
    report["prompt_tokens"] = {k: {"min": min(v), "max": max(v), "mean": sum(v) / len(v)} for k, v in lengths.items()}
    report["eos_ids"] = eos_ids
    serve_needed = not args.skip_throughput or args.short
    for name, side in sides.items():
        entry = report["sides"][name] = {"commit": side["commit"], "kind": side["kind"],
                                         **({"note": side["note"]} if "note" in side else {})}
        if not serve_needed or (args.skip_throughput and side["kind"] != "mlx-ray"):
            continue
        la = os.getloadavg()
        log(f"== {name} ({side['commit']}): load avg before {la[0]:.2f}")
        spec = side_spec(args, name, side, model_dir, plan, eos_ids)
        r = run_worker("--serve-worker", spec, env_with_fast_blas(), name)
        entry.update(r, load_avg_before=la, load_avg_after=os.getloadavg())
        log(f"== {name}: load avg after {entry['load_avg_after'][0]:.2f}")
    if args.admission:
        report["admission"] = {}
        for name, side in sides.items():
            if side["kind"] != "mlx-ray":
                continue
            spec = {"model": str(model_dir), "prompts": plan["admission"], "kv_budget_bytes": args.kv_budget_mib * MIB,
                    "max_num_seqs": args.admission_max_num_seqs, "max_tokens": args.max_tokens,
                    "prefix_cache_bytes": 0, "max_s": args.admission_max_s,
                    "kv_bits": args.kv_bits if name == "new-kv8" else None}
            la = os.getloadavg()
            log(f"== admission {name}: load avg before {la[0]:.2f}")
            r = run_worker("--admission-worker", spec, env_with_pythonpath(side["pythonpath"]), f"admission {name}",
                           cwd=side["pythonpath"])
            if side["pythonpath"] and not r["mlx_ray"].startswith(side["pythonpath"]):
                raise RuntimeError(f"admission {name} imported {r['mlx_ray']}, not {side['pythonpath']}'s mlx_ray")
            r.update(load_avg_before=la, load_avg_after=os.getloadavg())
            report["admission"][name] = r
            log(f"   peak running {r.get('peak_running', '-')} ({r.get('stopped_by') or r.get('skipped')})")
            if name != "base":  # the same engine with strict FIFO admission (no backfilling), beside it
                r = run_worker("--admission-worker", dict(spec, admission="fifo"), env_with_pythonpath(None),
                               f"admission {name} fifo")
                if "skipped" not in r:
                    r.update(load_avg_before=la, load_avg_after=os.getloadavg())
                    report["admission"][f"{name}-fifo"] = r
                    log(f"   fifo: peak running {r.get('peak_running', '-')} ({r.get('stopped_by')})")
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    derive(report)
    return report


def derive(report: dict) -> None:
    """Ratios against base and mlx_lm, and KV bytes copied per admission / finish."""
    sides = report["sides"]
    ratios = []
    keys = sorted({k for s in sides.values() for k in s.get("runs", {})}, key=level_mode_order)
    for k in keys:
        base = sides.get("base", {}).get("runs", {}).get(k)
        mlx = sides.get("mlx_lm", {}).get("runs", {}).get(k)
        for name in ("new", "new-kv8"):
            r = sides.get(name, {}).get("runs", {}).get(k)
            if r is None or (base is None and mlx is None):
                continue
            ratios.append({"run": k, "side": name,
                           "x_base": r["output_tok_s"] / base["output_tok_s"] if base and base["output_tok_s"] else None,
                           "x_mlx_lm": r["output_tok_s"] / mlx["output_tok_s"] if mlx and mlx["output_tok_s"] else None})
    report["ratios"] = ratios
    for s in sides.values():
        for section in ("runs", "short"):
            for r in s.get(section, {}).values():
                d, n = r.get("engine_stats_delta") or {}, r.get("requests") or 0
                for key, name in (("kv_admit_copy_bytes_total", "kv_copy_bytes_per_admission"),
                                  ("kv_finish_copy_bytes_total", "kv_copy_bytes_per_finish"),
                                  ("kv_copy_bytes_total", "kv_cow_copy_bytes_per_request")):
                    if key in d and n:
                        r[name] = d[key] / n
    adm = report.get("admission") or {}
    base_peak = (adm.get("base") or {}).get("peak_running")
    for name, a in adm.items():
        if a.get("peak_running") is not None and base_peak:
            a["x_base"] = a["peak_running"] / base_peak
    short = {}
    for k in sorted({k for s in sides.values() for k in s.get("short", {})}, key=int):
        b = sides.get("base", {}).get("short", {}).get(k)
        for name in ("new", "new-kv8"):
            r = sides.get(name, {}).get("short", {}).get(k)
            if r and b and b["output_tok_s"]:
                short.setdefault(k, {})[name] = r["output_tok_s"] / b["output_tok_s"]
    report["short_x_base"] = short


def level_mode_order(k: str):
    c, _, m = k.partition(":")
    return int(c), list(SAMPLING).index(m) if m in SAMPLING else 99


def mib(x) -> float | None:
    return None if x is None else x / MIB


def text_report(report: dict) -> str:
    from mlx_ray.bench.table import markdown_table

    m = report["machine"]
    out = [f"machine: {m['cpu_model']}, {m['cpus']} cores, {m['ram_gb']} GiB RAM, {m['platform']}, BLAS {report['blas']}",
           f"load avg at start {m['load_avg'][0]:.2f}, at end {m['load_avg_at_end'][0]:.2f}; model {report['model']}"]
    out += [f"!!! {n}" for n in report["notes"]]
    out.append("sides:")
    for name, s in report["sides"].items():
        la = (f"; load avg before {s['load_avg_before'][0]:.2f}, after {s['load_avg_after'][0]:.2f}"
              if "load_avg_before" in s else "")
        busy = " (BUSY MACHINE)" if "load_avg_before" in s and s["load_avg_before"][0] > LOUD_LOAD else ""
        pp = s.get("serving_process", {}).get("PYTHONPATH")
        out.append(f"  {name}: {s['commit']}{la}{busy}" + (f"; replica PYTHONPATH {pp}" if pp else "")
                   + (f"; {s['note']}" if s.get("note") else ""))
    for name, why in report["skipped"].items():
        out.append(f"  {name}: skipped: {why}")
    cfg = report["config"]
    runs = {name: s["runs"] for name, s in report["sides"].items() if s.get("runs")}
    if runs:
        pt = report["prompt_tokens"]
        out.append(f"\nworkload L: distinct prompts of {cfg['prompt_min']}-{cfg['prompt_max']} tokens (chat-templated), "
                   f"{cfg['max_tokens']} output tokens each (mlx-ray: ignore_eos; mlx_lm: logit_bias -100 on EOS "
                   f"{report['eos_ids']}), one wave per level; top_p = temperature 0.7, top_p 0.9, seeded per request")
        rows = []
        for k in sorted({k for r in runs.values() for k in r}, key=level_mode_order):
            c, _, mode = k.partition(":")
            for name, r in runs.items():
                if k not in r:
                    continue
                x = r[k]
                rows.append([c, mode, name, x["output_tok_s"], x["ttft_s"]["p50"], x["ttft_s"]["p99"], x["itl_s"]["p50"],
                             mib(x["peak_rss_bytes"]), x["output_tokens"] / x["completed"] if x["completed"] else None,
                             round(pt[k]["mean"]), (x["prompt_tokens"] or 0) / x["completed"] if x["completed"] else None,
                             x["errors"], x["load_avg_before"][0]])
        out.append(markdown_table(["conc.", "mode", "side", "out tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 s",
                                   "peak RSS MiB", "out tok/req", "prompt tok (planned)", "prompt tok (served)", "errors",
                                   "load before"], rows))
        if report["ratios"]:
            rows = [[r["run"], r["side"], r["x_base"], ok(r["x_base"], TARGETS["x_base"]), r["x_mlx_lm"],
                     ok(r["x_mlx_lm"], TARGETS["x_mlx_lm"])] for r in report["ratios"]]
            out.append("\nratios (aggregate out tok/s):\n" + markdown_table(
                ["conc.:mode", "side", "x base", f">= {TARGETS['x_base']}x", "x mlx_lm", f">= {TARGETS['x_mlx_lm']}x"],
                rows))
        rows = []
        for name, r in runs.items():
            for k, x in sorted(r.items(), key=lambda kv: level_mode_order(kv[0])):
                st = x.get("engine_stats")
                if st is None:
                    continue
                rows.append([k, name, *[st.get(key) for key in KV_KEYS[:7]], x.get("kv_copy_bytes_per_admission"),
                             x.get("kv_copy_bytes_per_finish"), x.get("kv_cow_copy_bytes_per_request"),
                             mib(st.get("kv_bytes_used")), mib(st.get("kv_budget_bytes"))])
        if rows:
            out.append("\nengine stats after each run (KV bytes copied: the run's counter deltas over its requests; "
                       "'-': the engine does not report it):\n" + markdown_table(
                           ["conc.:mode", "side", "kv_cache", "kv_bits", "block", "blocks total", "used", "free",
                            "cached", "copied B / admission", "copied B / finish", "CoW B / request", "kv used MiB",
                            "kv budget MiB"], rows))
    adm = report.get("admission")
    if adm:
        rows = []
        for name, a in adm.items():
            if "skipped" in a:
                rows.append([name, "-", "-", "-", "-", "-", "-", "-", "skipped: " + a["skipped"]])
                continue
            target = TARGETS["admission_kv8_x_base"] if name.startswith("new-kv8") else TARGETS["admission_x_base"]
            sp = a["stats_at_peak"]
            policy = a["engine_config"].get("admission") or ("fifo" if name == "base" else "backfill")
            rows.append([name, a["engine_config"].get("kv_bits") or "-", policy, a["peak_running"], sp.get("waiting"),
                         mib(sp.get("kv_bytes_used")), a.get("x_base"),
                         "-" if name == "base" else ok(a.get("x_base"), target),
                         f"{a['stopped_by']} at {a['stop_s']:.1f} s"])
        a0 = next(iter(adm.values()))
        pts = a0.get("prompt_tokens") or [0]
        out.append(f"\nadmission: {a0.get('submitted', '-')} workload-L requests at once "
                   f"({min(pts)}-{max(pts)} prompt tokens, {cfg['max_tokens']} max_tokens, ignore_eos) into the engine "
                   f"in process, kv_budget {cfg['kv_budget_mib']} MiB, max_num_seqs {cfg['admission_max_num_seqs']}, "
                   "no prefix cache; peak of stats()['running'] before the first finish "
                   "(the new sides with backfilling, their default, and with strict FIFO):\n"
                   + markdown_table(["side", "kv_bits", "admission", "peak running", "waiting at peak", "kv used MiB at peak",
                                     "x base", "target (2x; kv8 3.5x)", "stopped"], rows))
    shorts = {name: s["short"] for name, s in report["sides"].items() if s.get("short")}
    if shorts:
        rows = []
        for k in sorted({k for r in shorts.values() for k in r}, key=int):
            for name, r in shorts.items():
                if k in r:
                    x = r[k]
                    rows.append([k, name, x["output_tok_s"], x["ttft_s"]["p50"], x["ttft_s"]["p99"], x["itl_s"]["p50"],
                                 mib(x["peak_rss_bytes"]), x["errors"], report["short_x_base"].get(k, {}).get(name)])
        out.append(f"\nshort prompts (engine_vs_mlxlm.py's 16), {cfg['short_max_tokens']} tokens, greedy, ignore_eos, "
                   "max(4, 2 x conc.) requests, same servers after workload L:\n" + markdown_table(
                       ["conc.", "side", "out tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 s", "peak RSS MiB", "errors",
                        "x base"], rows))
    return "\n".join(out)


def ok(x, target) -> str:
    return "-" if x is None else ("yes" if x >= target else "NO")


def plot(report: dict, path: str) -> str | None:
    """tok/s by side and level[:mode] (and the short levels, and admission); None, or why not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    panels = []
    runs = {n: s["runs"] for n, s in report["sides"].items() if s.get("runs")}
    if runs:
        panels.append(("workload L: output tok/s", runs, level_mode_order))
    shorts = {n: s["short"] for n, s in report["sides"].items() if s.get("short")}
    if shorts:
        panels.append(("short prompts: output tok/s", shorts, int))
    adm = {n: a for n, a in (report.get("admission") or {}).items() if "peak_running" in a}
    if not panels and not adm:
        return "nothing to plot"
    fig, axes = plt.subplots(1, len(panels) + bool(adm), figsize=(6.5 * (len(panels) + bool(adm)), 4.2), squeeze=False)
    for ax, (title, data, order) in zip(axes[0], panels):
        xlabel = "concurrency:mode" if order is level_mode_order else "concurrency"
        keys = sorted({k for r in data.values() for k in r}, key=order)
        width = 0.8 / len(data)
        for i, (name, r) in enumerate(data.items()):
            ax.bar([j + i * width for j in range(len(keys))], [r[k]["output_tok_s"] if k in r else 0 for k in keys],
                   width, label=name)
        ax.set_xticks([j + width * (len(data) - 1) / 2 for j in range(len(keys))], keys)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tok/s")
        ax.set_title(title)
        ax.legend()
    if adm:
        ax = axes[0][-1]
        ax.bar(list(adm), [a["peak_running"] for a in adm.values()])
        ax.set_title(f"admission at {report['config']['kv_budget_mib']} MiB KV: peak running")
    fig.suptitle(f"{report['machine']['cpu_model']} ({report['machine']['cpus']} cores), "
                 f"load {report['machine']['load_avg'][0]:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def names(s: str, allowed) -> list[str]:
    xs = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in xs if x not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
    return xs


def main(argv=None) -> int:
    if len(sys.argv) == 4 and sys.argv[1] in ("--serve-worker", "--admission-worker") and argv is None:
        spec = json.loads(Path(sys.argv[2]).read_text())
        out = serve_worker(spec) if sys.argv[1] == "--serve-worker" else asyncio.run(admission_async(spec))
        Path(sys.argv[3]).write_text(json.dumps(out, default=str))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="MLX model directory (default: the SmolLM2-135M fixture converted to float32)")
    p.add_argument("--sides", type=lambda s: names(s, SIDES), default=list(SIDES), help="comma list of " + ",".join(SIDES))
    p.add_argument("--base-ref", default="87c4112", help="git ref of the base side")
    p.add_argument("--worktree", help="the base side's git worktree (default /tmp/mlx-ray-base-<sha>)")
    p.add_argument("--levels", type=ints, default=[16, 32], help="concurrency levels")
    p.add_argument("--modes", type=lambda s: names(s, SAMPLING), default=list(SAMPLING), help="greedy,top_p")
    p.add_argument("--prompt-min", type=int, default=200, help="prompt tokens, low end (chat-templated)")
    p.add_argument("--prompt-max", type=int, default=2000, help="prompt tokens, high end")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--requests-per-level", type=int, help="requests per level and mode (default: the level: one wave)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    p.add_argument("--kv-bits", type=int, default=8, help="KV bits of the new-kv8 side")
    p.add_argument("--request-timeout", type=float, default=1800.0, help="seconds per request")
    p.add_argument("--skip-throughput", action="store_true", help="no workload-L runs through the servers")
    p.add_argument("--admission", action="store_true", help="also: peak concurrent requests at a fixed KV budget")
    p.add_argument("--kv-budget-mib", type=int, default=256, help="with --admission: the engine's KV budget")
    p.add_argument("--serve-kv-budget-mib", type=int, default=4096,
                   help="the served mlx-ray sides' KV budget (the same for each; default 4096)")
    p.add_argument("--admission-requests", type=int, default=64, help="with --admission: requests handed over at once")
    p.add_argument("--admission-max-num-seqs", type=int, default=64)
    p.add_argument("--admission-max-s", type=float, default=900.0, help="with --admission: stop polling after this")
    p.add_argument("--short", action="store_true", help="also: the short prompts of engine_vs_mlxlm.py, base vs new")
    p.add_argument("--short-levels", type=ints, default=[1, 4, 16, 32])
    p.add_argument("--short-max-tokens", type=int, default=64)
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--plot", help="write a PNG of tok/s by side and level here (matplotlib)")
    args = p.parse_args(argv)
    if args.prompt_min > args.prompt_max:
        p.error("--prompt-min is above --prompt-max")
    from mlx_ray.blas import reexec_with_fast_blas

    reexec_with_fast_blas()
    report = run(args)
    print(text_report(report), flush=True)
    if args.plot:
        why = plot(report, args.plot)
        print(f"plot: {why}" if why else f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
