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

import functools
import os
from typing import Optional, Union

import mlx.core as mx

from ._common import env_disabled

NAME = "paged_attention"
CPU_NAME = "paged_attention_cpu"
HEAD_DIMS = (64, 128)  # the kernels' head sizes; others take the twin
GROUP_SIZES = (32, 64, 128)
# Longest query chunk the CPU dispatch sends to the C++ primitive; longer prefill
# chunks would go to the twin (gather + BLAS sdpa). bench/kernel_paged.py found
# the kernel faster at every L measured (128 .. 2000, contexts 500 .. 2000, both
# head shapes; mlx_ray/kernels/README.md "paged_attention"), so no limit by default;
# MLX_RAY_PAGED_MAX_L sets one.
DEFAULT_MAX_L = 1 << 30
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

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


# ------------------------------------------------------------ validation

def _shape_problem(queries: mx.array, k_cache: Cache, v_cache: Cache, block_tables: mx.array,
                   context_lens: mx.array, block_size: int, bits: Optional[int], group_size: int) -> Optional[str]:
    """What is wrong with the arguments' shapes/dtypes (the contract), or None. Cheap: shapes only."""
    if queries.ndim != 4:
        return f"queries must be 4-D [B, Hq, L, D], got shape {queries.shape}"
    if queries.dtype not in _FLOATS:
        return f"queries must be float32, float16 or bfloat16, got {queries.dtype}"
    B, Hq, _, D = queries.shape
    if block_size <= 0:
        return f"block_size must be positive, got {block_size}"
    if bits is None:
        if not isinstance(k_cache, mx.array) or not isinstance(v_cache, mx.array):
            return "bits=None takes float caches (mx.array [S, Hkv, D]), not tuples"
        if k_cache.ndim != 3 or k_cache.shape[2] != D or v_cache.shape != k_cache.shape:
            return f"k_cache/v_cache must both be [S, Hkv, {D}], got {k_cache.shape} and {v_cache.shape}"
        S, Hkv = k_cache.shape[0], k_cache.shape[1]
    else:
        if bits not in (4, 8):
            return f"bits must be None, 4 or 8, got {bits}"
        if not (isinstance(k_cache, tuple) and isinstance(v_cache, tuple) and len(k_cache) == len(v_cache) == 3):
            return "quantized caches must be tuples (packed, scales, biases)"
        if group_size <= 0 or D % group_size:
            return f"group_size {group_size} must divide D = {D}"
        packed = k_cache[0]
        if packed.ndim != 3 or packed.shape[2] != D * bits // 32 or v_cache[0].shape != packed.shape:
            return f"packed caches must be [S, Hkv, {D * bits // 32}], got {packed.shape} and {v_cache[0].shape}"
        S, Hkv = packed.shape[0], packed.shape[1]
        want = (S, Hkv, D // group_size)
        if any(a.shape != want for a in (*k_cache[1:], *v_cache[1:])):
            return f"scales/biases must be {want}"
    if Hkv == 0 or Hq % Hkv:
        return f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})"
    if S % block_size:
        return f"the pool's slot count ({S}) must be a multiple of block_size ({block_size})"
    if block_tables.ndim != 2 or block_tables.shape[0] != B:
        return f"block_tables must be [B, MB] with B = {B}, got {block_tables.shape}"
    if context_lens.shape != (B,):
        return f"context_lens must be [B] with B = {B}, got {context_lens.shape}"
    return None


def _kernel_shape(queries: mx.array, k_cache: Cache, bits: Optional[int], group_size: int) -> bool:
    """Whether the C++ / Metal kernels take this (valid) problem; else the twin serves it."""
    if queries.shape[3] not in HEAD_DIMS:
        return False
    if bits is None:
        return k_cache.dtype == queries.dtype
    return group_size in GROUP_SIZES and k_cache[0].dtype == mx.uint32 and \
        k_cache[1].dtype == queries.dtype and k_cache[2].dtype == queries.dtype


# ------------------------------------------------------------ the CPU path

def _max_prefill_l() -> int:
    raw = os.environ.get("MLX_RAY_PAGED_MAX_L", "")
    try:
        return int(raw) if raw.strip() else DEFAULT_MAX_L
    except ValueError:
        return DEFAULT_MAX_L


@functools.lru_cache(maxsize=1)
def _cpu_verdict() -> tuple[bool, str, object]:
    """(ok, reason, ext): the extension is active, has the primitive and passed the self-test; computed once."""
    from . import qmm  # noqa: PLC0415 - the shared extension loader

    st = qmm.extension_state()
    if not st.active:
        return False, st.reason, None
    ext = st.ext
    if not hasattr(ext, "paged_attention"):
        return False, f"the installed extension predates paged_attention; {qmm._REBUILD_HINT}", None
    try:
        problem = _self_test(ext)
    except Exception as exc:  # noqa: BLE001 - any failure here means "do not use it"
        problem = f"self-test failed: {type(exc).__name__}: {exc}"
    if problem:
        return False, f"{problem}; {qmm._REBUILD_HINT}", None
    return True, "C++ primitive", ext


