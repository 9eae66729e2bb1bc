"""The batched sampler (mlx_ray/kernels/sampler.py): twin vs C++ CPU primitive exactly, vs mlx-lm's filters, the
distribution (chi-square against an exact float64 reference), the emulated Metal kernel, the dispatch and
the engine's one-call-per-step path (seeded output the same alone and batched)."""

from __future__ import annotations

import asyncio
import math
import platform
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_ray.kernels import _common, sampler

FILTER_SETS = list(sampler.FILTERS)


@pytest.fixture(autouse=True)
def _cpu_default():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


EXPECTED_HERE = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def cpu_ext():
    ext = sampler._cpu_ext()
    if ext is None:
        if EXPECTED_HERE:  # built and verified on every Linux x86-64 machine: not having it is a failure
            pytest.fail(f"the C++ sampler is not active here: {sampler.status()['reason']}")
        pytest.skip(f"the C++ sampler is not built here: {sampler.status()['reason']}")
    return ext


def isas(ext):
    return [isa for isa in ("avx2", "base") if ext.sampler_force_isa(isa)]


# ------------------------------------------------------------------ exactness

def edge_cases() -> list[tuple[str, tuple]]:
    rng = np.random.default_rng(7)
    out = []

    def add(label, x, t, k, tp, mp, u):
        B = x.shape[0]
        full = [np.broadcast_to(np.asarray(v, dt), (B,)).copy()
                for v, dt in zip((t, k, tp, mp, u), (np.float32, np.int32, np.float32, np.float32, np.float32))]
        out.append((label, (mx.array(x.astype(np.float32)), *(mx.array(a) for a in full))))

    x = rng.standard_normal((6, 300)).astype(np.float32) * 3
    us = np.array([0.0, 1e-9, 0.25, 0.5, 0.999999, sampler._UMAX], np.float32)
    add("V=1", rng.standard_normal((3, 1)), 0.7, 0, 0.9, 0.1, [0.0, 0.5, 0.99])
    add("V=2 ties", np.zeros((3, 2)), 1.0, 1, 0.5, 0.0, [0.0, 0.49, 0.99])
    add("k >= V is off", x, 0.7, 300, 1.0, 0.0, us)
    add("k = V-1", x, 0.7, 299, 1.0, 0.0, us)
    add("top_k 1", x, 0.7, 1, 1.0, 0.0, us)
    add("top_p tiny", x, 0.7, 0, 1e-7, 0.0, us)
    add("top_p 0", x, 0.7, 0, 0.0, 0.0, us)
    add("top_p just below 1", x, 0.7, 0, np.nextafter(np.float32(1), np.float32(0)), 0.0, us)
    add("top_p above 1 is off", x, 0.7, 0, 1.5, 0.0, us)
    add("min_p 1", x, 1.0, 0, 1.0, 1.0, us)
    add("min_p above 1 is clamped", x, 1.0, 0, 1.0, 3.0, us)
    add("min_p near 1", x, 1.0, 0, 1.0, 0.9999, us)
    add("min_p tiny", x, 1.0, 0, 1.0, 1e-30, us)
    add("u outside [0, 1) is clamped", x, 1.0, 5, 0.9, 0.0, [-1.0, 1.0, 2.0, np.nan, 0.0, 0.5])
    add("hot and cold temperatures", x, [1e-3, 0.05, 1.0, 10.0, 1e4, 0.7], 0, 0.95, 0.0, us)
    ties = np.round(x * 2) / 2
    add("ties, top_k inside a tie group", ties, 0.9, 17, 1.0, 0.0, us)
    add("ties, top_p", ties, 0.9, 0, 0.7, 0.0, us)
    add("ties at the max", np.where(ties >= ties.max(axis=1, keepdims=True) - 1, ties.max(axis=1, keepdims=True), ties),
        1.0, 2, 0.3, 0.5, us)
    zeros = x.copy()
    zeros[:, ::7] = 0.0
    zeros[:, 3::7] = -0.0
    add("signed zeros", zeros, 1.0, 10, 0.9, 0.0, us)
    neg = x.copy()
    neg[rng.random(neg.shape) < 0.6] = -np.inf
    add("-inf logits", neg, 1.3, 20, 0.9, 0.01, us)
    one = np.full((3, 50), -np.inf, np.float32)
    one[:, 17] = 2.0
    add("one finite logit", one, 0.7, 5, 0.5, 0.2, [0.0, 0.5, 0.99])
    add("no finite logit -> 0", np.full((2, 20), -np.inf), 0.7, 0, 0.9, 0.0, [0.3, 0.7])
    add("huge logits", x * 1e30, 1.0, 0, 0.9, 0.0, us)
    add("tiny spread", 5.0 + x * 1e-6, 1.0, 0, 0.5, 0.0, us)
    return out


