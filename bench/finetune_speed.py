"""Benchmark: LoRA training speed through ``mlx-ray finetune`` (a Ray Train job) against ``mlx_lm.lora``.

    python -m bench.finetune_speed [--model NAME] [--iters 30] [--steps-per-report 5] [--repeats 2]
                                   [--quick] [--json out.json]

Both sides train the same LoRA (rank, scale, layers, batch, learning rate, iterations, seed, checkpoint
interval) of the same model (default: the fixture SmolLM2-135M converted to float32 by mlx-ray) on the same
chat JSONL (``--rows`` lines, written here), each in its own process, one after the other, alternating which
goes first per repeat:

* **ray**: ``mlx-ray finetune`` (its CLI, ``--json``): an embedded Ray declaring ``gpu_apple_mps``, a Ray
  Train job on a worker holding it, the adapter published to the cache (removed afterwards);
* **mlx_lm**: ``python -m mlx_lm lora --train`` with the same settings (``-c`` for the LoRA parameters).

Tokens/s is what each side's trainer reports (mlx-lm's ``tokens_per_second``: tokens over the time spent in
training steps since the previous report); the first report of each run (the compile, the first val) is
left out and the rest averaged, weighted by their steps. **Wall tokens/s** adds what the steps' figure
leaves out (reports, checkpoints, data): trained tokens between the first and the last report over the
wall time between them. Target (issue 32): ray >= 0.95x mlx_lm.
``--quick``: 15 iterations, one repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_ray.bench.sides import fixture_model
from mlx_ray.bench.table import markdown_table
from mlx_ray.blas import env_with_fast_blas, loaded_blas

NAME = "bench-finetune-speed"
TOPICS = ("the Mac", "the NAS", "the router", "the printer", "the Raspberry Pi", "the backup disk", "the switch",
          "the GPU box")
ANSWERS = ("waterdeep", "neverwinter", "baldur", "candlekeep", "luskan", "mirabar", "silverymoon", "daggerford")
# mlx-lm's report line: "  <iter>    <loss> <arrow>    <tok/s>    <trained>k"
MLX_LM_LINE = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+\S\s+([\d,]+)\s+([\d.]+)k\s*$")


def write_data(d: Path, rows: int) -> None:
    """Chat lines (train + valid) answering which name each homelab machine has, with a longer answer."""
    def line(i: int) -> str:
        t, a = TOPICS[i % len(TOPICS)], ANSWERS[i % len(ANSWERS)]
        return json.dumps({"messages": [
            {"role": "system", "content": "You answer questions about the homelab."},
            {"role": "user", "content": f"What is the name of {t} in the homelab, and what does it do? ({i})"},
            {"role": "assistant", "content": f"{t[0].upper() + t[1:]} in the homelab is called {a}. It runs "
                                             f"the services its owner gave it, and it is backed up every night."}]})
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(line(i) + "\n" for i in range(rows)))
    (d / "valid.jsonl").write_text("".join(line(i) + "\n" for i in range(rows, rows + 8)))


def steady(reports: list[dict]) -> dict:
    """Step-weighted mean of the reported tok/s without the first report; wall tok/s between first and last."""
    rest = reports[1:]
    if not rest:
        raise RuntimeError("fewer than two reports: raise --iters or lower --steps-per-report")
    steps = [r["iteration"] - p["iteration"] for p, r in zip(reports, rest)]
    tok_s = sum(s * r["tok_s"] for s, r in zip(steps, rest)) / sum(steps)
    wall = (rest[-1]["trained"] - reports[0]["trained"]) / (rest[-1]["time"] - reports[0]["time"])
    return {"tok_s": tok_s, "wall_tok_s": wall, "reports": reports}



def run_ray(args, model_name: str, cache: Path, data: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "mlx_ray.cli", "finetune", "--model", model_name, "--cache-dir", str(cache),
           "--data", str(data / "train.jsonl"), "--valid", str(data / "valid.jsonl"), "--name", NAME, "--force",
           "--storage-path", str(data / "ray-runs"), *common_flags(args), "--json"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode:
        raise RuntimeError(f"mlx-ray finetune exited {out.returncode}: {out.stderr[-3000:]}")
    history = json.loads(out.stdout)["history"]
    reports = [{"iteration": m["iteration"], "tok_s": m["tokens_per_second"], "trained": m["trained_tokens"],
                "time": m["reported_at"], "loss": m["train_loss"]} for m in history]
    return {**steady(reports), "process_s": time.perf_counter() - t0}


def run_mlx_lm(args, model_dir: Path, data: Path, env: dict) -> dict:
    cfg = data / "lora.yaml"
    cfg.write_text(json.dumps({"lora_parameters": {"rank": args.rank, "scale": args.scale, "dropout": 0.0}}))
    adapters = data / "mlx-lm-adapters"
    shutil.rmtree(adapters, ignore_errors=True)
    cmd = [sys.executable, "-u", "-m", "mlx_lm", "lora", "--train", "--model", str(model_dir), "--data", str(data),
           "--adapter-path", str(adapters), "-c", str(cfg), *common_flags(args)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    reports, lines = [], []
    for raw in proc.stdout:
        now = time.time()
        lines.append(raw)
        m = MLX_LM_LINE.match(re.sub(r"\x1b\[[0-9;]*m", "", raw))
        if m:
            reports.append({"iteration": int(m[1]), "loss": float(m[2]), "tok_s": float(m[3].replace(",", "")),
                            "trained": float(m[4]) * 1000, "time": now})
    if proc.wait(timeout=args.timeout):
        raise RuntimeError(f"mlx_lm lora exited {proc.returncode}: {''.join(lines)[-3000:]}")
    return {**steady(reports), "process_s": time.perf_counter() - t0}


def common_flags(args) -> list[str]:
    flags = {"--fine-tune-type": "lora", "--num-layers": args.num_layers, "--batch-size": args.batch_size,
             "--iters": args.iters, "--learning-rate": args.learning_rate, "--steps-per-report": args.steps_per_report,
             "--steps-per-eval": args.iters, "--val-batches": 1, "--save-every": args.save_every,
             "--max-seq-length": 2048, "--seed": 0}
    return [str(x) for kv in flags.items() for x in kv]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model on --cache-dir (default: the fixture, float32, in the bench cache)")
    ap.add_argument("--cache-dir", help="the model cache holding --model")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--scale", type=float, default=20.0)
    ap.add_argument("--num-layers", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--steps-per-report", type=int, default=5)
    ap.add_argument("--save-every", type=int, default=15, help="checkpoint (ray) / adapter save (mlx_lm) interval")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--quick", action="store_true", help="15 iterations, one repeat")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters, args.repeats = 15, 1

    from mlx_ray.adapters import adapter_dir
    from mlx_ray.conversion.cache import resolve_model

    if args.model:
        cache = Path(args.cache_dir or os.environ.get("MLX_RAY_CACHE") or Path.home() / ".cache/mlx-ray/models")
        model_dir = resolve_model(args.model, cache)
    else:
        model_dir = fixture_model(False)
        cache = model_dir.parent.parent
    model_name = str(model_dir.relative_to(cache))
    env = env_with_fast_blas()
    env.pop("MLX_RAY_BLAS_REEXEC", None)
    runs: dict[str, list] = {"ray": [], "mlx_lm": []}
    with tempfile.TemporaryDirectory(prefix="mlx-ray-ftspeed-") as tmp:
        data = Path(tmp)
        write_data(data, args.rows)
        try:
            for r in range(args.repeats):
                for side in (("ray", "mlx_lm") if r % 2 == 0 else ("mlx_lm", "ray")):
                    got = (run_ray(args, model_name, cache, data, env) if side == "ray"
                           else run_mlx_lm(args, model_dir, data, env))
                    runs[side].append(got)
                    print(f"[{side}] run {r + 1}: {got['tok_s']:.0f} tok/s (wall {got['wall_tok_s']:.0f}), "
                          f"process {got['process_s']:.1f} s", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(adapter_dir(model_dir, NAME), ignore_errors=True)
    med = {side: {k: statistics.median(x[k] for x in v) for k in ("tok_s", "wall_tok_s", "process_s")}
           for side, v in runs.items()}
    ratio = med["ray"]["tok_s"] / med["mlx_lm"]["tok_s"]
    wall_ratio = med["ray"]["wall_tok_s"] / med["mlx_lm"]["wall_tok_s"]
    out = {"model": model_name, "settings": {k: getattr(args, k) for k in (
               "rows", "rank", "scale", "num_layers", "batch_size", "learning_rate", "iters", "steps_per_report",
               "save_every", "repeats")},
           "median": med, "ratio": ratio, "wall_ratio": wall_ratio, "runs": runs,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "blas": loaded_blas()}}
    print(f"LoRA rank {args.rank} on {args.num_layers} layers of {model_name}, batch {args.batch_size}, {args.iters} "
          f"iterations, reports every {args.steps_per_report} (first left out), medians of {args.repeats}")
    rows = [(side, m["tok_s"], m["wall_tok_s"], f"{m['process_s']:.1f}") for side, m in med.items()]
    rows.append(("ray / mlx_lm", f"{ratio:.2f}x", f"{wall_ratio:.2f}x", ""))
    print(markdown_table(["side", "tok/s (reported)", "wall tok/s", "process s"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
