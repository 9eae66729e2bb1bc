"""The per-target convert lock (mlx_ray/conversion/publish.py): breaking a stale lock is exclusive.

The race test runs real processes: each round plants a stale lock (a dead pid on
this host, or a silent holder on another host), then lets N processes loose on
it at once. Each holder proves it is alone by ``O_EXCL``-creating a marker file
inside its critical section, and logs monotonic enter/exit times; the test
asserts that no marker ever existed twice and that no two holds overlap.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlx_ray.conversion.publish import STALE_AFTER, TargetLock
from mlx_ray.errors import Conflict

WORKERS = 6
ROUNDS = 40

# LOCK_MODULE may name another file with a TargetLock in it (used to show the race on the old lock).
WORKER = textwrap.dedent("""
    import importlib.util, os, sys, time
    from pathlib import Path
    d, idx, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    if os.environ.get("LOCK_MODULE"):
        spec = importlib.util.spec_from_file_location("lockmod", os.environ["LOCK_MODULE"])
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    else:
        import mlx_ray.conversion.publish as mod
    target = d / "m" / "q4-g64"
    log = open(d / f"log-{idx}", "a", buffering=1)
    for r in range(rounds):
        while not (d / f"go-{r}").exists():
            time.sleep(0.0005)
        lock = mod.TargetLock(target, wait=60, poll=0.002)
        lock.acquire()
        t0 = time.monotonic()
        try:
            fd = os.open(d / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            alone = 1
        except FileExistsError:
            alone = 0
        time.sleep(0.003)
        if alone:
            os.unlink(d / "inside")
        t1 = time.monotonic()
        lock.release()
        log.write(f"{r} {idx} {t0!r} {t1!r} {alone}\\n")
        (d / f"done-{r}-{idx}").touch()
""")


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _plant_stale(lock: Path, r: int) -> None:
    if r % 2 == 0:  # a converter on this host that died
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": time.time()}))
    else:  # a converter on another node whose heartbeat stopped long ago
        lock.write_text(json.dumps({"host": "other-node", "pid": 4242, "time": 0, "token": os.urandom(16).hex()}))
        old = time.time() - STALE_AFTER - 30
        os.utime(lock, (old, old))


def race(d: Path, workers: int = WORKERS, rounds: int = ROUNDS, env: dict | None = None) -> list[tuple]:
    """Run the race; return the holds as (round, worker, enter, exit, alone)."""
    (d / "m").mkdir(parents=True)
    lock = d / "m" / ".q4-g64.lock"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(d), str(i), str(rounds)],
                              env={**os.environ, **(env or {})}, stderr=open(d / f"err-{i}", "w"))
             for i in range(workers)]
    try:
        for r in range(rounds):
            _plant_stale(lock, r)
            (d / f"go-{r}").touch()
            deadline = time.monotonic() + 60
            while len(list(d.glob(f"done-{r}-*"))) < workers:
                for i, p in enumerate(procs):
                    assert p.poll() in (None, 0), (d / f"err-{i}").read_text()[-2000:]
                assert time.monotonic() < deadline, f"round {r} did not finish"
                time.sleep(0.002)
            assert not lock.exists(), f"round {r}: the last holder left its lock behind"
    finally:
        for p in procs:
            p.wait(timeout=30)
    holds = []
    for i in range(workers):
        for line in (d / f"log-{i}").read_text().splitlines():
            r, w, t0, t1, alone = line.split()
            holds.append((int(r), int(w), float(t0), float(t1), int(alone)))
    return holds


def overlaps(holds: list[tuple]) -> list[tuple]:
    holds = sorted(holds, key=lambda h: h[2])
    return [(a, b) for a, b in zip(holds, holds[1:]) if b[2] < a[3]] + [(h, h) for h in holds if not h[4]]


def test_waiters_that_all_see_a_stale_lock_never_both_proceed(tmp_path):
    t = time.monotonic()
    holds = race(tmp_path)
    assert sorted((r, w) for r, w, *_ in holds) == [(r, w) for r in range(ROUNDS) for w in range(WORKERS)]
    assert overlaps(holds) == []
    leftovers = [p.name for p in (tmp_path / "m").iterdir()]
    assert leftovers == [], leftovers  # no lock, no break claim left behind
    assert time.monotonic() - t < 30


def test_fresh_lock_fails_naming_holder_and_stale_breaks(tmp_path):
    target = tmp_path / "m" / "q4-g64"
    target.parent.mkdir()
    with TargetLock(target, wait=0) as held:
        info = json.loads(held.path.read_text())
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid() and len(info["token"]) == 32
        with pytest.raises(Conflict, match=f"being converted by {socket.gethostname()} pid {os.getpid()}"):
            TargetLock(target, wait=0).acquire()
    assert not held.path.exists()
    # Same host, dead pid: stale at once.
    held.path.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": time.time()}))
    with TargetLock(target, wait=0):
        assert json.loads(held.path.read_text())["pid"] == os.getpid()
    assert list(target.parent.iterdir()) == []


def test_release_never_removes_a_successors_lock(tmp_path):
    """A holder that stalled, was judged stale and overtaken must not delete the new holder's lock on release."""
    target = tmp_path / "m" / "q4-g64"
    target.parent.mkdir()
    a = TargetLock(target, wait=0).acquire()
    successor = json.dumps({"host": "other-node", "pid": 7, "time": time.time(), "token": "b" * 32})
    os.unlink(a.path)  # what a breaker does, by its claim ...
    a.path.write_text(successor)  # ... and then the next holder's O_EXCL create
    a.release()
    assert a.path.read_text() == successor


def test_a_breaker_that_died_mid_break_does_not_block_the_target(tmp_path):
    """A claim ``<lock>.break-<key>`` left by a dead breaker is itself stale and is cleared the same way."""
    target = tmp_path / "m" / "q4-g64"
    target.parent.mkdir()
    lock = target.parent / ".q4-g64.lock"
    token = "c" * 32
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": 0, "token": token}))
    claim = target.parent / f".q4-g64.lock.break-{token}"
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": 0, "token": "d" * 32}))
    with TargetLock(target, wait=0):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert list(target.parent.iterdir()) == []


def test_live_breaker_claim_from_another_host_is_waited_for_not_removed(tmp_path, monkeypatch):
    monkeypatch.setattr("mlx_ray.conversion.publish.BREAK_GRACE", 0.5)
    target = tmp_path / "m" / "q4-g64"
    target.parent.mkdir()
    lock = target.parent / ".q4-g64.lock"
    token = "e" * 32
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": 0, "token": token}))
    claim = target.parent / f".q4-g64.lock.break-{token}"
    claim.write_text(json.dumps({"host": "other-node", "pid": 9, "time": time.time(), "token": "f" * 32}))
    with pytest.raises(Conflict, match="being broken by another process"):
        TargetLock(target, wait=0).acquire()  # waits its grace, then names the stuck break
    assert claim.exists() and lock.exists()


def test_filelock_lease_cannot_break_a_stale_lease_on_nfs(tmp_path, monkeypatch):
    """Why the lock is not filelock's SoftFileLease: it breaks a stale marker only by renameat2(RENAME_EXCHANGE).

    NFS has no exchange (the kernel answers EINVAL), and filelock then gives up rather than falling back, so on NFS
    a dead holder's lease blocks the path forever. Here the same EINVAL is injected on a local disk: the lease
    of a dead pid, which filelock breaks at once locally, is never broken; our lock breaks the same situation."""
    filelock = pytest.importorskip("filelock")
    exchange = pytest.importorskip("filelock._filesystem._exchange")
    if not hasattr(filelock, "SoftFileLease") or not hasattr(exchange, "_rename_call"):
        pytest.skip("this filelock has no SoftFileLease (or a different break path)")
    lease_path = tmp_path / "x.lock"

    def plant():
        lease_path.write_text(f"filelock/2\npid={_dead_pid()}\nhost={socket.gethostname()}\nmode=lease\n"
                              f"token={'a' * 32}\nduration=1.0\n")

    plant()
    local = filelock.SoftFileLease(str(lease_path), lease_duration=1, timeout=3, poll_interval=0.05)
    with local:  # a local filesystem: broken at once
        pass
    plant()
    monkeypatch.setattr(exchange, "_rename_call", lambda: ((lambda src, dst, flags: errno.EINVAL), 2))
    nfs = filelock.SoftFileLease(str(lease_path), lease_duration=1, timeout=2, poll_interval=0.05)
    with pytest.raises(filelock.Timeout):
        nfs.acquire()
    assert "pid=" in lease_path.read_text()  # the dead holder's marker is still there
    # The lock we use breaks a dead holder with O_EXCL and unlink only.
    target = tmp_path / "m" / "q4-g64"
    target.parent.mkdir()
    (target.parent / ".q4-g64.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    with TargetLock(target, wait=0):
        pass


def test_the_race_harness_sees_overlap_when_there_is_no_lock(tmp_path):
    """The check above is not vacuous: with a lock that excludes nothing the same harness reports overlaps."""
    fake = tmp_path / "nolock.py"
    fake.write_text(textwrap.dedent("""
        class TargetLock:
            def __init__(self, target, **kw):
                self.path = target.parent / f".{target.name}.lock"
            def acquire(self):
                return self
            def release(self):
                self.path.unlink(missing_ok=True)
    """))
    holds = race(tmp_path / "race", rounds=5, env={"LOCK_MODULE": str(fake)})
    assert overlaps(holds)


# ------------------------------------------------------------------ a lost lock never publishes

def _steal(lock: TargetLock) -> str:
    """What another converter does to a holder that stalled past STALE_AFTER: break the lock and take it."""
    successor = json.dumps({"host": "other-node", "pid": 7, "time": time.time(), "token": "b" * 32})
    os.unlink(lock.path)
    lock.path.write_text(successor)
    return successor


def test_publish_refuses_when_the_lock_was_taken(tmp_path):
    from mlx_ray.conversion import publish

    target = tmp_path / "m" / "q4-g64"
    target.parent.mkdir()
    lock = TargetLock(target, wait=0).acquire()
    try:
        stage = publish.staging_dir(target)
        stage.mkdir()
        (stage / "config.json").write_text("{}")
        successor = _steal(lock)
        with pytest.raises(Conflict, match="lost its lock") as e:
            publish.publish(stage, target, replace=False, lock=lock)
        assert "\n" not in str(e.value) and "other-node pid 7" in str(e.value)
        assert lock.lost and not target.exists() and stage.exists()  # the caller removes its stage
    finally:
        lock.release()
    assert lock.path.read_text() == successor  # the successor's lock is left alone


def test_publish_refuses_when_the_heartbeat_saw_the_lock_lost(tmp_path, monkeypatch):
    """The heartbeat's ``lost`` flag is read: even if the file looks like ours again, a lost lock stays lost."""
    from mlx_ray.conversion import publish

    monkeypatch.setattr(publish, "HEARTBEAT", 0.01)
    target = tmp_path / "m" / "q4-g64"
    target.parent.mkdir()
    lock = TargetLock(target, wait=0).acquire()
    mine = lock.path.read_text()
    _steal(lock)
    lock._thread.join(timeout=10)  # the heartbeat returns once it has seen the lock gone
    assert lock.lost
    lock.path.write_text(mine)  # (not possible in practice: the successor holds it; the flag alone must refuse)
    stage = publish.staging_dir(target)
    stage.mkdir()
    with pytest.raises(Conflict, match="lost its lock"):
        publish.publish(stage, target, replace=False, lock=lock)
    assert not target.exists()
    lock.release()


def test_a_convert_that_lost_its_lock_publishes_nothing(tiny_llama_hf, tmp_path, monkeypatch):
    """End to end: the lock is broken and retaken by another converter while this one builds; the convert fails in
    one line, and neither the target nor its staging directory is left."""
    from mlx_ray.conversion import convert as conv

    real_build = conv._build
    taken = {}

    def build_then_lose_the_lock(p, stage, progress):
        real_build(p, stage, progress)
        lock_path = p.target.parent / f".{p.target.name}.lock"
        os.unlink(lock_path)
        lock_path.write_text(json.dumps({"host": "other-node", "pid": 7, "time": time.time(), "token": "b" * 32}))
        taken["lock"] = lock_path

    monkeypatch.setattr(conv, "_build", build_then_lose_the_lock)
    out = tmp_path / "cache" / "tiny" / "f32"
    with pytest.raises(Conflict, match="lost its lock") as e:
        conv.convert(str(tiny_llama_hf), out=str(out), quantize=False, dtype="float32", progress=False)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [".f32.lock"]  # only the successor's lock
    assert json.loads(taken["lock"].read_text())["host"] == "other-node"
