"""The batched sampler: one call over ``[B, V]`` logits with per-row temperature, top-k, top-p and min-p.

Contract (the twin, the C++ CPU primitive and the Metal kernel alike)::

    sample(logits [B, V] float, temperature [B], top_k [B] int32, top_p [B], min_p [B],
           uniforms [B] float32 in [0, 1)) -> tokens [B] int32

``temperature > 0`` on every row (greedy rows never come here: the engine
argmaxes them); ``top_k = 0``, ``top_p >= 1`` and ``min_p = 0`` switch a filter
off. The random draw is an input, so the three versions can be compared
exactly: the same kept set and the same token.

Semantics, per row (m = the max logit, p_i = exp(l_i - m) in float32, the
filters at temperature 1 as in mlx-lm):

* masses are exact integers: ``q_i = floor(p_i * 2**40)`` (p_i in units of
  2^-40, exact for p_i >= 2^-16; below that truncated), summed in uint64;
* **top_p** keeps the logits ``>= t_p``, t_p = the smallest logit value v whose
  mass strictly above, ``sum(q_j : l_j > v)``, is ``< top_p * total``; top_p is
  taken as ``ceil(top_p * 2**24) / 2**24`` (exact for top_p >= 0.5) and the
  comparison is done in integers. This is mlx-lm's ``apply_top_p`` (drop
  tokens from the bottom of the sorted row while the mass above them is
  ``>= top_p * total``; every token tied with the threshold stays) in exact
  arithmetic;
* **top_k** keeps the logits ``>= t_k``, t_k = the k-th largest logit counting
  ties: **every token tied with the k-th is kept** (so more than k tokens may
  survive; mlx-lm's ``argpartition`` picks arbitrarily among them);
* **min_p** keeps ``p_i >= min_p`` (mlx-lm: ``l_i >= m + log(min_p)``; the same
  set in exact arithmetic);
* the order is mlx-lm's ``make_sampler`` chain, top_p -> min_p -> top_k. Each
  filter keeps an upper set of the logits and never drops the max, so the
  chain equals the intersection of the three filters computed on the full
  row, which is what all three versions compute;
* then temperature: ``w_i = floor(exp((l_i - m) * (1 / T)) * 2**40)`` on the
  kept tokens (0 elsewhere), ``S = sum(w)``, ``u32 = floor(u * 2**32)``,
  ``target = floor(S * u32 / 2**32)``, and the token is the smallest id with
  ``w_0 + ... + w_i > target``: inverse-CDF sampling over the kept,
  renormalized probabilities in token-id order;
* ``-inf`` logits have weight 0 and are never sampled; a row with no finite
  logit returns 0; NaN and +inf logits are not supported.

Because every decision is made on exact integers and on float32 values that
each version computes with the same IEEE operations (``exp`` is MLX's own on
the CPU, ``metal::precise::exp`` as MLX's Metal ``exp``), the versions agree
bit for bit, whatever their summation order.

Versions: :func:`twin` sorts (it is the reference); ``qmm_cpu/sampler.cpp``
(thread pool over rows, a radix select over the logits' float keys, no sort)
and ``sampler.metal`` (one threadgroup per row, 4-bit radix digits over
threadgroup reductions) never sort. :func:`sample` dispatches: the Metal kernel
when ``gate`` enables it, else the CPU primitive on the CPU (built and not
switched off by ``MLX_RAY_KERNELS=0`` / ``MLX_RAY_KERNELS_DISABLE=sampler_cpu``),
else the twin.
"""

from __future__ import annotations

import functools
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import _common, production
from ._common import Case, KernelSpec, MetalKernel

NAME = "sampler"
FAMILY = "sample"  # the gate's one family for the sampler (production.sampler_cases)
CPU_NAME = "sampler_cpu"
MAX_VOCAB = 1 << 20  # the integer masses stay inside uint64 up to here
THREADS = 256  # per threadgroup (one row each); any multiple of 32 up to 1024 works
_TWO40 = float(2**40)
_TWO32 = float(2**32)
_TWO24 = float(2**24)
_UMAX = float(np.nextafter(np.float32(1), np.float32(0)))

KERNEL = MetalKernel(
    name="mlx_ray_sampler",
    input_names=["logits", "inv_t", "top_k", "tp24", "min_p", "u32", "n_vocab"],
    output_names=["tokens"],
    source_file=Path(__file__).with_name("sampler.metal"),
)


