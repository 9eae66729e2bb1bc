"""Paired A/B: the engine in process against `mlx-ray serve` variants that differ by environment or serve config.

    python bench/serve_ab.py [--repeats 5] [--levels 16,32] [--sampling greedy,top_p]
        [--variant NAME=K=V,K=V ...] [--ghost | --sequential] [--json out.json]

Every side is a worker process of ``bench/engine_vs_mlxlm.py`` with its own
session: the same load generator, the same prompts, warm-up and limits (the
engine with its load generator in one process; ``mlx-ray serve`` with its
embedded Ray and the load generator in the worker, its own process).

By default the sides are started and warmed once, and then measured in
**paired segments**: one level and mode on every side in turn, back to back
(tens of seconds each), the order of the sides and of the levels rotated every
round. Only the side measuring runs: every other side's whole process tree
(the engine, or ``mlx-ray serve`` with Ray's daemons, its replica and its
client) is stopped (SIGSTOP) meanwhile and resumed (SIGCONT) for its own
segment, so no side pays another's idle floor, and the two halves of a pair
see the machine within a minute of each other: on this project's 2-vCPU VMs
the machine's speed drifts within minutes, so only these paired ratios, over
several rounds, mean anything. ``--sequential`` instead starts each side anew
per repeat and runs its whole sweep (minutes apart: the older figures).

A variant's ``K=V`` pairs are fields of its serve config where ``K`` is one
(``ServeConfig``, values as JSON: ``--variant nobudget=stream_messages_per_s=0``),
and otherwise variables set in the environment of ``mlx-ray serve``, so its
embedded Ray and the model's replica inherit them (e.g. ``--variant
samethread=RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``). Without
``--variant``: one variant, ``serve``, as configured by default. It prints
tok/s per side and segment and each variant's ratio to the engine of the same
round. Each side's line also gives the CPU time the hypervisor stole from the
VM while it ran (``Steal``): a pair whose sides saw different steal is noise.

``--ghost`` adds a pseudo-side, ``engine+ghost``: the same engine in process,
measured while a null engine's whole Serve path (``GhostLoad``) streams the same
concurrency beside it at about the served engine's token rate. Its ratio to the
engine is what the Serve path's CPU alone costs the engine on this machine;
``serve`` below it is that plus running inside the replica's process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_vs_mlxlm as evm  # noqa: E402

from mlx_ray.bench.sides import fixture_model  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    """NAME=K=V,K=V -> (NAME, {"env": {...}, "config": {...}}): ServeConfig fields to the config, the rest to env."""
    from mlx_ray.serve.config import ServeConfig

    name, _, rest = text.partition("=")
    pairs = [kv.split("=", 1) for kv in rest.split(",") if kv]
    if not name or any(len(kv) != 2 or not kv[0] for kv in pairs):
        raise SystemExit(f"--variant {text!r}: write NAME=K=V,K=V (or NAME= for no variables)")
    out: dict = {"env": {}, "config": {}}
    for k, v in pairs:
        if k in ServeConfig.model_fields:
            try:
                out["config"][k] = json.loads(v)
            except ValueError:
                raise SystemExit(f"--variant {text!r}: {k} is a serve config field; give its value as JSON") from None
        else:
            out["env"][k] = v
    return name, out


class Steal:
    """Share of this VM's CPU time the hypervisor gave to others over a span (/proc/stat's steal column).

    On the project's 2-vCPU VMs it comes in bursts (7.5% over one 10 s window, 1.3% over hours), it slows
    whichever side runs then, and no side can see it in its own figures: each side's line reports it, so
    a pair whose sides saw different steal can be told from a real difference."""

    def __init__(self):
        self.t0 = self._read()

    @staticmethod
    def _read() -> list[int] | None:
        try:
            with open("/proc/stat") as f:
                return [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):  # not Linux
            return None

    def percent(self) -> float | None:
        t1 = self._read()
        if self.t0 is None or t1 is None:
            return None
        d = [b - a for a, b in zip(self.t0, t1)]
        return 100.0 * d[7] / max(1, sum(d))


class FrozenSide:
    """One side's worker for the whole run (``engine_vs_mlxlm.py --side ... --segments-fd``), its process tree
    stopped except while it measures a segment."""

    def __init__(self, name: str, args, model_dir: Path, env: dict, config: dict):
        kind = "engine" if name == "engine" else "serve"
        self._start(name, evm.side_command(args, kind, model_dir, 0, config) + ["--segments-fd"], env)

    def _start(self, name: str, cmd: list[str], env: dict) -> None:
        """Start ``cmd`` + the write end of a pipe; wait for its first line (set up and warm), then stop it."""
        r, w = os.pipe()
        cmd = cmd + [str(w)]
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, text=True, pass_fds=(w,), start_new_session=True,
                                     env={**evm.env_with_fast_blas(), **env})
        os.close(w)
        self.results = os.fdopen(r)
        if not self.results.readline():  # its process ids, once set up and warm
            raise RuntimeError(f"the {name} side failed to start (exit {self.proc.wait()}); its log is above")
        self._signal("suspend")

    def _signal(self, how: str) -> None:
        """Stop or resume the worker and every process under it (Ray's daemons and workers for a serve side),
        parents first on the way down so that none starts a child meanwhile."""
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in tree if how == "suspend" else reversed(tree):
            try:
                getattr(p, how)()
            except psutil.NoSuchProcess:
                pass

    def measure(self, c: int, mode: str) -> dict:
        self._signal("resume")
        try:
            self.proc.stdin.write(f"{c} {mode}\n")
            self.proc.stdin.flush()
            line = self.results.readline()
        finally:
            self._signal("suspend")
        if not line:
            raise RuntimeError(f"the {self.name} side died measuring {c} {mode} (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self._signal("resume")
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass


class GhostLoad(FrozenSide):
    """``--ghost``: the Serve path of a null engine (``bench/serve_overhead.py``'s ghost worker: embedded Ray,
    proxy, replica and its client, no model compute), streaming at the segment's concurrency while the engine in
    process measures. Its null step grows with its rows like the fixture's real one (about the token rate the
    served engine reaches: 0.1 s at 16 rows, 0.16 s at 32), so the engine shares the machine with all the CPU
    and wake-ups the Serve path takes, but not with its process: ``engine+ghost`` against ``serve`` tells what
    the path's CPU costs from what running inside the replica costs."""

    def __init__(self):
        here = Path(__file__).resolve().parent
        self._start("ghost", [sys.executable, str(here / "serve_overhead.py"), "--step-s", "0.04",
                              "--step-per-row-s", "0.00375", "--ghost-fd"], {})

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.results.readline()
        if not out:
            raise RuntimeError(f"the ghost load died (exit {self.proc.wait()})")
        return out

    def run_beside(self, measure, c: int) -> tuple[dict, dict]:
        """Resume the ghost, bring its load to ``c`` streams in steady state, run ``measure()``; stop it again.
        Returns measure's result and the ghost's (its tok/s)."""
        self._signal("resume")
        try:
            self._ask(str(c))
            out = measure()
            ghost = json.loads(self._ask("stop"))
        finally:
            self._signal("suspend")
        return out, ghost


