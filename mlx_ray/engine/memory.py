"""Memory policy: default byte budgets and the KV size of a running batch.

mlx-lm's batch caches (``BatchKVCache``) are rectangular: every row is as long
as the longest one (shorter rows are left-padded), grown in steps of 256
tokens. So the KV memory of a batch whose rows may each grow to
``prompt + max_tokens`` tokens is bounded by ``rows * round_up(max_len, 256) *
bytes_per_token``. Admission uses exactly that bound, so the running batch can
never outgrow its budget: on Linux a failed MLX CPU allocation is not an
exception but a crash, so the budget is the real guard there.
"""

from __future__ import annotations

import mlx.core as mx

KV_STEP = 256  # BatchKVCache / KVCache growth step (mlx_lm.models.cache)
MIN_KV_BUDGET = 64 << 20
PREFIX_SHARE = 0.25  # default prefix-cache budget, as a share of the KV budget


def device_memory_bytes() -> int:
    """Memory the device can use: Metal's recommended working set, else total RAM."""
    get = getattr(mx, "device_info", None)
    if get is None:  # older MLX: only the Metal namespace has it
        get = getattr(getattr(mx, "metal", None), "device_info", None)
    try:
        info = get() if get is not None else {}
    except Exception:
        info = {}
    size = info.get("max_recommended_working_set_size") or info.get("memory_size")
    if size:
        return int(size)
    import psutil

    return int(psutil.virtual_memory().total)


def default_kv_budget(weights_bytes: int, device_bytes: int | None = None) -> int:
    """Half of what the device has left after the weights (and a copy's worth of headroom)."""
    device_bytes = device_memory_bytes() if device_bytes is None else device_bytes
    return max(MIN_KV_BUDGET, int(0.5 * (device_bytes - 2 * weights_bytes)))


def round_up(n: int, step: int = KV_STEP) -> int:
    return -(-n // step) * step


def batch_kv_bound(lengths: list[int], bytes_per_token: int) -> int:
    """Upper bound of the KV bytes of a batch whose rows grow to ``lengths`` tokens."""
    if not lengths:
        return 0
    return len(lengths) * round_up(max(lengths)) * bytes_per_token
