"""The paged KV cache's storage: one pool of fixed-size blocks per layer, sized by the byte budget.

Every layer holds all ``num_blocks * block_size`` slots of K and V: float
``[S, Hkv, D]`` in the model's dtype, or with ``bits`` (8 or 4) MLX's affine
layout (packed uint32 plus per-group scales and biases, the same quantization
as ``mx.quantize``). A sequence owns a list of blocks (its block table); the
position ``p`` of a sequence sits at slot ``blocks[p // block_size] *
block_size + p % block_size``. The pool is allocated once, at start, so
nothing the batch does later can allocate KV beyond the budget (on Linux a
failed MLX allocation crashes the process instead of raising).

Blocks are reference-counted: a running sequence holds one reference to each
of its blocks, the prefix cache (``block_prefix.py``) another to the blocks it
keeps; a block returns to the free list when nobody holds it. Writes go
through ``write`` (a scatter into the pool, in place: the pool holds the only
reference, so MLX donates the buffer) and the only copy of KV the cache ever
makes is ``copy_block`` (copy-on-write of a partial block shared from the
prefix cache), counted in ``copied_bytes``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Union

import mlx.core as mx

Cache = Union[mx.array, tuple]


@dataclass(frozen=True)
class LayerShape:
    n_kv_heads: int
    head_dim: int


def bytes_per_slot(shape: LayerShape, dtype: mx.Dtype, bits: Optional[int], group_size: int) -> int:
    """K and V bytes of one token in one layer."""
    h, d = shape.n_kv_heads, shape.head_dim
    if bits is None:
        return 2 * h * d * dtype.size
    return 2 * h * (d * bits // 8 + 2 * (d // group_size) * dtype.size)


class OutOfBlocks(RuntimeError):
    """The pool has no free block (admission should have prevented it)."""


class KVPool:
    def __init__(self, shapes: list[LayerShape], dtype: mx.Dtype, num_blocks: int, block_size: int,
                 bits: Optional[int] = None, group_size: int = 64):
        if num_blocks < 1:
            raise ValueError("the KV budget holds no block; raise kv_budget_bytes")
        self.shapes, self.dtype = shapes, dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        self.bits, self.group_size = bits, group_size
        self.block_bytes = block_size * sum(bytes_per_slot(s, dtype, bits, group_size) for s in shapes)
        self.refs = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.copied_bytes = 0
        self.k: list[Cache] = []
        self.v: list[Cache] = []
        self._allocate_arrays()

    def _empty(self, shape: LayerShape) -> Cache:
        S, h, d = self.num_blocks * self.block_size, shape.n_kv_heads, shape.head_dim
        if self.bits is None:
            return mx.zeros((S, h, d), dtype=self.dtype)
        return (mx.zeros((S, h, d * self.bits // 32), dtype=mx.uint32),
                mx.zeros((S, h, d // self.group_size), dtype=self.dtype),
                mx.zeros((S, h, d // self.group_size), dtype=self.dtype))

    def _allocate_arrays(self) -> None:
        self.k = [self._empty(s) for s in self.shapes]
        self.v = [self._empty(s) for s in self.shapes]
        mx.eval(self.arrays())

    def reset(self) -> None:
        """Every block free, every slot zero (after a failed step)."""
        self.refs = [0] * self.num_blocks
        self.free = deque(range(self.num_blocks))
        self.k, self.v = [], []
        self._allocate_arrays()

    def arrays(self) -> list[mx.array]:
        out = []
        for c in self.k + self.v:
            out.extend(c if isinstance(c, tuple) else (c,))
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    # -- blocks ----------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise OutOfBlocks("no free KV block")
        b = self.free.popleft()
        self.refs[b] = 1
        return b

    def incref(self, block: int) -> None:
        self.refs[block] += 1

    def decref(self, block: int) -> bool:
        """Drop one reference; True when the block went back to the free list."""
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)
            return True
        return False

    # -- data ------------------------------------------------------------------------
    def write(self, layer: int, slots: mx.array, keys: mx.array, values: mx.array) -> None:
        """Store new K/V ``[B, Hkv, L, D]`` at ``slots`` (``[B * L]``, row-major over (b, l))."""
        self.k[layer] = self._store(self.k[layer], slots, keys)
        self.v[layer] = self._store(self.v[layer], slots, values)

    def _store(self, cache: Cache, slots: mx.array, x: mx.array) -> Cache:
        B, h, L, d = x.shape
        x = x.transpose(0, 2, 1, 3).reshape(B * L, h, d)
        if self.bits is None:
            cache[slots] = x.astype(cache.dtype)
            return cache
        q, s, b = mx.quantize(x.reshape(B * L * h, d), group_size=self.group_size, bits=self.bits)
        packed, scales, biases = cache
        packed[slots] = q.reshape(B * L, h, -1)
        scales[slots] = s.reshape(B * L, h, -1).astype(scales.dtype)
        biases[slots] = b.reshape(B * L, h, -1).astype(biases.dtype)
        return packed, scales, biases

    def copy_block(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` slots of block ``src`` into ``dst`` in every layer (copy-on-write)."""
        bs = self.block_size
        s = mx.arange(src * bs, src * bs + n, dtype=mx.int32)
        d = mx.arange(dst * bs, dst * bs + n, dtype=mx.int32)
        arrays = self.arrays()
        # The copied rows are evaluated on their own first: ``a[d] = a[s]`` in one graph keeps the
        # old buffer alive through the gather, so MLX could not update the pool in place and
        # would copy the whole layer (measured: 0.54 s for a 192 MB array, 0.2 ms this way).
        rows = [a[s] for a in arrays]
        mx.eval(rows)
        for a, r in zip(arrays, rows):
            a[d] = r
        mx.eval(arrays)
        self.copied_bytes += n * self.block_bytes // bs
