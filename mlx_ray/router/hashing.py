"""Weighted rendezvous (highest-random-weight) hashing: which arm a user sticks to in an A/B split.

For a key (a user) every arm gets a score from a hash of (arm, key); the key goes to the arm with the
highest score. With the weighted score ``-weight / ln(u)``, ``u`` uniform in (0, 1) from the hash, an arm
wins a share of keys equal to its share of the weights (Schindelhauer and Schomaker's weighted
rendezvous hashing, as in Resnick's "logarithmic method").

Why this and not a random draw per request (LiteLLM's A/B weights):
- a user stays on one arm, request after request;
- every router replica computes the same answer with no shared state: the hash is blake2b of the bytes,
  the same in every process and Python version (Python's ``hash()`` is salted per process);
- when one arm's weight grows, only keys *to* that arm move (its scores rise, no other score changes),
  and only as many as its new share needs; removing an arm moves only that arm's keys.

The order of all arms by score is also a stable failover order for the key (``rank``).
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable

_SCALE = float(1 << 53)  # a double holds 53 bits exactly, so u never rounds to 0 or 1


def unit(key: str, arm: str) -> float:
    """A uniform number in (0, 1), a pure function of (key, arm)."""
    # The arm first and a NUL after it: arm names never hold a NUL, so (arm, key) pairs cannot collide.
    data = arm.encode("utf-8") + b"\x00" + key.encode("utf-8")
    digest = hashlib.blake2b(data, digest_size=8, person=b"mlx-ray-hrw").digest()
    return ((int.from_bytes(digest, "big") >> 11) + 0.5) / _SCALE


def score(key: str, arm: str, weight: float) -> float:
    """The arm's weighted score for the key: ``-weight / ln(u)``; 0 for a weight of 0."""
    if weight <= 0:
        return 0.0
    return -weight / math.log(unit(key, arm))


def rank(key: str, arms_with_weights: Iterable[tuple[str, float]]) -> list[str]:
    """All arms, best first for this key (ties, which need equal scores, broken by name)."""
    scored = [(score(key, name, w), name) for name, w in arms_with_weights]
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [name for _, name in scored]


def pick(key: str, arms_with_weights: Iterable[tuple[str, float]]) -> str:
    """The arm this key sticks to, among those with a positive weight.

    ``arms_with_weights``: (arm name, weight >= 0) pairs. Raises ``ValueError`` if no weight is positive.
    """
    pairs = [(n, w) for n, w in arms_with_weights if w > 0]
    if not pairs:
        raise ValueError("no arm has a positive weight")
    return rank(key, pairs)[0]