def random_cases() -> list:
    cases = []
    for seed in range(24):
        V = [257, 1000, 4099, 64][seed % 4]
        kw = [{}, {"ties": True}, {"neg_inf": 0.5}, {"dtype": mx.bfloat16}, {"dtype": mx.float16},
              {"scale": 0.2}, {"scale": 15.0}][seed % 7]
        cases.append(sampler.make_case(9, V, seed=seed, **kw))
    # Large vocabularies in every regime of the top-p cut-offs (flat, LM-like, peaked).
    for seed, scale in enumerate((0.5, 2.0, 4.0, 8.0)):
        cases.append(sampler.make_case(7, 49152, seed=100 + seed, scale=scale))
    cases.append(sampler.make_case(4, 151936, seed=200, scale=2.5, filters=("top_p", "all", "topk_minp", "temp")))
    return cases


def test_twin_and_cpu_agree_exactly_on_random_and_edge_cases():
    ext = cpu_ext()
    cases = [(c.label, c.args) for c in random_cases()] + edge_cases()
    wants = [sampler.twin(*args) for _, args in cases]
    for isa in isas(ext):
        assert ext.sampler_force_isa(isa)
        try:
            for (label, args), want in zip(cases, wants):
                got = sampler.sample(*args, impl="cpu")
                assert sampler.check(got, want) is None, f"[{isa}] {label}: {sampler.check(got, want)}"
        finally:
            ext.sampler_force_isa("auto")
    assert wants[-4].tolist() == [17] * 3  # one finite logit
    assert wants[-3].tolist() == [0, 0]  # no finite logit


def test_strided_broadcast_and_non_f32_logits_read_in_place_or_converted():
    cpu_ext()
    base = sampler.make_case(5, 700, seed=3)
    x, *rest = base.args
    wide = mx.concatenate([x, x * 0.5], axis=1)[:, :700]  # a strided view
    assert sampler.check(sampler.sample(wide, *rest, impl="cpu"), sampler.twin(wide, *rest)) is None
    row = mx.broadcast_to(x[:1], (5, 700))  # row stride 0
    assert sampler.check(sampler.sample(row, *rest, impl="cpu"), sampler.twin(row, *rest)) is None
    for dt in (mx.float16, mx.bfloat16):
        assert sampler.check(sampler.sample(x.astype(dt), *rest, impl="cpu"), sampler.twin(x.astype(dt), *rest)) is None
    # Python scalars broadcast to every row.
    got = sampler.sample(x, 0.7, 40, 0.9, 0.05, 0.5, impl="cpu")
    assert got.dtype == mx.int32 and got.shape == (5,)
    assert sampler.check(got, sampler.twin(x, 0.7, 40, 0.9, 0.05, 0.5)) is None


def test_contract_errors_are_plain():
    with pytest.raises(ValueError, match="2-D"):
        sampler.sample(mx.zeros((4,)), 1.0, 0, 1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(mx.zeros((2, 8)), mx.ones((3,)), 0, 1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="float32"):
        sampler.sample(mx.zeros((2, 8), dtype=mx.int32), 1.0, 0, 1.0, 0.0, 0.5)


def test_cpu_exp_is_mlx_exp_bit_for_bit():
    """The sampler's exp (both builds, vector lanes and scalar tails) equals mx.exp on the CPU."""
    ext = cpu_ext()
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.exponential(8.0, 1 << 20), rng.uniform(-89, 0, 1 << 20),
                        [0.0, -0.0, -88.0, -88.00001, -87.99999, -np.inf, 1.0, 88.0, 89.0, np.inf],
                        -np.ldexp(1.0, -rng.integers(1, 140, 4096))]).astype(np.float32)
    x = mx.array(x[: len(x) - 3])  # an odd length: scalar tails too
    want = np.array(mx.exp(x)).view(np.uint32)
    for isa in isas(ext):
        ext.sampler_force_isa(isa)
        try:
            assert np.array_equal(np.array(ext.mlx_exp(x)).view(np.uint32), want), isa
        finally:
            ext.sampler_force_isa("auto")