def _self_test(ext) -> Optional[str]:
    """A small ragged GQA problem (float32 and 8-bit, decode and a 3-token chunk) against the twin."""
    key = mx.random.key(7)
    k1, k2, k3 = mx.random.split(key, 3)
    D, Hkv, bs, nb = 64, 2, 16, 12
    k = mx.random.normal((nb * bs, Hkv, D), key=k1)
    v = mx.random.normal((nb * bs, Hkv, D), key=k2)
    bt = mx.array([[3, 0, 7, 1, 5], [9, 2, 11, 4, 6]], dtype=mx.int32)
    cl = mx.array([70, 17], dtype=mx.int32)

    def quant(x):
        w, s, b = mx.quantize(x.reshape(-1, D), group_size=32, bits=8)
        return w.reshape(nb * bs, Hkv, -1), s.reshape(nb * bs, Hkv, -1), b.reshape(nb * bs, Hkv, -1)

    worst = 0.0
    with mx.stream(mx.cpu):
        for L in (1, 3):
            q = mx.random.normal((2, 6, L, D), key=k3)
            for bits, kc, vc in ((None, k, v), (8, quant(k), quant(v))):
                want = twin(q, kc, vc, bt, cl, scale=0.125, block_size=bs, bits=bits, group_size=32)
                got = _call_ext(ext, q, kc, vc, bt, cl, 0.125, bs, bits, 32)
                worst = max(worst, mx.abs(got - want).max().item())
    return None if worst < 1e-4 else f"self-test mismatch ({worst:.3g})"


def _call_ext(ext, queries, k_cache, v_cache, block_tables, context_lens, scale, block_size, bits, group_size):
    bt = block_tables if block_tables.dtype == mx.int32 else block_tables.astype(mx.int32)
    cl = context_lens if context_lens.dtype == mx.int32 else context_lens.astype(mx.int32)
    kw = dict(scale=float(scale), block_size=int(block_size), stream=mx.cpu)
    if bits is None:
        return ext.paged_attention(queries, k_cache, v_cache, bt, cl, **kw)
    return ext.paged_attention(queries, k_cache[0], v_cache[0], bt, cl, k_cache[1], k_cache[2], v_cache[1],
                               v_cache[2], bits=bits, group_size=group_size, **kw)


def cpu_state() -> tuple[bool, str, object]:
    """(active, reason, ext) of the C++ primitive: built, self-tested, not switched off."""
    why = env_disabled(CPU_NAME)
    if why:
        return False, why, None
    active, reason, ext = _cpu_verdict()
    if active:
        limit = _max_prefill_l()
        reason = f"{reason}, {ext.paged_attention_isa()}, {ext.num_threads()} threads, " + \
            ("every L" if limit >= DEFAULT_MAX_L else f"L <= {limit} (longer chunks: the twin)")
    return active, reason, ext


def _cpu_ext():
    """The hot path's check (every layer of every step): the extension when the primitive may run now, else None.

    It never calls into the extension. ``cpu_state``'s description asks the pool for its thread
    count, which waits for the kernel running on MLX's CPU stream, and nanobind holds the GIL
    meanwhile: per layer, that stalled the next step's graph (and every other Python thread of
    the process) behind the current step's kernels.
    """
    if env_disabled(CPU_NAME):
        return None
    active, _, ext = _cpu_verdict()
    return ext if active else None


def cpu_paged_attention(queries, k_cache, v_cache, block_tables, context_lens, *, scale, block_size,
                        bits=None, group_size=64) -> mx.array:
    """The C++ primitive, whatever L (RuntimeError when it is unavailable, ValueError on a bad shape)."""
    ext = _cpu_ext()
    if ext is None:
        raise RuntimeError(f"{CPU_NAME} unavailable: {cpu_state()[1]}")
    problem = _shape_problem(queries, k_cache, v_cache, block_tables, context_lens, block_size, bits, group_size)
    if problem:
        raise ValueError(f"paged_attention: {problem}")
    return _call_ext(ext, queries, k_cache, v_cache, block_tables, context_lens, scale, block_size, bits, group_size)


# ---------------------------------------------------------- the Metal path

def _metal_verdict() -> tuple[bool, str]:
    try:
        from . import gate  # noqa: PLC0415
        from . import paged_attention_metal  # noqa: F401, PLC0415 - written alongside; may be absent
    except ImportError as exc:
        return False, f"Metal paged attention not available ({exc})"
    try:
        v = gate.latest(NAME) if env_disabled(NAME) is None else None
        if v is None:
            v = gate.verdict(NAME)
        return bool(v.enabled), v.reason
    except Exception as exc:  # noqa: BLE001 - not registered / not measurable: the twin serves
        return False, f"no Metal verdict for {NAME} ({type(exc).__name__}: {exc})"


