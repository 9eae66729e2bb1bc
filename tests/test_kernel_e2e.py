"""End to end: the q4 fixture generates the same greedy tokens with the kernel as with MLX's own op.

The model's non-quantized parameters and its scales/biases are cast to float32
(``model.set_dtype``; the 4-bit codes are untouched, and bf16 -> f32 is exact),
because MLX's own CPU op accumulates bfloat16 products in bfloat16 and is then
not a reference worth matching token for token (``bench/kernel_e2e.py`` reports
the bf16 divergence and its logit margin). MLX's op decodes at ~1-2 tok/s here,
so one prompt only.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_ray.kernels import qmm

N_TOKENS = 32
PROMPT = "What is the capital of France?"

pytestmark = pytest.mark.skipif(not qmm.status()["active"], reason=f"qmm_cpu inactive: {qmm.status()['reason']}")


def greedy_with_logits(model, prompt: list[int], n: int) -> tuple[list[int], list[mx.array]]:
    from mlx_lm.generate import generate_step

    tokens, logprobs = [], []
    for (tok, lp), _ in zip(generate_step(mx.array(prompt), model, max_tokens=n), range(n)):
        tokens.append(int(tok))
        logprobs.append(lp)
    return tokens, logprobs


def margin(lp: mx.array) -> float:
    top2 = mx.sort(lp)[-2:]
    return (top2[1] - top2[0]).item()


def test_q4_fixture_greedy_tokens_match_mlx(mlx_q4):
    from mlx_lm import load

    model, tokenizer = load(str(mlx_q4))
    model.set_dtype(mx.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)

    assert qmm.patch_model(model) == 30 * 7 + 1  # 7 linears per layer + the tied head
    fast, _ = greedy_with_logits(model, prompt, N_TOKENS)
    with qmm.force("reference"):
        ref, ref_lp = greedy_with_logits(model, prompt, N_TOKENS)

    diverge = next((i for i, (a, b) in enumerate(zip(fast, ref)) if a != b), None)
    detail = "" if diverge is None else (
        f"first divergence at token {diverge}: kernel {fast[diverge]} vs MLX {ref[diverge]}, "
        f"MLX top-2 logprob margin {margin(ref_lp[diverge]):.3g}")
    assert fast == ref, detail
    assert len(set(fast)) > 3, tokenizer.decode(fast)  # real text, not a stuck token
