"""Pass/fail thresholds per quantization level.

The level is the looser of the two sides: the MLX model's quantization
(``q4`` for affine 4-bit, ``mxfp4`` counts as ``q4``, ``mxfp8`` as ``q8``) or
dtype, and the torch dtype (a bf16 or fp16 torch side makes the level at
least ``bf16``). Torch at float32 is the reference.

Defaults (KL in nats, KL(torch || mlx) per position; ``ppl ratio`` is
MLX ÷ torch perplexity on the bundled reference text, checked as
``1/x <= ratio <= x``; ``greedy prefix`` is the mean over prompts of the
identical-prefix length ÷ continuation length; ``-`` means not checked):

| level | top-1 ≥ | top-5 overlap ≥ | KL mean ≤ | KL p99 ≤ | max abs logprob diff ≤ | ppl ratio ≤ | greedy prefix ≥ |
|-------|---------|-----------------|-----------|----------|------------------------|-------------|-----------------|
| f32   | 0.999   | 0.99            | 1e-4      | 1e-3     | 0.05                   | 1.001       | 1.0             |
| bf16  | 0.95    | 0.90            | 0.01      | 0.05     | -                      | 1.02        | 0.25            |
| q8    | 0.95    | 0.90            | 0.01      | 0.06     | -                      | 1.02        | 0.25            |
| q6    | 0.93    | 0.88            | 0.02      | 0.12     | -                      | 1.04        | 0.2             |
| q5    | 0.90    | 0.85            | 0.04      | 0.25     | -                      | 1.06        | 0.1             |
| q4    | 0.80    | 0.75            | 0.15      | 0.9      | -                      | 1.25        | -               |
| q3    | 0.60    | 0.55            | 0.6       | 3.0      | -                      | 1.8         | -               |
| q2    | 0.30    | 0.30            | 2.0       | 8.0      | -                      | 5.0         | -               |

How they were set: measured on SmolLM2-135M-Instruct (the test fixture)
against float32 torch on CPU, with the built-in prompts; each bound leaves a
margin of roughly 2-3x on the KL figures and several points on the agreement
figures over what was measured (the measured values are in the README). A
135M model is more sensitive to quantization than a 7B one, so bounds set on
it are loose for larger models; q5 and q2 are interpolated/extrapolated, not
measured. f32 is strict by design: the RoPE-theta config bug (top-1 0.86,
max diff 10) and a scaled layer both fail it, and both fail q4 too.

Override with ``--thresholds FILE`` (JSON or YAML): either a flat mapping of
metric names to values (applied to the run's level), or a mapping of level
names to such mappings. A value of ``null`` disables that check.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadRequest

METRICS = ("top1_min", "top5_min", "kl_mean_max", "kl_p99_max", "max_abs_diff_max", "ppl_ratio_max",
           "greedy_prefix_min")

DEFAULTS: dict[str, dict[str, float | None]] = {
    "f32": dict(top1_min=0.999, top5_min=0.99, kl_mean_max=1e-4, kl_p99_max=1e-3, max_abs_diff_max=0.05,
                ppl_ratio_max=1.001, greedy_prefix_min=1.0),
    "bf16": dict(top1_min=0.95, top5_min=0.90, kl_mean_max=0.01, kl_p99_max=0.05, max_abs_diff_max=None,
                 ppl_ratio_max=1.02, greedy_prefix_min=0.25),
    "q8": dict(top1_min=0.95, top5_min=0.90, kl_mean_max=0.01, kl_p99_max=0.06, max_abs_diff_max=None,
               ppl_ratio_max=1.02, greedy_prefix_min=0.25),
    "q6": dict(top1_min=0.93, top5_min=0.88, kl_mean_max=0.02, kl_p99_max=0.12, max_abs_diff_max=None,
               ppl_ratio_max=1.04, greedy_prefix_min=0.2),
    "q5": dict(top1_min=0.90, top5_min=0.85, kl_mean_max=0.04, kl_p99_max=0.25, max_abs_diff_max=None,
               ppl_ratio_max=1.06, greedy_prefix_min=0.1),
    "q4": dict(top1_min=0.80, top5_min=0.75, kl_mean_max=0.15, kl_p99_max=0.9, max_abs_diff_max=None,
               ppl_ratio_max=1.25, greedy_prefix_min=None),
    "q3": dict(top1_min=0.60, top5_min=0.55, kl_mean_max=0.6, kl_p99_max=3.0, max_abs_diff_max=None,
               ppl_ratio_max=1.8, greedy_prefix_min=None),
    "q2": dict(top1_min=0.30, top5_min=0.30, kl_mean_max=2.0, kl_p99_max=8.0, max_abs_diff_max=None,
               ppl_ratio_max=5.0, greedy_prefix_min=None),
}
ORDER = list(DEFAULTS)  # strictest first


def level_of(mlx_info: dict, torch_dtype: str) -> str:
    """The thresholds level for an MLX side (``backends.load_mlx`` info) against a torch dtype."""
    q = mlx_info.get("quant")
    if q:
        mode = q.get("mode", "affine")
        bits = 8 if mode in ("mxfp8",) else 4 if mode in ("mxfp4", "nvfp4") else int(q["bits"])
        mlx_level = f"q{min(max(bits, 2), 8)}" if bits != 7 else "q6"
        if mlx_level not in DEFAULTS:
            mlx_level = "q8"
    else:
        mlx_level = "f32" if mlx_info.get("dtype") == "float32" else "bf16"
    torch_level = "f32" if torch_dtype == "float32" else "bf16"
    return max(mlx_level, torch_level, key=ORDER.index)


def load_overrides(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise BadRequest(f"cannot read --thresholds {p}: {e.strerror}") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's input
        raise BadRequest(f"--thresholds {p}: cannot parse ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"--thresholds {p}: expected a mapping")
    return data


def thresholds_for(level: str, overrides: dict) -> dict:
    t = dict(DEFAULTS[level])
    flat = {k: v for k, v in overrides.items() if k not in DEFAULTS}
    layer = {**flat, **(overrides.get(level) or {})}
    unknown = sorted(set(layer) - set(METRICS))
    if unknown:
        raise BadRequest(f"--thresholds: unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    for k, v in layer.items():
        if v is not None and not isinstance(v, (int, float)):
            raise BadRequest(f"--thresholds: {k} must be a number or null, got {v!r}")
    t.update(layer)
    return t


def evaluate(report: dict, t: dict) -> list[dict]:
    """One check per enabled threshold: name, value, limit, passed."""
    lg, pp = report["logits"], report["perplexity"]
    values = {
        "top1_min": lg["top1_agreement"], "top5_min": lg["top5_overlap"], "kl_mean_max": lg["kl_mean"],
        "kl_p99_max": lg["kl_p99"], "max_abs_diff_max": lg["max_abs_diff"], "ppl_ratio_max": pp["ratio"],
        "greedy_prefix_min": report["greedy"]["prefix_frac_mean"],
    }
    checks = []
    for name in METRICS:
        limit = t.get(name)
        if limit is None:
            continue
        v = values[name]
        if name == "ppl_ratio_max":
            ok = 1 / limit <= v <= limit
        elif name.endswith("_min"):
            ok = v >= limit
        else:
            ok = v <= limit
        checks.append({"name": name, "value": v, "limit": limit, "passed": bool(ok)})
    return checks
