"""mlx_ray/kernels/gate.py: the on-device verdict, forced on the CPU.

There is no Metal device here, so the tests mock exactly one thing: the device
(``gate.Device("fake-metal", metal=True, mx_device=mx.cpu)``). Everything else
is the real gate: it runs the "fast" function and the twin, compares them with
the spec's check, times both, decides, caches and dispatches. The "fast"
functions are deliberately wrong, slow (a sleep) or right and fast (the twin
made slow by a sleep), so each verdict path is taken for a known reason.
"""

from __future__ import annotations

import json
import time

import mlx.core as mx
import pytest

from mlx_ray.kernels import _common, gate, skinny_qmm
from mlx_ray.kernels._common import Case, KernelSpec, MetalKernel

FAKE = gate.Device("fake-metal", metal=True, mx_device=mx.cpu)


pytestmark = pytest.mark.usefixtures("clean_gate")  # tests/fixtures_kernels.py


def _twin(x):
    return x * 2 + 1


def _slow(fn, seconds=0.004):
    def slow(*a, **k):
        out = fn(*a, **k)
        mx.eval(out)
        time.sleep(seconds)
        return out
    return slow


def _check(out, ref):
    err = _common.max_abs_err(out, ref)
    return None if err <= 1e-6 else f"max err {err:.3g}"


