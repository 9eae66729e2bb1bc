"""End to end: q4 decode of the fixture with the qmm_cpu kernel, without it, and with mlx_lm.generate.

    python bench/kernel_e2e.py [--model DIR] [--tokens 64] [--ref-tokens 16] [--repeats 3] [--json PATH]

Three ways to decode the same greedy prompt from the q4-g64 SmolLM2 fixture
(bf16 activations, scales and biases, as ``mlx_ray convert`` writes it):

* **kernel**: the model patched by ``qmm.patch_model`` (what the engine does
  at load), decoded with mlx-lm's ``stream_generate``;
* **kernel off**: the same patched model with the kernel switched off
  (``qmm.force("reference")``: MLX's own op through our dispatch);
* **mlx_lm.generate**: a freshly loaded, unpatched model through
  ``mlx_lm.stream_generate`` (the loop ``mlx_lm.generate`` runs).

Decode tok/s is mlx-lm's own ``generation_tps`` (tokens after the first over
the time after the first). Then the token check: greedy tokens with the kernel
against MLX's own op, at bf16 (MLX's CPU op accumulates bf16 products in bf16,
so they may diverge: the first divergence and the logprob margins there are
reported, with which side float32 arithmetic agrees with) and with the model
cast to float32 (``set_dtype``; must agree).

The machine is shared: runs are repeated and medians reported with the load
average. MLX's own op decodes at ~1 tok/s here, hence fewer reference tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kernel_micro import active_status

from mlx_ray.blas import loaded_blas, reexec_with_fast_blas

PROMPT = "What is the capital of France?"
OUT = Path(__file__).parent / "out" / "kernel_e2e.json"


def fixture_q4() -> Path:
    """The fixture at q4-g64, converted once into a bench cache directory."""
    from mlx_ray.conversion.convert import convert
    from mlx_ray.fixtures import smollm2_hf_dir

    out = Path(tempfile.gettempdir()) / "mlx-ray-bench-kernel" / "SmolLM2-135M-Instruct-q4-g64"
    if not (out / "config.json").exists():
        convert(str(smollm2_hf_dir()), out=out, quantize=True, q_bits=4, q_group_size=64, progress=False)
    return out


def decode_tps(model, tokenizer, prompt: list[int], n: int) -> tuple[float, list[int]]:
    from mlx_lm import stream_generate

    tokens, tps = [], 0.0
    for resp in stream_generate(model, tokenizer, prompt, max_tokens=n):
        tokens.append(resp.token)
        tps = resp.generation_tps
    return tps, tokens


def greedy(model, prompt: list[int], n: int):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    toks, lps = [], []
    for (tok, lp), _ in zip(generate_step(mx.array(prompt), model, max_tokens=n), range(n)):
        toks.append(int(tok))
        lps.append(lp)
    return toks, lps


def token_check(model, prompt: list[int], n: int, qmm) -> dict:
    """Greedy tokens with the kernel vs MLX's op; at a divergence, the logprob margins of both sides."""
    import mlx.core as mx

    fast, fast_lp = greedy(model, prompt, n)
    with qmm.force("reference"):
        ref, ref_lp = greedy(model, prompt, n)
    i = next((j for j, (a, b) in enumerate(zip(fast, ref)) if a != b), None)
    out = {"tokens": n, "identical": i is None, "first_divergence": i, "kernel_tokens": fast}
    if i is not None:
        def top2(lp):
            v = mx.sort(lp)[-2:]
            return (v[1] - v[0]).item()

        out.update(kernel_token=fast[i], mlx_token=ref[i], kernel_top2_margin=top2(fast_lp[i]),
                   mlx_top2_margin=top2(ref_lp[i]),
                   mlx_logprob_gap=(ref_lp[i][ref[i]] - ref_lp[i][fast[i]]).item())
    return out


def verdict(t: dict) -> str:
    if t["identical"]:
        return "identical"
    f32 = t.get("float32_token")
    agrees = "the kernel" if f32 == t["kernel_token"] else "MLX" if f32 == t["mlx_token"] else "neither side"
    return (f"diverge at {t['first_divergence']}: kernel top-2 margin {t['kernel_top2_margin']:.3g}, MLX top-2 "
            f"margin {t['mlx_top2_margin']:.3g}, MLX logprob gap to the kernel's token {t['mlx_logprob_gap']:.3g}; "
            f"float32 arithmetic agrees with {agrees}")


def main(argv=None) -> int:
    reexec_with_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a q4 MLX model directory (default: the fixture, converted)")
    p.add_argument("--tokens", type=int, default=64, help="decode tokens with the kernel")
    p.add_argument("--ref-tokens", type=int, default=16, help="decode tokens with MLX's own op (slow)")
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=OUT)
    args = p.parse_args(argv)

    import mlx.core as mx
    from mlx_lm import load

    from mlx_ray.bench.table import markdown_table
    from mlx_ray.kernels import qmm

    st = active_status(qmm)
    if st is None:
        return 1
    model_dir = args.model or fixture_q4()
    model, tokenizer = load(str(model_dir))
    base_model, _ = load(str(model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    patched = qmm.patch_model(model)
    report = {"model": str(model_dir), "kernel": st, "patched_layers": patched, "blas": loaded_blas(),
              "cpus": os.cpu_count(), "load_before": os.getloadavg(), "runs": {}}

    runs = {"kernel": [], "kernel off": [], "mlx_lm.generate": []}
    for r in range(args.repeats):  # interleaved, so machine noise hits every side alike
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr)
        runs["kernel"].append(decode_tps(model, tokenizer, prompt, args.tokens)[0])
        with qmm.force("reference"):
            runs["kernel off"].append(decode_tps(model, tokenizer, prompt, args.ref_tokens)[0])
        runs["mlx_lm.generate"].append(decode_tps(base_model, tokenizer, prompt, args.ref_tokens)[0])
    report["runs"] = runs
    report["decode_tps"] = {k: statistics.median(v) for k, v in runs.items()}
    base = report["decode_tps"]["mlx_lm.generate"]
    report["speedup_vs_mlx_lm"] = report["decode_tps"]["kernel"] / base if base else None

    print("token check (bf16 as converted) ...", file=sys.stderr)
    report["tokens_bf16"] = token_check(model, prompt, args.check_tokens, qmm)
    print("token check (float32 activations) ...", file=sys.stderr)
    model.set_dtype(mx.float32)
    report["tokens_f32"] = token_check(model, prompt, args.check_tokens, qmm)
    bf, f32_tokens = report["tokens_bf16"], report["tokens_f32"].pop("kernel_tokens")
    if not bf["identical"]:  # which bf16 side picked what float32 arithmetic picks?
        i = bf["first_divergence"]
        same_prefix = f32_tokens[:i] == bf["kernel_tokens"][:i]
        bf["float32_token"] = f32_tokens[i] if same_prefix else None
    report["load_after"] = os.getloadavg()

    print(f"\n{model_dir} ({patched} layers patched), {st['reason']}, BLAS {report['blas']}; "
          f"load avg before/after {report['load_before'][0]:.1f}/{report['load_after'][0]:.1f}\n")
    rows = [[k, report["decode_tps"][k], min(v), max(v), report["decode_tps"][k] / base if base else None]
            for k, v in runs.items()]
    print(markdown_table(["decode", "tok/s (median)", "min", "max", "x mlx_lm.generate"], rows))
    for name in ("tokens_bf16", "tokens_f32"):
        print(f"{name}: first {report[name]['tokens']} greedy tokens {verdict(report[name])}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
