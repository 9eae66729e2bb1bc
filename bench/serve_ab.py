"""Interleaved A/B: the engine in process against `mlx-ray serve` variants that differ by environment or serve config.

    python bench/serve_ab.py [--repeats 3] [--levels 16,32] [--sampling greedy,top_p]
        [--variant NAME=K=V,K=V ...] [--json out.json]

Each repeat runs the engine side, then every variant of the serve side (in
reverse order on odd repeats, so no side always runs first), each in its own
session process through ``bench/engine_vs_mlxlm.py``'s workers: the same load
generator, the same prompts, warm-up and limits. A variant's ``K=V`` pairs
are fields of its serve config where ``K`` is one (``ServeConfig``, values as
JSON: ``--variant nobudget=stream_messages_per_s=0``), and otherwise variables
set in the environment of ``mlx-ray serve``, so its embedded Ray and the model's
replica inherit them (e.g. ``--variant samethread=RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``).
Without ``--variant``: one variant, ``serve``, as configured by default.
It prints tok/s per side and repeat and each variant's ratio to the engine of
the same repeat; on this project's 2-vCPU VMs the machine's speed drifts
within minutes, so only these paired ratios, over several repeats, mean anything.
Each side's line also gives the CPU time the hypervisor stole from the VM
while it ran (``Steal``): a pair whose sides saw different steal is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--levels", default="16,32")
    p.add_argument("--sampling", default="greedy,top_p")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--variant", action="append", default=[], help="NAME=K=V,K=V: a serve side with these env vars")
    p.add_argument("--json", help="write the per-repeat figures here")
    a = p.parse_args(argv)
    evm.reexec_with_fast_blas()
    variants = dict(parse_variant(v) for v in a.variant) or {"serve": {"env": {}, "config": {}}}
    args = evm.parse_args(["--levels", a.levels, "--serve", "--skip-server", "--skip-single", "--sampling",
                           a.sampling, "--ignore-eos", "--max-tokens", str(a.max_tokens)])
    model_dir = fixture_model(False)
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
    report = {"variants": variants, "runs": runs, "steal_percent": steal, "x_engine": {}}
    print("| variant | level:mode | × engine, median | per repeat |\n|---|---|---|---|")
    for side in variants:
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