# ----------------------------------------------------------- the parameters

def as_rows(logits: mx.array, temperature, top_k, top_p, min_p, uniforms):
    """The contract's arrays from arrays or Python scalars/lists (broadcast to [B], the contract's dtypes)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (B, V), got shape {logits.shape}")
    if logits.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if not 1 <= logits.shape[1] <= MAX_VOCAB:
        raise ValueError(f"V must be in [1, {MAX_VOCAB}], got {logits.shape[1]}")
    B = logits.shape[0]

    def row(v, dtype, what):
        a = v if isinstance(v, mx.array) else mx.array(v, dtype=dtype)
        if a.ndim == 0:
            a = mx.broadcast_to(a, (B,))
        if a.shape != (B,):
            raise ValueError(f"{what} must have shape ({B},), got {a.shape}")
        return a.astype(dtype) if a.dtype != dtype else a

    return (logits, row(temperature, mx.float32, "temperature"), row(top_k, mx.int32, "top_k"),
            row(top_p, mx.float32, "top_p"), row(min_p, mx.float32, "min_p"),
            row(uniforms, mx.float32, "uniforms"))


def derived(temperature: mx.array, top_p: mx.array, min_p: mx.array, uniforms: mx.array):
    """(inv_t, tp24, min_p, u32): the per-row values every version computes with (exact MLX ops).

    inv_t = 1 / T; tp24 = clip(ceil(top_p * 2^24), 1, 2^24) (0: top_p off, i.e.
    top_p >= 1); min_p clamped to <= 1 (0: off); u32 = floor(u * 2^32) with u
    clamped to [0, 1) (NaN -> 0). ``qmm_cpu/sampler.cpp`` derives them the same way.
    """
    inv_t = 1.0 / temperature
    tp24 = mx.where(top_p < 1.0, mx.clip(mx.ceil(top_p * _TWO24), 1.0, _TWO24), 0.0).astype(mx.uint32)
    mp = mx.where(min_p > 0.0, mx.minimum(min_p, 1.0), 0.0)
    u = mx.where(uniforms >= 0.0, mx.minimum(uniforms, _UMAX), 0.0)
    u32 = mx.floor(u * _TWO32).astype(mx.uint32)
    return inv_t, tp24, mp, u32


# ----------------------------------------------------------------- the twin

def twin(logits, temperature, top_k, top_p, min_p, uniforms) -> mx.array:
    """The reference: vectorized over the batch, sorts each row (see the module docstring)."""
    return twin_parts(logits, temperature, top_k, top_p, min_p, uniforms)["tokens"]


def twin_parts(logits, temperature, top_k, top_p, min_p, uniforms) -> dict:
    """The twin's intermediate results: ``kept`` [B, V] bool, ``weights`` [B, V] uint64, ``tokens`` [B]."""
    logits, temperature, top_k, top_p, min_p, uniforms = as_rows(logits, temperature, top_k, top_p, min_p, uniforms)
    B, V = logits.shape
    inv_t, tp24, mp, u32 = derived(temperature, top_p, min_p, uniforms)
    x = logits.astype(mx.float32)
    m = x.max(axis=-1, keepdims=True)
    d = x - m
    p = mx.exp(d)
    q = mx.floor(p * _TWO40).astype(mx.uint64)
    total = q.sum(axis=-1, keepdims=True)

    order = mx.argsort(x, axis=-1)  # ascending
    xs = mx.take_along_axis(x, order, axis=-1)
    qs = mx.take_along_axis(q, order, axis=-1)
    above = total - mx.cumsum(qs, axis=-1)  # mass strictly above each sorted position
    tp = tp24.astype(mx.uint64)[:, None]
    C = tp * (total >> 24) + ((tp * (total & 0xFFFFFF) + 0xFFFFFF) >> 24)
    dropped = (above >= C).sum(axis=-1, keepdims=True).astype(mx.int32)  # < V: the top position has 0 above
    neg_inf = mx.array(-np.inf, dtype=mx.float32)
    t_p = mx.where((tp24 > 0)[:, None], mx.take_along_axis(xs, mx.minimum(dropped, V - 1), axis=-1), neg_inf)
    k = top_k[:, None]
    k_on = (k > 0) & (k < V)
    t_k = mx.where(k_on, mx.take_along_axis(xs, mx.clip(V - k, 0, V - 1), axis=-1), neg_inf)
    thr = mx.maximum(t_p, t_k)

    mpc = mp[:, None]
    kept = (x >= thr) & ((mpc <= 0.0) | (p >= mpc))
    w = mx.where(kept, mx.floor(mx.exp(d * inv_t[:, None]) * _TWO40), 0.0).astype(mx.uint64)
    S = w.sum(axis=-1, keepdims=True)
    u = u32.astype(mx.uint64)[:, None]
    target = (S >> 32) * u + (((S & 0xFFFFFFFF) * u) >> 32)
    tok = mx.argmax(mx.cumsum(w, axis=-1) > target, axis=-1).astype(mx.int32)
    return {"kept": kept, "weights": w, "tokens": mx.where(m[:, 0] == -np.inf, 0, tok).astype(mx.int32)}


