"""Bench output: the table, the headline line, the PNG plot, and ``bench compare``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadRequest
from .table import fmt, markdown_table


def _mmm(d: dict, scale: float = 1.0) -> str:
    return f"{fmt(d['median'] * scale)} ({fmt(d['min'] * scale)}–{fmt(d['max'] * scale)})"


def describe(report: dict) -> str:
    env, lines = report["environment"], []
    for name, info in report["backends"].items():
        extra = f", BLAS {env['mlx_blas']}" + (", mlx-ray CPU kernels" if info.get("cpu_kernel") else "") \
            if name == "mlx" else (f", {info['threads']} threads" if info.get("threads") else "")
        lines.append(f"- {name}: `{info['path']}` on {info['device']}, {info['quantization']} "
                     f"({info['weight_bytes'] / 2**20:.0f} MiB of weights{extra})")
    v = env["versions"]
    lines.append(f"- versions: mlx {v['mlx']}, mlx-lm {v['mlx-lm']}, torch {v['torch']}, transformers "
                 f"{v['transformers']}; {env['platform']}; memory bandwidth {fmt(report['bandwidth_gbs'])} GB/s "
                 f"({report['bandwidth_source']})")
    s = report["settings"]
    lines.append(f"- {s['gen_tokens']} generated tokens per run; median (min–max) of {s['repeats']} repeats "
                 "after one warm-up run")
    return "\n".join(lines)


def table(report: dict) -> str:
    rows = [[r["backend"], r["prompt_len"], r["batch"], _mmm(r["prefill_tok_s"]), _mmm(r["decode_tok_s"]),
             _mmm(r["ttft_s"], 1000), f"{r['peak_bytes'] / 2**20:.0f}", f"{100 * r['roofline_fraction']:.1f}%"]
            for r in report["rows"]]
    return markdown_table(["backend", "prompt", "batch", "prefill tok/s", "decode tok/s", "TTFT ms", "peak MiB",
                           "decode roofline"], rows)


def headline_line(report: dict) -> str:
    h = report.get("headline")
    if not h:
        return "headline: needs both mlx and torch rows at the default shape"
    return (f"headline (prompt {h['prompt_len']}, batch {h['batch']}): MLX ÷ torch decode "
            f"{h['decode_ratio']:.2f}x ({fmt(h['mlx_decode_tok_s'])} vs {fmt(h['torch_decode_tok_s'])} tok/s), "
            f"prefill {h['prefill_ratio']:.2f}x ({fmt(h['mlx_prefill_tok_s'])} vs {fmt(h['torch_prefill_tok_s'])} "
            "tok/s)")


def plot(report: dict, path: str | Path) -> None:
    """Grouped bars per shape (MLX against torch), prefill and decode, with min–max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shapes = sorted({(r["prompt_len"], r["batch"]) for r in report["rows"]})
    names = list(report["backends"])
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.6 * len(shapes) + 3), 4))
    x, width = np.arange(len(shapes)), 0.8 / max(len(names), 1)
    for ax, metric, title in zip(axes, ("prefill_tok_s", "decode_tok_s"), ("prefill tok/s", "decode tok/s")):
        for i, name in enumerate(names):
            by = {(r["prompt_len"], r["batch"]): r[metric] for r in report["rows"] if r["backend"] == name}
            med = np.array([by[s]["median"] if s in by else np.nan for s in shapes])
            lo = np.array([by[s]["median"] - by[s]["min"] if s in by else 0 for s in shapes])
            hi = np.array([by[s]["max"] - by[s]["median"] if s in by else 0 for s in shapes])
            ax.bar(x + (i - (len(names) - 1) / 2) * width, med, width, yerr=[lo, hi], capsize=3, label=name)
        ax.set_xticks(x, [f"L{p}×B{b}" for p, b in shapes], rotation=30)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    devs = ", ".join(f"{n}: {i['device']} {i['quantization']}" for n, i in report["backends"].items())
    fig.suptitle(f"mlx-ray bench — {Path(report['settings']['model']).name} ({devs})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise BadRequest(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise BadRequest(f"{path} is not JSON") from None
    if not isinstance(data, dict) or data.get("kind") not in ("bench", "serve"):
        raise BadRequest(f"{path} is not an `mlx-ray bench` or `bench serve` JSON report")
    return data


def _pct(a, b) -> str:
    return "-" if not a or b is None else f"{100 * (b - a) / a:+.1f}%"


def compare(path_a: str, path_b: str) -> str:
    """A table of before (A), after (B) and the change, for every shape both runs have."""
    a, b = _load(path_a), _load(path_b)
    if a["kind"] != b["kind"]:
        raise BadRequest(f"cannot compare a {a['kind']} report with a {b['kind']} report")
    if a["kind"] == "serve":
        key = lambda r: (r["concurrency"],)  # noqa: E731
        metrics = [("output tok/s", lambda r: r["output_tok_s"]), ("TTFT p50 ms", lambda r: _ms(r["ttft_s"]["p50"])),
                   ("ITL p50 ms", lambda r: _ms(r["itl_s"]["p50"])), ("errors", lambda r: r["errors"])]
        head = ["concurrency"]
        rows_a, rows_b = a["runs"], b["runs"]
    else:
        key = lambda r: (r["backend"], r["prompt_len"], r["batch"])  # noqa: E731
        metrics = [("prefill tok/s", lambda r: r["prefill_tok_s"]["median"]),
                   ("decode tok/s", lambda r: r["decode_tok_s"]["median"]),
                   ("TTFT ms", lambda r: _ms(r["ttft_s"]["median"]))]
        head = ["backend", "prompt", "batch"]
        rows_a, rows_b = a["rows"], b["rows"]
    by_b = {key(r): r for r in rows_b}
    rows = []
    for ra in rows_a:
        rb = by_b.get(key(ra))
        if rb is None:
            continue
        cells = list(key(ra))
        for _, get in metrics:
            cells += [fmt(get(ra)), fmt(get(rb)), _pct(get(ra), get(rb))]
        rows.append(cells)
    if not rows:
        raise BadRequest(f"{path_a} and {path_b} share no shape to compare")
    cols = head + [f"{m} {w}" for m, _ in metrics for w in ("A", "B", "Δ")]
    return f"A: {path_a} ({a['time']})\nB: {path_b} ({b['time']})\n" + markdown_table(cols, rows)


def _ms(x):
    return None if x is None else 1000 * x
