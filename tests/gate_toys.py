"""Toy kernel specs for the gate's tests, importable by the gate's child process (``KernelSpec.ref``).

Each toy's "Metal path" misbehaves in one known way, in whatever process runs
it: it segfaults (as a GPU fault aborts an MLX process), aborts, hangs, is
wrong, is slow, or is right and fast (its twin made slow). The twin is
``x * 2 + 1``. A toy's source hash is its name's, so every toy has its own
cache key. ``paged_toy`` / ``sampler_toy`` wrap the real twins of the
engine's kernels under the real names, with a faulty "Metal path".
"""

from __future__ import annotations

import hashlib
import os
import signal
import time

import mlx.core as mx

from mlx_ray.kernels import _common
from mlx_ray.kernels import paged_attention as pa
from mlx_ray.kernels import sampler
from mlx_ray.kernels._common import Case, KernelSpec


class Source:
    """What the gate reads of a Metal kernel: its name and source hash."""

    def __init__(self, name: str):
        self.name = f"mlx_ray_toy_{name}"
        self.source_hash = hashlib.sha256(name.encode()).hexdigest()


def twin(x):
    return x * 2 + 1


def slow(fn, seconds=0.004):
    def run(*a, **k):
        out = fn(*a, **k)
        mx.eval(out)
        time.sleep(seconds)
        return out
    return run


def segv(*_a, **_k):
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(5)


def abort(*_a, **_k):
    os.abort()


def hang(*_a, **_k):
    time.sleep(3600)


def check(out, ref):
    err = _common.max_abs_err(out, ref)
    return None if err <= 1e-6 else f"max err {err:.3g}"


def cases(kind):
    return [Case("n=64", (mx.arange(64, dtype=mx.float32),)), Case("n=256", (mx.arange(256, dtype=mx.float32),))]


def toy(name: str, fast, twin_fn=twin, case_fn=cases) -> KernelSpec:
    return KernelSpec(name=f"toy_{name}", metal=Source(name), metal_fn=fast, twin=twin_fn, cpu_fn=None,
                      cases=case_fn, tolerance="max abs err 1e-6", check=check, ref=f"gate_toys:{name.upper()}")


SEGV = toy("segv", segv)
ABORT = toy("abort", abort)
HANG = toy("hang", hang)
WRONG = toy("wrong", lambda x: x * 2)
SLOW = toy("slow", slow(twin))
FAST = toy("fast", twin, twin_fn=slow(twin))


# ---------------------------------------------- the engine's kernels, faulty

def _paged_cases(kind):
    from mlx_ray.kernels import paged_attention_metal as pm

    return [pm.make_case(2, 4, 2, 64, [20, 9], dtype=mx.float32, seed=1, label="tiny")]


def _sampler_cases(kind):
    return [sampler.make_case(2, 300, seed=1)]


def paged_toy(kind: str, fast) -> KernelSpec:
    """A spec called "paged_attention" whose Metal path is ``fast``, with the real twin and tiny cases."""
    from mlx_ray.kernels import paged_attention_metal as pm

    return KernelSpec(name=pa.NAME, metal=Source(f"paged_{kind}"), metal_fn=fast, twin=pa.twin, cpu_fn=None,
                      cases=_paged_cases, tolerance=pm.TOLERANCE, check=pm.check,
                      model_cases=lambda shapes: _paged_cases("device"), ref=f"gate_toys:PAGED_{kind.upper()}")


def sampler_toy(kind: str, fast) -> KernelSpec:
    return KernelSpec(name=sampler.NAME, metal=Source(f"sampler_{kind}"), metal_fn=fast, twin=sampler.twin,
                      cpu_fn=None, cases=_sampler_cases, tolerance="exact", check=sampler.check,
                      model_cases=lambda shapes: _sampler_cases("device"), ref=f"gate_toys:SAMPLER_{kind.upper()}")


PAGED_SEGV = paged_toy("segv", segv)
SAMPLER_HANG = sampler_toy("hang", hang)