# ------------------------------------------------------------ the CPU path

def cpu_state():
    """(active, reason, ext): whether the C++ primitive can run here."""
    from . import qmm  # noqa: PLC0415 - the shared extension loader

    why = _common.env_disabled(CPU_NAME)
    if why:
        return False, why, None
    st = qmm.extension_state()
    if not st.active:
        return False, st.reason, None
    if not hasattr(st.ext, "sample"):
        return False, f"the installed extension predates the sampler; {qmm._REBUILD_HINT}", None
    return True, f"C++ primitive, {st.ext.num_threads()} threads", st.ext


def cpu_sample(logits, temperature, top_k, top_p, min_p, uniforms) -> mx.array:
    """The C++ CPU primitive (a CPU stream; RuntimeError if it is not available)."""
    ext = _cpu_ext() if _common.env_disabled(CPU_NAME) is None else None  # cpu_state() would ask the pool
    if ext is None:
        raise RuntimeError(f"{CPU_NAME} unavailable: {cpu_state()[1]}")
    args = as_rows(logits, temperature, top_k, top_p, min_p, uniforms)
    if mx.default_device() == mx.cpu:
        return ext.sample(*args)
    return ext.sample(*args, stream=mx.cpu)


def status() -> dict:
    """``{"name", "active", "reason"}`` for the CPU primitive (``mlx-ray doctor`` style)."""
    active, reason, _ = cpu_state()
    return {"name": CPU_NAME, "active": active, "reason": reason}


# ---------------------------------------------------------- the Metal path

def metal_sample(logits, temperature, top_k, top_p, min_p, uniforms) -> mx.array:
    """The Metal kernel: one threadgroup of :data:`THREADS` threads per row."""
    logits, temperature, top_k, top_p, min_p, uniforms = as_rows(logits, temperature, top_k, top_p, min_p, uniforms)
    B, V = logits.shape
    inv_t, tp24, mp, u32 = derived(temperature, top_p, min_p, uniforms)
    (tokens,) = KERNEL(
        inputs=[logits, inv_t, top_k, tp24, mp, u32, mx.array(V, dtype=mx.uint32)],
        output_shapes=[(B,)], output_dtypes=[mx.int32],
        grid=(THREADS * B, 1, 1), threadgroup=(THREADS, 1, 1))
    return tokens


# ------------------------------------------------------------- dispatch

def choose() -> str:
    """Which version :func:`sample` runs now: "metal", "cpu" or "twin" (see the module docstring)."""
    from . import gate  # noqa: PLC0415 - gate imports the registry, which imports us

    if _common.metal_available() and gate.enabled(NAME, FAMILY):
        return "metal"
    if mx.default_device() == mx.cpu and _common.env_disabled(CPU_NAME) is None and _cpu_ext() is not None:
        return "cpu"
    return "twin"


def sample(logits, temperature, top_k, top_p, min_p, uniforms, *, impl: str | None = None) -> mx.array:
    """One call for the whole batch: the Metal kernel if the gate enables it, else the CPU primitive, else the twin.

    ``impl`` pins a version ("metal", "cpu", "twin") for tests and benchmarks.
    """
    chosen = impl is None
    impl = impl or choose()
    if impl == "metal" and chosen:  # the gate's kernel: one that raises is turned off, this step fails
        from . import gate  # noqa: PLC0415

        return gate.call(NAME, metal_sample, logits, temperature, top_k, top_p, min_p, uniforms)
    if impl == "cpu":
        ext = _cpu_ext()
        if ext is not None:
            args = as_rows(logits, temperature, top_k, top_p, min_p, uniforms)
            return ext.sample(*args) if mx.default_device() == mx.cpu else ext.sample(*args, stream=mx.cpu)
    fn = {"metal": metal_sample, "cpu": cpu_sample, "twin": twin}[impl]
    return fn(logits, temperature, top_k, top_p, min_p, uniforms)


