"""``mlx-ray bench``: MLX against torch on one model, per shape, as one JSON-able dict.

For each backend (one model in memory at a time): load, one warm-up run of
the first shape, then for every shape ``repeats`` timed runs; each figure is
the median with its min and max. The decode roofline fraction is
``weight bytes × decode steps/s ÷ memory bandwidth`` (a decode step reads
every weight once, whatever the batch; KV-cache reads are left out, so it is
a lower bound on the bytes moved).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from statistics import median

from tqdm import tqdm

from .. import blas
from ..errors import BadRequest, EngineFault
from ..parity import backends
from ..parity.prompts import data_path
from .measure import batch_tokens, memory_bandwidth_gbs, shape_runner

QUICK = dict(prompt_lengths=[32], batch_sizes=[1, 2], gen_tokens=8, repeats=2)


@dataclass
class BenchConfig:
    model: str
    hf: str | None = None
    backends: tuple[str, ...] = ("mlx", "torch")
    prompt_lengths: tuple[int, ...] = (128, 256)
    batch_sizes: tuple[int, ...] = (1, 4)
    gen_tokens: int = 32
    repeats: int = 3
    device: str | None = None  # torch device
    torch_dtype: str | None = None  # default: the MLX model's float dtype
    bandwidth_gbs: float | None = None


def _spread(values: list[float]) -> dict:
    return {"median": median(values), "min": min(values), "max": max(values)}


def hf_source_for(mlx_path: Path) -> str | None:
    """The HF source a cached MLX model was converted from (its manifest), if it still exists."""
    try:
        src = json.loads((mlx_path / "manifest.json").read_text()).get("source", {})
    except (OSError, ValueError):
        return None
    path = src.get("path")
    return path if path and Path(path).is_dir() else src.get("id")


def _validate(cfg: BenchConfig, max_len: int | None) -> None:
    bad = set(cfg.backends) - {"mlx", "torch"}
    if bad or not cfg.backends:
        raise BadRequest(f"--backends takes mlx and/or torch, got {','.join(cfg.backends)}")
    if min(cfg.prompt_lengths) < 1 or min(cfg.batch_sizes) < 1 or cfg.gen_tokens < 2 or cfg.repeats < 1:
        raise BadRequest("prompt lengths and batch sizes must be >= 1, --gen-tokens >= 2, --repeats >= 1")
    if max_len and max(cfg.prompt_lengths) + cfg.gen_tokens > max_len:
        raise BadRequest(f"prompt length {max(cfg.prompt_lengths)} + {cfg.gen_tokens} generated tokens exceeds "
                         f"the model's context of {max_len}")


def _bench_side(side, cfg: BenchConfig, base: list[int], bandwidth: float) -> list[dict]:
    run = shape_runner(side)
    shapes = list(product(cfg.prompt_lengths, cfg.batch_sizes))
    run.run(batch_tokens(base, shapes[0][0], shapes[0][1]), cfg.gen_tokens)  # warm-up
    rows = []
    for length, batch in tqdm(shapes, desc=side.backend, unit="shape", leave=False):
        toks = batch_tokens(base, length, batch)
        ts = [run.run(toks, cfg.gen_tokens) for _ in range(cfg.repeats)]
        steps = cfg.gen_tokens - 1
        decode_tok_s = [batch * steps / t.decode_s for t in ts]
        step_s = median(steps / t.decode_s for t in ts)
        rows.append({
            "backend": side.backend, "prompt_len": length, "batch": batch, "gen_tokens": cfg.gen_tokens,
            "prefill_tok_s": _spread([batch * length / t.prefill_s for t in ts]),
            "decode_tok_s": _spread(decode_tok_s),
            "ttft_s": _spread([t.ttft_s for t in ts]),
            "peak_bytes": max(t.peak_bytes for t in ts), "peak_kind": ts[0].peak_kind,
            "roofline_fraction": side.info["weight_bytes"] * step_s / (bandwidth * 1e9),
        })
    return rows


def run_bench(cfg: BenchConfig) -> dict:
    from transformers import AutoTokenizer

    mlx_path = backends.resolve_mlx_path(cfg.model)
    mlx_config = json.loads((mlx_path / "config.json").read_text())
    _validate(cfg, mlx_config.get("max_position_embeddings"))
    hf = cfg.hf or hf_source_for(mlx_path)
    if "torch" in cfg.backends and not hf:
        raise BadRequest("the torch backend needs --hf SOURCE (this model has no manifest naming its source)")
    base = AutoTokenizer.from_pretrained(str(mlx_path)).encode(data_path("reference.txt").read_text())
    bandwidth = cfg.bandwidth_gbs or memory_bandwidth_gbs()
    report: dict = {"kind": "bench", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "environment": backends.environment(), "bandwidth_gbs": bandwidth,
                    "bandwidth_source": "--bandwidth-gbs" if cfg.bandwidth_gbs else "measured (NumPy read of 1 GiB)",
                    "settings": {"model": cfg.model, "hf": hf, "prompt_lengths": list(cfg.prompt_lengths),
                                 "batch_sizes": list(cfg.batch_sizes), "gen_tokens": cfg.gen_tokens,
                                 "repeats": cfg.repeats},
                    "backends": {}, "rows": []}
    mlx_dtype = None
    for name in cfg.backends:
        if name == "mlx":
            side = backends.load_mlx(str(mlx_path))
            mlx_dtype = side.info["dtype"]
        else:
            dtype = cfg.torch_dtype or (mlx_dtype if mlx_dtype in backends.TORCH_DTYPES else None) \
                or _float_dtype(mlx_config)
            if blas.preloaded_by_env():
                child = _torch_without_preload(cfg, hf, dtype, bandwidth)
                report["backends"][name] = child["backends"]["torch"]
                report["rows"] += child["rows"]
                continue
            side = backends.load_torch(hf, cfg.device, dtype)
        report["backends"][name] = dict(side.info)
        report["rows"] += _bench_side(side, cfg, base, bandwidth)
        backends.free(side)
    report["headline"] = headline(report)
    return report


def _torch_without_preload(cfg: BenchConfig, hf: str, dtype: str, bandwidth: float) -> dict:
    """Run the torch side in a child process without the OpenBLAS LD_PRELOAD.

    MLX on Linux needs the preload, but interposed into torch's process it slowed
    torch's CPU decode of the fixture 5.8x here (27.4 -> 4.7 tok/s), which would
    make every MLX/torch ratio a lie. So each side runs with its own BLAS."""
    env = blas.env_without_fast_blas()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "torch.json"
        argv = [sys.executable, "-m", "mlx_ray.cli", "bench", "--backends", "torch", "--model", str(cfg.model),
                "--hf", str(hf), "--prompt-lengths", ",".join(map(str, cfg.prompt_lengths)),
                "--batch-sizes", ",".join(map(str, cfg.batch_sizes)), "--gen-tokens", str(cfg.gen_tokens),
                "--repeats", str(cfg.repeats), "--torch-dtype", dtype, "--bandwidth-gbs", str(bandwidth),
                "--json", str(out)] + (["--device", cfg.device] if cfg.device else [])
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EngineFault(f"the torch side failed in its own process: {last}")
        return json.loads(out.read_text())


def _float_dtype(config: dict) -> str:
    d = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return d if d in backends.TORCH_DTYPES else "float32"


def headline(report: dict) -> dict | None:
    """MLX ÷ torch for decode and prefill at the default (first) shape."""
    s = report["settings"]
    key = (s["prompt_lengths"][0], s["batch_sizes"][0])
    by = {r["backend"]: r for r in report["rows"] if (r["prompt_len"], r["batch"]) == key}
    if not {"mlx", "torch"} <= set(by):
        return None
    m, t = by["mlx"], by["torch"]
    return {"prompt_len": key[0], "batch": key[1],
            "decode_ratio": m["decode_tok_s"]["median"] / t["decode_tok_s"]["median"],
            "prefill_ratio": m["prefill_tok_s"]["median"] / t["prefill_tok_s"]["median"],
            "mlx_decode_tok_s": m["decode_tok_s"]["median"], "torch_decode_tok_s": t["decode_tok_s"]["median"],
            "mlx_prefill_tok_s": m["prefill_tok_s"]["median"], "torch_prefill_tok_s": t["prefill_tok_s"]["median"]}