def test_kept_set_is_mlx_lms_chain_top_p_then_min_p_then_top_k():
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    rng = np.random.default_rng(0)
    for _ in range(150):
        V = int(rng.choice([100, 1000, 5000]))
        x = (rng.standard_normal(V) * rng.choice([0.5, 2, 5])).astype(np.float32)  # no ties
        lp = mx.array(x)[None] - mx.logsumexp(mx.array(x)[None], axis=-1, keepdims=True)
        tp, mp, k = float(rng.choice([1.0, 0.5, 0.9, 0.95])), float(rng.choice([0, 0.01, 0.1])), int(rng.choice([0, 1, 10, 50]))
        ref = lp
        if 0 < tp < 1:
            ref = apply_top_p(ref, tp)
        if mp > 0:
            ref = apply_min_p(ref, mp)
        if k > 0:
            ref = apply_top_k(ref, k)
        want = np.isfinite(np.array(ref[0]))
        got = np.array(sampler.twin_parts(lp, 1.0, k, tp, mp, 0.5)["kept"][0])
        assert np.array_equal(got, want), (V, tp, mp, k)


# ------------------------------------------------------------- distribution

def exact_distribution(x: np.ndarray, T: float, k: int, top_p: float, min_p: float) -> np.ndarray:
    """The filtered, renormalized distribution of one row in float64 by sorting (mlx-lm's definitions)."""
    x = x.astype(np.float64)
    V = x.size
    m = x.max()
    p = np.exp(x - m)
    xs = np.sort(x)
    ps = np.exp(xs - m)
    thr = -np.inf
    if 0 < top_p < 1:
        above = p.sum() - np.cumsum(ps)
        dropped = int((above >= top_p * p.sum()).sum())
        thr = max(thr, xs[dropped])
    if 0 < k < V:
        thr = max(thr, xs[V - k])
    kept = (x >= thr) & ((min_p <= 0) | (p >= min_p))
    w = np.where(kept, np.exp((x - m) / T), 0.0)
    return w / w.sum()


def chi2_sf(stat: float, dof: int) -> float:
    """P(chi2_dof >= stat): scipy when installed, else the regularized upper incomplete gamma function."""
    try:
        from scipy.stats import chi2

        return float(chi2.sf(stat, dof))
    except ImportError:
        return _gamma_q(dof / 2.0, stat / 2.0)


def _gamma_q(a: float, x: float) -> float:
    if x <= 0:
        return 1.0
    lg = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        n = a
        for _ in range(10000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(lg))
    b, c, d = x + 1 - a, 1e300, 1.0 / (x + 1 - a)  # Lentz's continued fraction for Q
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h * math.exp(lg)


def test_chi2_fallback_matches_scipy():
    import scipy.stats as scipy_stats  # in the dev extra: a missing scipy is a failure, not a skip
    for stat, dof in ((3.0, 5), (50.0, 40), (120.0, 80), (0.5, 1), (900.0, 1000)):
        assert _gamma_q(dof / 2, stat / 2) == pytest.approx(float(scipy_stats.chi2.sf(stat, dof)), rel=1e-6, abs=1e-12)


def _dist_rows():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(200) * 2).astype(np.float32)
    ties = (np.round(rng.standard_normal(200) * 2) / 2).astype(np.float32)
    near = (rng.standard_normal(200) * 2 - 10).astype(np.float32)
    near[:4] = [0.0, -1e-4, -2e-4, -3e-4]  # p within 0.9997 of the max: kept by min_p 0.999
    near[4] = -0.005  # p = 0.995: dropped
    neg = x.copy()
    neg[rng.random(200) < 0.5] = -np.inf
    return {
        "temperature only (top_p = 1)": (x, 0.7, 0, 1.0, 0.0),
        "top_p 0.9": (x, 0.7, 0, 0.9, 0.0),
        "top_k 40 + min_p 0.05": (x, 0.7, 40, 1.0, 0.05),
        "top_k + top_p + min_p": (x, 1.3, 20, 0.8, 0.02),
        "temperature 1, top_p 0.95": (x, 1.0, 0, 0.95, 0.0),
        "min_p near 1": (near, 1.0, 0, 1.0, 0.999),
        "ties: top_k 10 inside a tie group": (ties, 0.9, 10, 1.0, 0.0),
        "ties: top_p 0.6": (ties, 1.0, 0, 0.6, 0.0),
        "-inf logits": (neg, 1.5, 0, 0.95, 0.0),
        "top_k 1": (x, 0.7, 1, 1.0, 0.0),
    }