def rotate(xs: list, k: int) -> list:
    k %= max(1, len(xs))
    return xs[k:] + xs[:k]


GHOSTED = "engine+ghost"  # --ghost's pseudo-side: the engine in process, measured beside GhostLoad


def run_segments(a, args, variants: dict, model_dir: Path) -> tuple[dict, dict]:
    """Paired segments (module docstring): per round, every level and mode on every side back to back."""
    combos = [(int(c), m) for c in a.levels.split(",") for m in evm.modes(args)]
    sides: dict[str, FrozenSide] = {}
    ghost = None
    try:
        for name in ["engine", *variants]:
            v = variants.get(name) or {}
            sides[name] = FrozenSide(name, args, model_dir, v.get("env") or {}, v.get("config") or {})
        ghost = GhostLoad() if a.ghost else None
        names = [*sides, *([GHOSTED] if ghost else [])]
        runs: dict[str, list[dict]] = {k: [] for k in names}
        steal: dict[str, list[dict]] = {k: [] for k in names}
        for rnd in range(a.repeats):
            for k in names:
                runs[k].append({})
                steal[k].append({})
            for i, (c, mode) in enumerate(rotate(combos, rnd)):
                key = evm.level_key(c, mode)
                parts = []
                for name in rotate(names, rnd + i):
                    st = Steal()
                    if name == GHOSTED:
                        r, g = ghost.run_beside(lambda: sides["engine"].measure(c, mode), c)
                        runs.setdefault("ghost", [{} for _ in range(a.repeats)])[rnd][key] = g["tok_s"]
                    else:
                        r = sides[name].measure(c, mode)
                    runs[name][-1][key] = r["output_tok_s"]
                    steal[name][-1][key] = st.percent()
                    stolen = "" if steal[name][-1][key] is None else f" (steal {steal[name][-1][key]:.1f}%)"
                    beside = f" [ghost {g['tok_s']:.0f}]" if name == GHOSTED else ""
                    parts.append(f"{name} {runs[name][-1][key]:.1f}{beside}{stolen}")
                print(f"[{rnd + 1}/{a.repeats}] {key}: " + ", ".join(parts) + " tok/s", file=sys.stderr, flush=True)
        return runs, steal
    finally:
        for side in [*sides.values(), *([ghost] if ghost else [])]:
            side.close()