@functools.lru_cache(maxsize=1)
def _cpu_ext():
    """The extension module when it can sample here (switches aside), else None; computed once."""
    from . import qmm  # noqa: PLC0415

    st = qmm.extension_state()
    return st.ext if st.active and hasattr(st.ext, "sample") else None


def reset() -> None:
    """Forget whether the CPU primitive loaded (after a rebuild or ``qmm.reset()``)."""
    _cpu_ext.cache_clear()


# ------------------------------------------------------ the spec's cases

FILTERS = {  # (temperature, top_k, top_p, min_p)
    "temp": (0.7, 0, 1.0, 0.0),
    "top_p": (0.7, 0, 0.9, 0.0),
    "topk_minp": (0.7, 40, 1.0, 0.05),
    "all": (1.3, 20, 0.8, 0.02),
    "t1_top_p": (1.0, 0, 0.95, 0.0),
    "top_k1": (0.9, 1, 1.0, 0.0),
    "min_p_near_1": (1.0, 0, 1.0, 0.999),
}


def make_case(B: int, V: int, *, seed: int = 0, ties: bool = False, neg_inf: float = 0.0,
              dtype=mx.float32, filters: tuple[str, ...] | None = None, scale: float = 3.0) -> Case:
    """Random logits (normal * scale; ``ties``: rounded to a coarse grid; ``neg_inf``: that fraction set to -inf)
    and per-row filters cycling through ``filters`` (default: all of :data:`FILTERS`)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((B, V)) * scale).astype(np.float32)
    if ties:
        x = np.round(x * 2) / 2
    if neg_inf:
        x[rng.random((B, V)) < neg_inf] = -np.inf
        x[np.arange(B), rng.integers(0, V, B)] = rng.standard_normal(B).astype(np.float32)  # >= 1 finite per row
    names = filters or tuple(FILTERS)
    rows = [FILTERS[names[b % len(names)]] for b in range(B)]
    t, k, tp, mp = (np.array(c, dtype=dt) for c, dt in zip(zip(*rows), (np.float32, np.int32, np.float32, np.float32)))
    u = rng.random(B).astype(np.float32)
    if B > 2:
        u[0], u[-1] = 0.0, _UMAX
    label = f"B={B} V={V}" + (" ties" if ties else "") + (f" -inf {neg_inf:g}" if neg_inf else "") + \
        ("" if dtype == mx.float32 else f" {dtype}".replace("mlx.core.", ""))
    return Case(label, (mx.array(x).astype(dtype), mx.array(t), mx.array(k), mx.array(tp), mx.array(mp), mx.array(u)))


def cases(kind: str) -> list[Case]:
    if kind == "emulate":
        return [make_case(7, 257, seed=1), make_case(7, 1000, seed=2, ties=True),
                make_case(7, 1000, seed=3, neg_inf=0.3), make_case(4, 257, seed=4, dtype=mx.bfloat16),
                make_case(3, 1000, seed=5, neg_inf=0.999)]
    if kind == "device":
        out = [make_case(B, V, seed=B + V, dtype=dt) for V in (49152, 151936) for B in (1, 16, 32)
               for dt in (mx.float32, mx.bfloat16)]
        for c in out:
            c.family = FAMILY
        return out
    raise ValueError(f"unknown case kind {kind!r} (emulate, device)")


def check(outputs, reference) -> str | None:
    got, want = _common.as_list(outputs)[0], _common.as_list(reference)[0]
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    diff = np.nonzero(np.array(got) != np.array(want))[0]
    if diff.size:
        r = int(diff[0])
        return f"{diff.size} of {got.size} tokens differ (row {r}: {int(got[r].item())} vs {int(want[r].item())})"
    return None


SPEC = KernelSpec(name=NAME, metal=KERNEL, metal_fn=metal_sample, twin=twin, cpu_fn=cpu_sample, cases=cases,
                  tolerance="exact: the same token on every row", check=check,
                  model_cases=production.sampler_cases)  # the engine's vocabulary, logits dtype, batch widths