@pytest.mark.parametrize("name", list(_dist_rows()))
def test_token_frequencies_match_the_exact_filtered_distribution(name):
    x, T, k, tp, mp = _dist_rows()[name]
    N = 40000
    probs = exact_distribution(x, T, k, tp, mp)
    kept = probs > 0
    rows = mx.broadcast_to(mx.array(x)[None], (N, x.size))
    u = np.random.default_rng(abs(hash(name)) % 2**32).random(N, dtype=np.float32)
    parts = sampler.twin_parts(rows[:1], T, k, tp, mp, 0.5)
    assert np.array_equal(np.array(parts["kept"][0]) & np.isfinite(x), kept), "the float64 reference's kept set differs"
    toks = np.array(sampler.sample(rows, T, k, tp, mp, mx.array(u)))
    counts = np.bincount(toks, minlength=x.size)
    assert counts[~kept].sum() == 0, f"sampled filtered-out tokens {np.nonzero(counts * ~kept)[0][:5]}"
    if name == "ties: top_k 10 inside a tie group":
        assert kept.sum() > 10  # every token tied with the 10th stays
    if kept.sum() == 1:
        assert counts[kept][0] == N
        return
    expected = probs[kept] * N
    obs = counts[kept]
    small = expected < 5  # pool the rare tokens into one bin
    exp_b = np.append(expected[~small], expected[small].sum()) if small.any() else expected
    obs_b = np.append(obs[~small], obs[small].sum()) if small.any() else obs
    stat = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    p = chi2_sf(stat, len(exp_b) - 1)
    assert p > 1e-4, f"chi-square {stat:.1f} on {len(exp_b) - 1} dof: p = {p:.2g}"


def test_inverse_cdf_is_in_token_id_order():
    """Equal weights split [0, 1) into equal intervals in token-id order."""
    x = mx.array(np.zeros((8, 4), np.float32))
    u = mx.array(np.array([0.0, 0.24, 0.25, 0.49, 0.5, 0.74, 0.75, 0.99], np.float32))
    assert sampler.sample(x, 1.0, 0, 1.0, 0.0, u).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sampler.twin(x, 1.0, 0, 1.0, 0.0, u).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# ------------------------------------------------------ Metal (emulated)

def test_metal_kernel_under_the_emulator_matches_the_twin():
    import mlx_ray.kernels.metal_emu  # noqa: F401  shipped with the package: a hard import
    cases = sampler.cases("emulate") + [sampler.make_case(6, 2053, seed=9, ties=True, filters=("top_p", "all"))]
    for case in cases:
        with _common.emulate():
            got = sampler.metal_sample(*case.args)
        assert sampler.check(got, sampler.twin(*case.args)) is None, case.label


def test_metal_kernel_is_registered_with_its_cases():
    spec = _common.get("sampler")
    assert spec.twin is sampler.twin and spec.cpu_fn is sampler.cpu_sample and spec.metal_fn is sampler.metal_sample
    labels = [c.label for c in spec.cases("device")]
    assert any("V=151936" in label and "B=32" in label for label in labels)
    assert spec.tolerance.startswith("exact")


# ------------------------------------------------------------- dispatch