def run_sequential(a, args, variants: dict, model_dir: Path) -> tuple[dict, dict]:
    """Each side started anew per repeat and its whole sweep run, side after side."""
    runs: dict[str, list[dict]] = {k: [] for k in ["engine", *variants]}
    steal: dict[str, list] = {k: [] for k in runs}
    for rep in range(a.repeats):
        order = ["engine", *variants] if rep % 2 == 0 else [*reversed(list(variants)), "engine"]
        for side in order:
            v = variants.get(side) or {}
            st = Steal()
            r = evm.spawn_side(args, "engine" if side == "engine" else "serve", model_dir, rep, v.get("env"),
                               v.get("config"))
            runs[side].append({k: v["output_tok_s"] for k, v in r.items() if isinstance(v, dict)
                               and "output_tok_s" in v})
            steal[side].append(st.percent())
            stolen = "" if steal[side][-1] is None else f", CPU steal {steal[side][-1]:.1f}%"
            print(f"[{rep + 1}/{a.repeats}] {side}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[side][-1].items())
                  + f" tok/s (load avg {os.getloadavg()[0]:.1f}{stolen})", file=sys.stderr, flush=True)
    return runs, steal


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="rounds of paired segments (or, --sequential, repeats)")
    p.add_argument("--levels", default="16,32")
    p.add_argument("--sampling", default="greedy,top_p")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-slot", type=int, default=4, help="requests per segment = this x concurrency")
    p.add_argument("--variant", action="append", default=[], help="NAME=K=V,K=V: a serve side with these env vars")
    p.add_argument("--ghost", action="store_true",
                   help="also measure the engine in process beside a null engine's Serve path under the same load")
    p.add_argument("--sequential", action="store_true", help="each side's whole sweep per repeat, side after side")
    p.add_argument("--kv-budget-mib", type=int, default=2048,
                   help="each side's engine KV budget (default 2048: every side is alive at once in paired segments, "
                        "and the engine's default, half the free memory, fits once; the load needs ~0.5 GiB)")
    p.add_argument("--json", help="write the per-repeat figures here")
    a = p.parse_args(argv)
    if a.ghost and a.sequential:
        p.error("--ghost measures in paired segments; drop --sequential")
    evm.reexec_with_fast_blas()
    variants = dict(parse_variant(v) for v in a.variant) or {"serve": {"env": {}, "config": {}}}
    args = evm.parse_args(["--levels", a.levels, "--serve", "--skip-server", "--skip-single", "--sampling",
                           a.sampling, "--ignore-eos", "--max-tokens", str(a.max_tokens),
                           "--requests-per-slot", str(a.requests_per_slot), "--kv-budget-mib", str(a.kv_budget_mib)])
    model_dir = fixture_model(False)
    runs, steal = (run_sequential if a.sequential else run_segments)(a, args, variants, model_dir)
    report = {"method": "sequential" if a.sequential else "paired segments", "variants": variants, "runs": runs,
              "steal_percent": steal, "x_engine": {}}
    print("| variant | level:mode | × engine, median | per round |\n|---|---|---|---|")
    for side in [*variants, *([GHOSTED] if GHOSTED in runs else [])]:
        report["x_engine"][side] = {}
        for k in runs["engine"][0]:
            xs = [s[k] / e[k] for s, e in zip(runs[side], runs["engine"])]
            report["x_engine"][side][k] = {"median": statistics.median(xs), "runs": xs}
            print(f"| {side} | {k} | {statistics.median(xs):.3f} | {', '.join(f'{x:.3f}' for x in xs)} |")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
