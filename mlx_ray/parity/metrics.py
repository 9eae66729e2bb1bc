"""Numbers that compare two log-prob tensors, two greedy continuations, and
two perplexities. Pure numpy; torch is the reference (``p``) side everywhere.
"""

from __future__ import annotations

import math

import numpy as np


def _renorm(logp: np.ndarray) -> np.ndarray:
    x = logp.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def position_stats(ref: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position figures for ``[T, V]`` log-probs (ref = torch, test = MLX).

    Logit differences are measured on log-probs (logits minus their
    logsumexp), which removes the per-position constant that softmax ignores.
    """
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch {ref.shape} vs {test.shape}")
    diff = np.abs(ref.astype(np.float64) - test.astype(np.float64))
    ref64, test64 = _renorm(ref), _renorm(test)  # float32 log-probs are normalised to ~1e-7 only
    kl = np.sum(np.exp(ref64) * (ref64 - test64), axis=-1)  # KL(torch || mlx), nats
    top1 = np.argmax(ref, axis=-1) == np.argmax(test, axis=-1)
    k = 5
    ref_top = np.argpartition(-ref, k - 1, axis=-1)[:, :k]
    test_top = np.argpartition(-test, k - 1, axis=-1)[:, :k]
    overlap = np.array([len(set(a) & set(b)) / k for a, b in zip(ref_top, test_top)])
    two = np.partition(ref, -2, axis=-1)[:, -2:]
    return {"max_abs": diff.max(axis=-1), "mean_abs": diff.mean(axis=-1), "kl": np.maximum(kl, 0.0),
            "top1": top1.astype(float), "top5": overlap, "ref_gap": (two[:, 1] - two[:, 0]).astype(np.float64)}


NEAR_TIE_NATS = 0.01


def decisive_top1(stats: list[dict[str, np.ndarray]], near_tie: float = NEAR_TIE_NATS) -> dict:
    """Top-1 agreement where the reference's top-1/top-2 log-prob gap is at least ``near_tie`` nats.

    A flip under that gap is a tie broken the other way (any rounding can do it), not a lost answer;
    the raw figure counts both."""
    top1 = np.concatenate([s["top1"] for s in stats])
    gap = np.concatenate([s["ref_gap"] for s in stats])
    keep = gap >= near_tie
    return {"near_tie_nats": near_tie, "near_tie_positions": int((~keep).sum()),
            "top1_agreement_decisive": float(top1[keep].mean()) if keep.any() else 1.0,
            "top1_disagreements_near_tie": int(((top1 == 0) & ~keep).sum())}


def aggregate(stats: list[dict[str, np.ndarray]]) -> dict:
    """Pool per-position figures of all prompts into the report's logit block."""
    cat = {k: np.concatenate([s[k] for s in stats]) for k in stats[0]}
    return {
        "positions": int(cat["kl"].size),
        "max_abs_diff": float(cat["max_abs"].max()),
        "mean_abs_diff": float(cat["mean_abs"].mean()),
        "kl_mean": float(cat["kl"].mean()),
        "kl_p99": float(np.percentile(cat["kl"], 99)),
        "kl_max": float(cat["kl"].max()),
        "top1_agreement": float(cat["top1"].mean()),
        "top1_disagreements": int((cat["top1"] == 0).sum()),
        "top5_overlap": float(cat["top5"].mean()),
    }


def greedy_compare(ref: list[int], test: list[int]) -> dict:
    """Identical-prefix length and the first divergence index (None when identical)."""
    n = 0
    for a, b in zip(ref, test):
        if a != b:
            break
        n += 1
    identical = ref == test
    return {"identical": identical, "prefix_len": n, "ref_len": len(ref), "test_len": len(test),
            "divergence_at": None if identical else n,
            "prefix_frac": 1.0 if identical else n / max(len(ref), len(test), 1)}


def around(tokenizer, tokens: list[int], at: int, width: int = 8) -> dict:
    """Text before and from the divergence point, for the report."""
    return {"before": tokenizer.decode(tokens[max(0, at - width):at]),
            "after": tokenizer.decode(tokens[at:at + width])}


def perplexity(logp: np.ndarray, ids: list[int]) -> float:
    """exp(mean NLL) of tokens 1..T-1 given their prefixes."""
    tgt = np.asarray(ids[1:])
    nll = -logp[np.arange(len(tgt)), tgt].astype(np.float64)
    return float(math.exp(nll.mean()))
