"""Paged attention: queries against K/V read in place from a block pool through a block table.

Contract (the twin, the C++ CPU primitive and the Metal kernel alike)::

    paged_attention(queries [B, Hq, L, D], k_cache, v_cache, block_tables [B, MB] int32,
                    context_lens [B] int32, *, scale, block_size, bits=None, group_size=64)
        -> out [B, Hq, L, D] (the queries' dtype)

* ``k_cache`` / ``v_cache`` hold every slot of the pool, ``S = num_blocks * block_size``:
  float ``[S, Hkv, D]`` in the queries' dtype, or (``bits`` 4 or 8) a tuple
  ``(packed [S, Hkv, D * bits // 32] uint32, scales [S, Hkv, D // group_size],
  biases [S, Hkv, D // group_size])`` in MLX's affine layout
  (``mx.quantize(x.reshape(-1, D), group_size, bits)`` reshaped), scales and biases
  in the queries' dtype.
* Position ``p`` of row ``b`` lives at slot ``block_tables[b, p // block_size] *
  block_size + p % block_size``. Entries of ``block_tables`` past a row's last
  block are ignored (any value in range).
* ``context_lens[b]``: the valid key positions of row ``b``, *including* the ``L``
  new tokens (already written to the pool). Query ``l`` of row ``b`` is at
  absolute position ``context_lens[b] - L + l`` and attends the keys at positions
  ``0 ..= that`` (causal); ``L = 1`` is a decode step, ``B = 1, L > 1`` a prefill
  chunk against the cached prefix.
* GQA: ``Hq % Hkv == 0``; query head ``h`` reads KV head ``h // (Hq // Hkv)``.
* Softmax in float32 (online in the kernels), output cast to the queries' dtype.

:func:`twin` gathers every row's slots into a dense ``[B, Hkv, MB * block_size, D]``
(dequantizing), masks positions past each query and calls
``mx.fast.scaled_dot_product_attention``: the reference, and a copy of the
whole context per call, which is what the kernels exist to avoid.
:func:`paged_attention` dispatches to a verified kernel, else the twin.
"""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx

NAME = "paged_attention"
CPU_NAME = "paged_attention_cpu"
HEAD_DIMS = (64, 128)  # the kernels' head sizes; others take the twin

Cache = Union[mx.array, tuple]


def gather(cache: Cache, block_tables: mx.array, block_size: int, bits: Optional[int], group_size: int,
           dtype) -> mx.array:
    """Every row's slots as a dense ``[B, Hkv, MB * block_size, D]`` (dequantized)."""
    B, MB = block_tables.shape
    slots = (block_tables[:, :, None] * block_size + mx.arange(block_size, dtype=mx.int32)).reshape(-1)
    if bits is None:
        x = cache[slots]  # [B*MB*bs, Hkv, D]
    else:
        packed, scales, biases = cache
        n, hkv = packed.shape[0], packed.shape[1]
        q, s, b = packed[slots], scales[slots], biases[slots]
        t = q.shape[0]
        x = mx.dequantize(q.reshape(t * hkv, -1), s.reshape(t * hkv, -1), b.reshape(t * hkv, -1),
                          group_size=group_size, bits=bits).reshape(t, hkv, -1).astype(dtype)
    return x.reshape(B, MB * block_size, x.shape[1], x.shape[2]).transpose(0, 2, 1, 3)


def causal_mask(context_lens: mx.array, L: int, T: int) -> mx.array:
    """``[B, 1, L, T]`` bool: key position t visible to query l of row b."""
    qpos = context_lens[:, None] - L + mx.arange(L, dtype=mx.int32)[None, :]  # [B, L]
    return (mx.arange(T, dtype=mx.int32)[None, None, :] <= qpos[:, :, None])[:, None]


def twin(queries: mx.array, k_cache: Cache, v_cache: Cache, block_tables: mx.array, context_lens: mx.array, *,
         scale: float, block_size: int, bits: Optional[int] = None, group_size: int = 64) -> mx.array:
    """The reference: gather + mask + ``mx.fast.scaled_dot_product_attention``."""
    L = queries.shape[2]
    k = gather(k_cache, block_tables, block_size, bits, group_size, queries.dtype)
    v = gather(v_cache, block_tables, block_size, bits, group_size, queries.dtype)
    mask = causal_mask(context_lens.astype(mx.int32), L, k.shape[2])
    return mx.fast.scaled_dot_product_attention(queries, k, v, scale=scale, mask=mask)


def paged_attention(queries: mx.array, k_cache: Cache, v_cache: Cache, block_tables: mx.array,
                    context_lens: mx.array, *, scale: float, block_size: int, bits: Optional[int] = None,
                    group_size: int = 64) -> mx.array:
    """The dispatch: a verified kernel for this device and shape, else :func:`twin`."""
    return twin(queries, k_cache, v_cache, block_tables, context_lens, scale=scale, block_size=block_size,
                bits=bits, group_size=group_size)


def kernel_verified() -> tuple[bool, str]:
    """Whether a kernel (not the twin) serves this device: the engine takes the paged path only then."""
    return False, "no paged-attention kernel built yet"