def family(queries: mx.array) -> str:
    """The gate's family for this call: "decode" (one query a row) or "prefill" (a chunk)."""
    return "decode" if queries.shape[2] == 1 else "prefill"


def _metal_fn(fam: Optional[str] = None):
    try:
        from . import gate  # noqa: PLC0415
        if not gate.enabled(NAME, fam):
            return None
        from .paged_attention_metal import metal  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - ImportError, an unregistered kernel: the twin serves
        return None
    return metal


# ------------------------------------------------------------- dispatch

def choose(queries: mx.array, k_cache: Cache, bits: Optional[int] = None, group_size: int = 64) -> str:
    """Which version :func:`paged_attention` runs for this (valid) problem now: "cpu", "metal" or "twin"."""
    if not _kernel_shape(queries, k_cache, bits, group_size):
        return "twin"
    if mx.default_device() == mx.cpu:
        if queries.shape[2] > _max_prefill_l():
            return "twin"
        return "cpu" if _cpu_ext() is not None else "twin"
    return "metal" if _metal_fn(family(queries)) is not None else "twin"


def paged_attention(queries: mx.array, k_cache: Cache, v_cache: Cache, block_tables: mx.array,
                    context_lens: mx.array, *, scale: float, block_size: int, bits: Optional[int] = None,
                    group_size: int = 64, impl: Optional[str] = None) -> mx.array:
    """The dispatch: a verified kernel for this device and shape, else :func:`twin`.

    CPU: the C++ primitive when the extension is active and self-tested, not
    switched off (``MLX_RAY_KERNELS=0``, ``MLX_RAY_KERNELS_DISABLE=paged_attention_cpu``),
    D in :data:`HEAD_DIMS` and ``L <= MLX_RAY_PAGED_MAX_L`` (default
    :data:`DEFAULT_MAX_L`: longer prefill chunks are faster through the twin's
    BLAS gemm, see mlx_ray/kernels/README.md). GPU: ``paged_attention_metal.metal`` when
    ``gate.enabled("paged_attention", family)`` (decode or prefill, each with its own
    decision); if it raises, ``gate.call`` turns it off and raises ``gate.KernelFault``
    (this step fails, later ones take the twin). ``impl`` ("cpu", "metal", "twin") pins a
    version (tests, benchmarks). A malformed call raises ValueError.
    """
    problem = _shape_problem(queries, k_cache, v_cache, block_tables, context_lens, block_size, bits, group_size)
    if problem:
        raise ValueError(f"paged_attention: {problem}")
    chosen = impl is None
    impl = impl or choose(queries, k_cache, bits, group_size)
    kw = dict(scale=scale, block_size=block_size, bits=bits, group_size=group_size)
    if impl == "cpu":
        return cpu_paged_attention(queries, k_cache, v_cache, block_tables, context_lens, **kw)
    if impl == "metal":
        from .paged_attention_metal import metal  # noqa: PLC0415

        if chosen:  # the gate's kernel: one that raises is turned off and this step fails (gate.call)
            from . import gate  # noqa: PLC0415

            return gate.call(NAME, metal, queries, k_cache, v_cache, block_tables, context_lens, **kw)
        return metal(queries, k_cache, v_cache, block_tables, context_lens, **kw)
    if impl != "twin":
        raise ValueError(f"impl must be 'cpu', 'metal', 'twin' or None, not {impl!r}")
    return twin(queries, k_cache, v_cache, block_tables, context_lens, **kw)


def kernel_verified() -> tuple[bool, str]:
    """Whether a kernel (not the twin) serves this device, and why (not). The engine logs it; the paged
    cache runs either way (a rejected kernel's calls go to the twin, ``engine/backend.py``).

    CPU: the C++ primitive is active and passed its self-test against the twin
    (computed once; the switches are re-read on every call). GPU: the gate's
    verdict for "paged_attention". Cheap after the first call.
    """
    if mx.default_device() == mx.cpu:
        active, reason, _ = cpu_state()
        return active, reason
    return _metal_verdict()


def status() -> dict:
    """``{"name", "active", "reason", ...}`` for the CPU primitive (``mlx-ray doctor`` style)."""
    active, reason, ext = cpu_state()
    info = {"name": CPU_NAME, "active": active, "reason": reason}
    if ext is not None:
        info.update(isa=ext.paged_attention_isa(), threads=ext.num_threads(), max_l=_max_prefill_l())
    return info


def reset() -> None:
    """Forget the self-test verdict (after a rebuild or ``qmm.reset()``)."""
    _cpu_verdict.cache_clear()