def test_dispatch_cpu_then_switches_then_twin(monkeypatch):
    cpu_ext()
    monkeypatch.delenv("MLX_RAY_KERNELS", raising=False)
    monkeypatch.delenv("MLX_RAY_KERNELS_DISABLE", raising=False)
    assert sampler.choose() == "cpu"  # no Metal here: the gate says no, the CPU primitive serves
    monkeypatch.setenv("MLX_RAY_KERNELS_DISABLE", "qmm_cpu,sampler_cpu")
    assert sampler.choose() == "twin"
    monkeypatch.setenv("MLX_RAY_KERNELS_DISABLE", "")
    monkeypatch.setenv("MLX_RAY_KERNELS", "0")
    assert sampler.choose() == "twin"
    monkeypatch.setenv("MLX_RAY_KERNELS", "1")
    calls = []
    monkeypatch.setattr(sampler, "_cpu_ext", lambda: None)  # extension missing
    monkeypatch.setattr(sampler, "twin", lambda *a: calls.append("twin") or mx.zeros((1,), mx.int32))
    assert sampler.choose() == "twin"
    sampler.sample(mx.zeros((1, 4)), 1.0, 0, 1.0, 0.0, 0.5)
    assert calls == ["twin"]


def test_gate_rejects_a_wrong_sampler_and_the_twin_serves():
    """The gate forced on the CPU ("fake Metal"): an off-by-one sampler never passes."""
    from mlx_ray.kernels import gate

    def off_by_one(*args):
        return mx.minimum(sampler.twin(*args) + 1, args[0].shape[1] - 1)

    dev = gate.Device("fake-metal-sampler", metal=True, mx_device=mx.cpu)
    v = gate.evaluate(sampler.SPEC, dev, cases=sampler.cases("emulate"), fast_fn=off_by_one, warmup=1, reps=1)
    assert not v.enabled and "differ" in v.reason
    ok = gate.evaluate(sampler.SPEC, dev, cases=sampler.cases("emulate")[:2], fast_fn=sampler.twin, warmup=1, reps=1)
    assert all(r.get("problem") is None for r in ok.cases)


# ---------------------------------------------------------------- engine

def test_sample_rows_batched_equals_alone_and_greedy_rows_argmax():
    from mlx_ray.engine import sampling
    from mlx_ray.engine.protocol import SamplingParams

    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.2, top_k=5, min_p=0.05, seed=2), SamplingParams(temperature=0.7, seed=3)]
    rng = np.random.default_rng(0)
    steps = [mx.array(rng.standard_normal((4, 500)).astype(np.float32) * 3) for _ in range(6)]
    batch = [sampling.make_sampler(p) for p in params]
    assert batch[1] is sampling.greedy_sampler
    got = [sampling.sample_rows(lp, batch).tolist() for lp in steps]
    alone = [sampling.make_sampler(p) for p in params]
    for i, s in enumerate(alone):
        mine = [s(lp[i:i + 1]).item() for lp in steps]
        assert mine == [g[i] for g in got], f"row {i}"
    assert [g[1] for g in got] == [int(mx.argmax(lp[1]).item()) for lp in steps]
    assert len({tuple(g[0] for g in got), tuple(g[3] for g in got)}) == 2
    # A batch of sampled rows only, in another order: each row still follows its own key.
    again = [sampling.make_sampler(params[i]) for i in (3, 0)]
    got2 = [sampling.sample_rows(lp[mx.array([3, 0])], again).tolist() for lp in steps]
    assert [g[0] for g in got2] == [g[3] for g in got] and [g[1] for g in got2] == [g[0] for g in got]


def test_engine_samples_batched_and_alone_alike_and_greedy_neighbours_stay_exact(engine_f32, mlxlm_greedy):
    from fixtures_engine import collect, make_request, run_async

    ids = engine_f32.encode_chat([{"role": "user", "content": "Invent a name for a dragon."}])
    france = engine_f32.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    sampled = [dict(temperature=0.7, top_p=0.9), dict(temperature=0.7, top_k=40, min_p=0.05), dict(temperature=1.0)]
    alone = [run_async(collect(engine_f32, make_request(f"smp-alone-{i}", ids, max_tokens=10, seed=11 + i, **kw)))[0]
             for i, kw in enumerate(sampled)]

    async def together():
        reqs = [collect(engine_f32, make_request(f"smp-b-{i}", ids, max_tokens=10, seed=11 + i, **kw))
                for i, kw in enumerate(sampled)]
        reqs.append(collect(engine_f32, make_request("smp-greedy", france, max_tokens=12)))
        return await asyncio.gather(*reqs)

    outs = run_async(together())
    assert [o[0] for o in outs[:3]] == alone
    assert outs[3][0] == mlxlm_greedy(france, 12)