def _spec(tmp_path, fast, twin=_twin, source="out[0] = 1;", name="toy"):
    src = tmp_path / f"{name}.metal"
    src.write_text(source)
    calls = {"twin": 0, "fast": 0}

    def counted(fn, key):
        def f(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return f

    spec = KernelSpec(name=name, metal=MetalKernel(name, ["x"], ["out"], src), metal_fn=counted(fast, "fast"),
                      twin=counted(twin, "twin"), cpu_fn=None,
                      cases=lambda kind: [Case("n=64", (mx.arange(64, dtype=mx.float32),)),
                                          Case("n=256", (mx.arange(256, dtype=mx.float32),))],
                      tolerance="max abs err 1e-6", check=_check)
    spec.calls = calls
    return spec


def test_no_metal_here_means_off_and_stock_path():
    assert not _common.metal_available()
    v = gate.verdict("skinny_qmm")
    assert (v.enabled, v.reason) == (False, "no Metal device") and v.device.startswith("cpu:")
    assert not gate.enabled("skinny_qmm")
    case = skinny_qmm.cases("emulate")[0]
    x, w, s, b = case.args
    got = skinny_qmm.quantized_matmul(x, w, s, b, **case.kwargs)
    want = mx.quantized_matmul(x, w, s, b, transpose=True, **case.kwargs)
    assert mx.array_equal(got, want).item()


def test_mismatch_is_not_enabled_logged_and_dispatch_gives_the_twin(tmp_path, caplog):
    spec = _spec(tmp_path, fast=lambda x: x * 2)  # off by one everywhere
    with caplog.at_level("WARNING", logger="mlx_ray.kernels.gate"):
        v = gate.verdict(spec, device=FAKE)
    assert not v.enabled and v.reason.startswith("mismatch on n=64: max err 1")
    assert "toy" in caplog.text and "mismatch" in caplog.text
    x = mx.linspace(-3, 3, 50)
    assert mx.array_equal(gate.dispatch(spec, x), _twin(x)).item()
    assert not gate.enabled("toy")


def test_a_crashing_kernel_is_not_enabled(tmp_path):
    def boom(x):
        raise RuntimeError("kernel exploded")
    v = gate.verdict(_spec(tmp_path, fast=boom), device=FAKE)
    assert not v.enabled and "failed: RuntimeError: kernel exploded" in v.reason


def test_correct_but_slower_is_not_enabled(tmp_path):
    spec = _spec(tmp_path, fast=_slow(_twin))
    v = gate.verdict(spec, device=FAKE)
    assert not v.enabled and v.reason.startswith("slower than the twin")
    assert v.max_err == 0.0 and v.speedup < 1 and len(v.cases) == 2
    x = mx.arange(8, dtype=mx.float32)
    before = spec.calls["fast"]
    assert mx.array_equal(gate.dispatch(spec, x), _twin(x)).item() and spec.calls["fast"] == before


def test_correct_and_faster_is_enabled_and_dispatched(tmp_path):
    spec = _spec(tmp_path, fast=_twin, twin=_slow(_twin))
    v = gate.verdict(spec, device=FAKE)
    assert v.enabled and "median speed-up all" in v.reason and "over 2 cases" in v.reason and v.speedup > 1
    assert all(r["speedup"] > 1 for r in v.cases) and v.kernel_ms < v.twin_ms
    before = spec.calls["fast"]
    gate.dispatch(spec, mx.arange(4, dtype=mx.float32))
    assert spec.calls["fast"] == before + 1
    assert gate.enabled("toy")


def test_one_noisy_case_does_not_refuse_the_median_decides(tmp_path):
    """One slow (launch-bound, noisy) case of five: the family's median is still fast, so the kernel is on."""
    def mixed(x):  # fast everywhere but on n=256
        return _slow(_twin, 0.006)(x) if x.size == 256 else _twin(x)
    sizes = (64, 128, 256, 512, 1024)
    spec = _spec(tmp_path, fast=mixed, twin=_slow(_twin, 0.002))
    spec.cases = lambda kind: [Case(f"n={n}", (mx.arange(n, dtype=mx.float32),)) for n in sizes]
    v = gate.verdict(spec, device=FAKE)
    assert v.enabled, v.reason
    slow_row = next(r for r in v.cases if r["label"] == "n=256")
    assert slow_row["speedup"] < 1 and v.families["all"]["speedup"] > 1.05 and "n=256" in v.families["all"]["slowest"]


def test_families_decide_separately_and_dispatch_asks_its_family(tmp_path):
    """Fast on "decode" cases, slow on "prefill" ones: on for decode, the twin for prefill."""
    def mixed(x):
        return _slow(_twin, 0.006)(x) if x.size >= 1000 else _twin(x)
    spec = _spec(tmp_path, fast=mixed, twin=_slow(_twin, 0.002))
    spec.cases = lambda kind: [Case(f"n={n}", (mx.arange(n, dtype=mx.float32),), family=fam)
                               for fam, sizes in (("decode", (8, 16, 32)), ("prefill", (1000, 2000, 3000)))
                               for n in sizes]
    v = gate.verdict(spec, device=FAKE)
    assert v.enabled and v.families["decode"]["enabled"] and not v.families["prefill"]["enabled"], v.families
    assert "twin for prefill" in v.reason
    assert gate.enabled("toy", "decode") and not gate.enabled("toy", "prefill")
    assert not gate.enabled("toy", "never-measured")  # a family the gate did not check: the twin


def test_the_margin_on_the_median():
    """A median speed-up under 1 + margin keeps the twin (the decision itself, no timing noise)."""
    rows = [{"label": f"c{i}", "family": "decode", "kernel_ms": 1.0, "twin_ms": s, "speedup": s, "max_err": 0.0}
            for i, s in enumerate((1.03, 1.04, 0.5, 1.03, 9.0))]
    base = dict(name="toy", device="fake-metal", mlx=mx.__version__, source_hash="x")
    assert not gate._decide(rows, base, margin=0.05).enabled
    assert gate._decide(rows, base, margin=0.02).enabled
    assert gate._decide(rows, base, margin=0.05).families["decode"]["speedup"] == 1.03


def test_cache_hit_then_keyed_by_source_device_and_mlx(tmp_path, monkeypatch):
    spec = _spec(tmp_path, fast=_twin, twin=_slow(_twin))
    first = gate.verdict(spec, device=FAKE)
    assert first.enabled and not first.cached
    n = spec.calls["twin"]
    gate.reset()
    second = gate.verdict(spec, device=FAKE)
    assert second.cached and second.enabled and spec.calls["twin"] == n  # nothing measured again
    assert second.reason == first.reason and second.source_hash == spec.source_hash
    data = json.loads(gate.cache_path().read_text())
    key = gate.cache_key(spec, FAKE)
    assert key in data and "fake-metal" in key and mx.__version__ in key and spec.source_hash in key
    assert data[key]["enabled"] is True and "cached" not in data[key]

    changed = _spec(tmp_path, fast=_twin, twin=_slow(_twin), source="out[0] = 2;")
    assert changed.source_hash != spec.source_hash
    assert not gate.verdict(changed, device=FAKE).cached and changed.calls["twin"] > 0
    assert not gate.verdict(spec, device=gate.Device("other-metal", True, mx.cpu)).cached
    monkeypatch.setattr(mx, "__version__", "0.0.1-test")
    assert not gate.verdict(spec, device=FAKE).cached
    assert len(json.loads(gate.cache_path().read_text())) == 4  # merged, not overwritten
    monkeypatch.undo()


def test_model_shapes_join_the_key():
    spec = skinny_qmm.SPEC
    a = gate.cache_key(spec, FAKE, {(4096, 4096, 4, 64, "float16")})
    b = gate.cache_key(spec, FAKE, {(4096, 11008, 4, 64, "float16")})
    assert a != b != gate.cache_key(spec, FAKE) and a.startswith(gate.cache_key(spec, FAKE))


def test_a_corrupt_cache_is_measured_again_and_rewritten(tmp_path):
    gate.cache_path().parent.mkdir(parents=True)
    gate.cache_path().write_text("{not json")
    spec = _spec(tmp_path, fast=_twin, twin=_slow(_twin))
    assert not gate.verdict(spec, device=FAKE).cached
    assert gate.cache_key(spec, FAKE) in json.loads(gate.cache_path().read_text())
    assert not list(gate.cache_path().parent.glob(".verdicts.*"))  # no temp file left behind


def test_test_hooks_are_never_cached(tmp_path):
    spec = _spec(tmp_path, fast=_twin, twin=_slow(_twin))
    gate.verdict(spec, device=FAKE, fast_fn=lambda x: x)
    gate.verdict(spec, device=FAKE, cases=[Case("one", (mx.ones(3),))])
    assert not gate.cache_path().exists()


def test_switches_win_over_a_good_verdict(tmp_path, monkeypatch):
    spec = _spec(tmp_path, fast=_twin, twin=_slow(_twin))
    assert gate.verdict(spec, device=FAKE).enabled
    monkeypatch.setenv("MLX_RAY_KERNELS_DISABLE", "toy")
    assert not gate.enabled("toy")  # dispatch re-reads the switches on every call
    v = gate.verdict(spec, device=FAKE)
    assert not v.enabled and "MLX_RAY_KERNELS_DISABLE" in v.reason
    monkeypatch.delenv("MLX_RAY_KERNELS_DISABLE")
    monkeypatch.setenv("MLX_RAY_KERNELS", "0")
    v = gate.verdict(spec, device=FAKE)
    assert not v.enabled and v.reason == "disabled by MLX_RAY_KERNELS=0"
    assert mx.array_equal(gate.dispatch(spec, mx.ones(2)), _twin(mx.ones(2))).item()


# ---------------------------------------- measured in a child: faults of every kind

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import gate_toys as toys  # noqa: E402
from mlx_ray.errors import EngineFault  # noqa: E402
from mlx_ray.kernels import gate_child, verdict_cache  # noqa: E402


def _launches():
    return len(gate_child.LAUNCHES)


@pytest.mark.parametrize("spec, reason", [
    (toys.SEGV, "crashed during measurement (SIGSEGV, case n=64)"),
    (toys.ABORT, "crashed during measurement (SIGABRT, case n=64)"),  # what MLX does on a failed command buffer
])
def test_a_kernel_that_kills_its_process_is_a_remembered_failure(spec, reason):
    n = _launches()
    v = gate.verdict(spec, device=FAKE)  # this process survives: the kernel ran in a child
    assert (v.enabled, v.reason) == (False, reason) and not v.cached
    assert _launches() == n + 1
    gate.reset()
    again = gate.verdict(spec, device=FAKE)  # a restart: the cache answers, nothing is measured again
    assert (again.enabled, again.reason, again.cached) == (False, reason, True)
    assert _launches() == n + 1
    assert not gate.enabled(spec.name)
    x = mx.arange(5, dtype=mx.float32)
    assert mx.array_equal(gate.dispatch(spec, x), toys.twin(x)).item()  # the twin serves; no crash here


def test_a_hanging_kernel_times_out_and_is_not_measured_again():
    n = _launches()
    t0 = time.monotonic()
    v = gate.verdict(toys.HANG, device=FAKE, case_timeout_s=2)
    assert time.monotonic() - t0 < 30
    assert (v.enabled, v.reason) == (False, "timed out after 2 s (case n=64)")
    gate.reset()
    assert gate.verdict(toys.HANG, device=FAKE, case_timeout_s=2).cached and _launches() == n + 1


def test_the_whole_run_has_a_timeout_too():
    v = gate.verdict(toys.HANG, device=FAKE, timeout_s=1.5, case_timeout_s=60)
    assert v.reason == "timed out after 2 s (case n=64)" and not v.enabled  # 1.5 s, rounded in the reason


@pytest.mark.parametrize("spec, start", [(toys.WRONG, "mismatch on n=64: max err 1"),
                                         (toys.SLOW, "slower than the twin: median speed-up all")])
def test_wrong_and_slow_kernels_in_the_child(spec, start):
    n = _launches()
    v = gate.verdict(spec, device=FAKE)
    assert not v.enabled and v.reason.startswith(start), v.reason
    assert _launches() == n + 1 and len(v.cases) >= 1


def test_a_good_kernel_measured_in_the_child_is_dispatched_here():
    n = _launches()
    v = gate.verdict(toys.FAST, device=FAKE)
    assert v.enabled and v.families["all"]["enabled"] and _launches() == n + 1, v.reason
    x = mx.arange(3, dtype=mx.float32)
    assert mx.array_equal(gate.dispatch(toys.FAST, x), toys.twin(x)).item()


def test_registered_kernels_are_measured_in_a_child(monkeypatch):
    """The production path: a registered spec (no ref) goes to the child by name."""
    n = _launches()
    v = gate.verdict("sampler", device=FAKE, model_shapes={(300, "float32", 2)})
    assert _launches() == n + 1 and gate_child.LAUNCHES[-1] == "sampler"
    # Custom Metal kernels cannot run on the CPU: the real kernel fails in the child, the twin serves.
    assert not v.enabled and v.reason.startswith("mismatch on") and "failed" in v.reason, v.reason
    assert [r["label"] for r in v.cases] == ["B=1 V=300"]  # the production variant, not the Mac matrix


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_pending_marker_of_a_dead_process_becomes_a_failure():
    key = gate.cache_key(toys.FAST, FAKE)
    marker = verdict_cache.pending(600.0)
    verdict_cache.put(key, {**marker, "pid": _dead_pid()})
    n = _launches()
    v = gate.verdict(toys.FAST, device=FAKE)  # a good kernel, but its last measurement killed its process
    assert not v.enabled and v.reason.startswith("crashed during measurement (process ") and _launches() == n
    assert json.loads(gate.cache_path().read_text())[key]["reason"] == v.reason  # remembered
    gate.reset()
    assert gate.verdict(toys.FAST, device=FAKE).cached and _launches() == n


def test_a_pending_marker_past_its_deadline_becomes_a_timeout():
    key = gate.cache_key(toys.FAST, FAKE)
    marker = verdict_cache.pending(60.0)
    old = marker["started"] - 3600
    verdict_cache.put(key, {**marker, "pid": os.getppid(), "started": old, "deadline": old + 60})  # alive, hung
    n = _launches()
    v = gate.verdict(toys.FAST, device=FAKE)
    assert not v.enabled and v.reason.startswith("timed out after 60 s") and _launches() == n


def test_a_live_measurement_elsewhere_is_waited_for_not_repeated(tmp_path):
    key = gate.cache_key(toys.FAST, FAKE)
    verdict_cache.put(key, {**verdict_cache.pending(600.0), "pid": os.getppid()})
    done = gate.Verdict("toy_fast", True, "measured by the other process", device=FAKE.name)

    import threading
    threading.Timer(0.6, lambda: gate._write_cache(key, done)).start()
    n = _launches()
    v = gate.verdict(toys.FAST, device=FAKE)
    assert v.cached and v.reason == "measured by the other process" and _launches() == n


def _gate_children(cache_dir: str) -> list[int]:
    """Pids of gate children whose environment points at ``cache_dir`` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if b"mlx_ray.kernels.gate_child" in cmd and f"MLX_RAY_KERNEL_CACHE={cache_dir}".encode() in env:
            out.append(int(d.name))
    return out


def test_a_parent_killed_while_measuring_leaves_a_marker_the_next_process_turns_into_a_failure():
    """The replica itself dies mid-measurement (kill -9): its child goes too, and the next start records the
    failure instead of measuring (and dying) again."""
    cache_dir = os.environ["MLX_RAY_KERNEL_CACHE"]
    code = ("import mlx.core as mx, gate_toys; from mlx_ray.kernels import gate; "
            "gate.verdict(gate_toys.HANG, device=gate.Device('fake-metal', True, mx.cpu), case_timeout_s=600)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    key = gate.cache_key(toys.HANG, FAKE)
    deadline = time.monotonic() + 60
    while not (verdict_cache.is_pending(verdict_cache.get(key)) and _gate_children(cache_dir)):
        assert time.monotonic() < deadline and parent.poll() is None, "the measurement never started"
        time.sleep(0.1)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _gate_children(cache_dir):  # the orphaned child notices and exits
        assert time.monotonic() < deadline, "the measuring child outlived its parent"
        time.sleep(0.1)
    n = _launches()
    v = gate.verdict(toys.HANG, device=FAKE)
    assert v.reason.startswith(f"crashed during measurement (process {parent.pid} died") and _launches() == n


# ------------------------------------------------------------ failures at run time

def _flaky(tmp_path):
    """A kernel that is right and fast while measured, then raises (a run-time fault)."""
    state = {"broken": False}

    def fast(x):
        if state["broken"]:
            raise RuntimeError("[metal_kernel] Command buffer execution failed: page fault")
        return _twin(x)
    spec = _spec(tmp_path, fast=fast, twin=_slow(_twin))
    return spec, state


def test_a_kernel_that_fails_at_run_time_is_turned_off_and_the_twin_serves(tmp_path):
    spec, state = _flaky(tmp_path)
    assert gate.verdict(spec, device=FAKE).enabled
    state["broken"] = True
    x = mx.arange(6, dtype=mx.float32)
    with pytest.raises(gate.KernelFault, match="kernel toy failed .*page fault") as err:
        gate.dispatch(spec, x)  # the request that hit it gets an error
    assert isinstance(err.value, EngineFault) and err.value.kernel == "toy"
    assert not gate.enabled("toy") and "page fault" in gate.failed()["toy"]
    before = spec.calls["fast"]
    assert mx.array_equal(gate.dispatch(spec, x), _twin(x)).item() and spec.calls["fast"] == before  # the twin
    entry = json.loads(gate.cache_path().read_text())[gate.cache_key(spec, FAKE)]
    assert entry["enabled"] is False and entry["failed_at_runtime"] and entry["reason"].startswith("failed at run time")
    gate.reset()  # the next process: off from the cache, still reported, never measured again
    twin_calls = spec.calls["twin"]
    v = gate.verdict(spec, device=FAKE)
    assert v.cached and not v.enabled and spec.calls["twin"] == twin_calls and "toy" in gate.failed()


def test_blame_marks_the_kernel_a_failed_step_names(tmp_path):
    spec = toys.FAST
    assert gate.verdict(spec, device=FAKE).enabled
    assert gate.blame(RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory "
                                   "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")) == []
    assert gate.enabled("toy_fast")  # an out-of-memory is not the kernel's fault
    assert gate.blame(RuntimeError("[custom_kernel] mlx_ray_toy_fast: compile error")) == ["toy_fast"]
    assert not gate.enabled("toy_fast") and "compile error" in gate.failed()["toy_fast"]


def test_a_gpu_fault_that_names_no_kernel_blames_the_enabled_ones(tmp_path):
    spec, _ = _flaky(tmp_path)
    assert gate.verdict(spec, device=FAKE).enabled
    assert gate.verdict(toys.SLOW, device=FAKE).enabled is False
    named = gate.blame(RuntimeError("[METAL] Command buffer execution failed: Caused GPU Address Fault Error "
                                    "(0000000b:kIOGPUCommandBufferCallbackErrorPageFault)"))
    assert named == ["toy"] and not gate.enabled("toy") and set(gate.failed()) == {"toy"}


def test_the_guarded_backend_blames_and_reports(tmp_path):
    from mlx_ray.engine import backend as kv_backend

    class Backend:
        def step(self):
            raise RuntimeError("[custom_kernel] mlx_ray_toy_fast failed")

        def stats(self):
            return {"kv_cache": "paged"}

    assert gate.verdict(toys.FAST, device=FAKE).enabled
    b = kv_backend.guard(Backend())
    assert b.stats() == {"kv_cache": "paged", "kernels_failed": {}}
    with pytest.raises(RuntimeError, match="mlx_ray_toy_fast"):  # the step still fails (the scheduler fails the batch)
        b.step()
    assert not gate.enabled("toy_fast") and list(b.stats()["kernels_failed"]) == ["toy_fast"]


# ------------------------------------------------- the production variants

class _Qwen32BStub:
    """What production.py reads of a loaded Qwen2.5-32B-Instruct-AWQ: its attention's 40 query heads and its
    logits (152,064 wide, float16). Its 8 KV heads x 128 come from the layer shapes, as the engine probes them."""

    def named_modules(self):
        from types import SimpleNamespace
        return [("model.layers.0.self_attn", SimpleNamespace(n_heads=40, n_kv_heads=8))]

    def make_cache(self):
        return []

    def __call__(self, tokens, cache=None):
        return mx.zeros((1, tokens.shape[1], 152064), dtype=mx.float16)


def test_the_gate_checks_the_variants_production_dispatches():
    from mlx_ray.engine.kv_pool import LayerShape
    from mlx_ray.engine.protocol import EngineConfig
    from mlx_ray.kernels import paged_attention_metal as pm
    from mlx_ray.kernels import production
    from mlx_ray.kernels import sampler as smp

    cfg = EngineConfig(kv_bits=None)
    model = _Qwen32BStub()
    shapes = production.paged_shapes(model, cfg, [LayerShape(8, 128)] * 2, mx.float16)
    assert shapes == {(40, 8, 128, "float16", 32, 0, 32, 512, 16, cfg.max_model_len or 4608)}
    cases = gate.cases_for(pm.SPEC, shapes)  # exactly these, not the Mac matrix
    for c in cases:
        q, k, _, tables, lens = c.args
        assert (q.shape[1], q.shape[3], k.shape[1], q.dtype) == (40, 128, 8, mx.float16)
        assert c.kwargs["block_size"] == 32 and c.kwargs["bits"] is None
        assert c.family == ("decode" if q.shape[2] == 1 else "prefill")
    prefill = [c.args[0].shape for c in cases if c.family == "prefill"]
    assert (1, 40, 512, 128) in prefill and max(s[0] * s[2] for s in prefill) == 768  # chunks of 512-768 tokens
    assert {c.args[0].shape[0] for c in cases if c.family == "decode"} == {1, 8, 16}  # up to max_num_seqs rows

    q8 = production.paged_shapes(model, EngineConfig(kv_bits=8), [LayerShape(8, 128)], mx.float16)
    c = gate.cases_for(pm.SPEC, q8)[0]
    assert c.kwargs["bits"] == 8 and c.kwargs["group_size"] == 32 and c.args[1][1].shape[-1] == 128 // 32
    assert gate.cache_key(pm.SPEC, FAKE, q8) != gate.cache_key(pm.SPEC, FAKE, shapes)

    s_shapes = production.sampler_shapes(model, cfg)
    assert s_shapes == {(152064, "float16", 16)}
    s_cases = gate.cases_for(smp.SPEC, s_shapes)
    assert {(c.args[0].shape[1], c.args[0].dtype) for c in s_cases} == {(152064, mx.float16)}
    assert {c.family for c in s_cases} == {"sample"}

    layers = {(5120, 5120, 4, 128, "float16"), (27648, 5120, 4, 128, "float16")}
    q_cases = gate.cases_for(skinny_qmm.SPEC, layers)
    assert {c.family for c in q_cases} == {"rows8", "rows16", "rows32"}
    assert {(c.args[1].shape[0], c.args[0].shape[1], c.kwargs["group_size"]) for c in q_cases} == \
        {(5120, 5120, 128), (27648, 5120, 128)}


def test_a_kernel_the_engine_cannot_check_is_off_not_measured_later(monkeypatch):
    from mlx_ray.engine.protocol import EngineConfig
    from mlx_ray.kernels import production

    def broken(model, cfg):
        raise RuntimeError("no logits")
    monkeypatch.setattr(production, "sampler_shapes", broken)
    n = _launches()
    out = production.check(_Qwen32BStub(), EngineConfig(), None, None, device=FAKE)
    assert not out["sampler"].enabled and "no logits" in out["sampler"].reason
    assert not gate.enabled("sampler") and _launches() == n  # the twin; no lazy measurement from a step
