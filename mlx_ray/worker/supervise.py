"""Keep this machine's node in the cluster: ``mlx-ray worker start --block``.

The process launchd or systemd keeps alive is this supervisor, not ``ray
start``: ``ray start --block`` alone does not bring a node back after the head
restarts. Without GCS fault tolerance (no Redis, KubeRay's default) a restarted
head is a new cluster that does not know the old node; the old raylet either
exits (``ray start --block`` then exits 1, or, when the raylet exits with 0,
keeps sleeping with no node at all) or lingers unregistered.

So the supervisor:

1. waits for the head's GCS port to accept TCP (probing every 1-5 s), checks
   Ray and Python against the head, and starts ``ray start ... --block`` as its
   child, in the supervisor's own process group (launchd kills the job's process
   group when it stops it, systemd the whole cgroup: nothing outlives the job);
2. watches it every ``PROBE_S`` seconds: the child and its raylet must be alive
   (the raylet's ``--node_id`` names the node), the GCS port must answer, and
   the head's node table must list the node ALIVE - checked once the node has
   started, every ``VERIFY_EVERY_S`` seconds, and at once whenever the port
   answers again after failing (the head may have restarted);
3. when the node is gone, dead or unknown to the head, or the head has been
   unreachable for longer than Ray's own reconnect window, stops what is left
   of the node (SIGTERM, then SIGKILL after ``KILL_AFTER_S``) and goes back to 1,
   immediately after a node that ran for a while, with a growing backoff (up to
   ``RETRY_MAX_S``) after one that failed quickly;
4. on SIGTERM/SIGINT forwards SIGTERM to ``ray start`` (which drains the node
   and leaves the cluster cleanly), waits for it and exits 0.

RAY_gcs_rpc_server_reconnect_timeout_s (how long a raylet keeps trying to reach
the GCS before it exits; Ray's default 60 s) is deliberately left alone: a
restarted head is found by step 2 as soon as its port answers, whatever that
timeout is, so lowering it would not speed the rejoin; it would only make a
network blip of that length kill a healthy node, and break the reconnect a
GCS-fault-tolerant head (Redis) relies on, where the old node stays valid. The
supervisor gives up on an unreachable head only after that window plus
``HEAD_LOST_MARGIN_S`` (a raylet that lingers past it is stopped).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from ..errors import DeadlineExceeded, MlxRayError, NotFound
from .command import WorkerCommand
from .versions import format_address, parse_address, tcp_check

PROBE_S = 2.0  # how often the child, its raylet and the GCS port are checked
VERIFY_EVERY_S = 60.0  # how often the head's node table is read while all looks well
REGISTER_GRACE_S = 60.0  # how long a new raylet may take to appear ALIVE in the head's node table
START_GRACE_S = 180.0  # how long `ray start` may take to spawn its raylet
HEAD_WAIT_MAX_S = 5.0  # the longest pause between probes while waiting for the head
RETRY_MAX_S = 60.0  # the longest pause after repeated failed joins
STABLE_S = 120.0  # a node that ran this long was a success: the next join starts at once
HEAD_LOST_MARGIN_S = 30.0
KILL_AFTER_S = 10.0  # SIGTERM -> SIGKILL for a lost node (its drain cannot reach a dead head anyway)
ALIVE = 0  # GcsNodeInfo.state ALIVE (gcs.proto)


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} mlx-ray worker: {msg}", file=sys.stderr, flush=True)


def reconnect_timeout_s(env: dict) -> float:
    try:
        return float(env.get("RAY_gcs_rpc_server_reconnect_timeout_s", 60))
    except ValueError:
        return 60.0


def node_state(address: str, node_id: str, env: dict, timeout: float = 10.0) -> str:
    """'alive', 'dead' or 'absent' in the head's node table; 'unknown' when the GCS did not answer.

    In a subprocess (Ray's GCS client retries for long and imports Ray), bounded by ``timeout``.
    """
    cmd = [sys.executable, "-m", "mlx_ray.worker.supervise", address, node_id, str(timeout)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 20, env=env)
    except subprocess.TimeoutExpired:
        return "unknown"
    lines = out.stdout.strip().splitlines()
    return lines[-1] if out.returncode == 0 and lines and lines[-1] in ("alive", "dead", "absent") else "unknown"


class Supervisor:
    def __init__(self, cmd: WorkerCommand, address: str, *, check: Callable[[], None] | None = None,
                 caffeinate: str | None = None, log: Callable[[str], None] = _log):
        self.cmd = cmd
        self.host, self.port = parse_address(address)
        self.address = format_address(self.host, self.port)
        self.check = check  # the version check; raises MlxRayError
        self.caffeinate = caffeinate
        self.log = log
        self.stop_event = threading.Event()
        self.signum: int | None = None
        self.head_lost_after = reconnect_timeout_s(cmd.env) + HEAD_LOST_MARGIN_S

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
        self.stop_event.set()

    def _sleep(self, seconds: float) -> bool:
        """Sleep; True when a stop was asked for."""
        return self.stop_event.wait(max(0.0, seconds))

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        helper = None
        if self.caffeinate:  # keep the Mac awake (on AC power) for as long as the supervisor lives
            helper = subprocess.Popen([self.caffeinate, "-s", "-w", str(os.getpid())])
        try:
            return self._loop()
        finally:
            if helper is not None and helper.poll() is None:
                helper.terminate()
                helper.wait()

    def _loop(self) -> int:
        joined_once, failures, check_failures = False, 0, 0
        while not self.stop_event.is_set():
            if not self._wait_for_head():
                break
            if self.check is not None:
                try:
                    self.check()
                    check_failures = 0
                except MlxRayError as e:
                    if not joined_once and not isinstance(e, (NotFound, DeadlineExceeded)):
                        raise  # a mismatch or a refused token at the first start: one line, exit
                    check_failures += 1
                    # A head that is still starting (no metadata yet, GCS not answering) is asked
                    # again within seconds; a mismatch or a refusal only every minute at most.
                    cap = HEAD_WAIT_MAX_S if isinstance(e, (NotFound, DeadlineExceeded)) else RETRY_MAX_S
                    delay = min(self._backoff(check_failures), cap)
                    self.log(f"{e}; retrying in {delay:.0f}s")
                    self._sleep(delay)
                    continue
            started = time.monotonic()
            reason, head_side = self._run_node()
            joined_once = True
            if reason is None:  # stopped by a signal
                break
            # A node lost to the head (it went away, restarted, or declared the node dead), or one that
            # ran for a while, rejoins at once; one that keeps failing on its own backs off.
            failures = 0 if head_side or time.monotonic() - started >= STABLE_S else failures + 1
            delay = self._backoff(failures) if failures else 0.0
            self.log(f"the node stopped: {reason}; rejoining {self.address} "
                     f"{'as soon as' if not delay else f'in {delay:.0f}s, once'} the head answers")
            self._sleep(delay)
        self.log("stopped")
        return 0

    @staticmethod
    def _backoff(failures: int) -> float:
        return min(2.0 ** failures, RETRY_MAX_S)

    def _wait_for_head(self) -> bool:
        """Probe the GCS port until it accepts TCP; False when a stop was asked for meanwhile."""
        t0, n, last_said = time.monotonic(), 0, None
        while not self.stop_event.is_set():
            try:
                tcp_check(self.host, self.port, timeout=3.0)
                if n:
                    self.log(f"the head's GCS at {self.address} answers again after {time.monotonic() - t0:.0f}s")
                return True
            except MlxRayError as e:
                if last_said is None or time.monotonic() - last_said >= 60:
                    self.log(f"waiting for the head: {e}")
                    last_said = time.monotonic()
            n += 1
            if self._sleep(min(float(n), HEAD_WAIT_MAX_S)):
                break
        return False

    # ------------------------------------------------------------------ one node

    def _run_node(self) -> tuple[str | None, bool]:
        """Start `ray start --block` and watch it.

        Returns (why it ended, or None when stopped by a signal; whether the head's side ended it: unreachable,
        restarted, or declaring the node dead; or the node had been ALIVE in the cluster before it was lost).
        """
        import psutil

        self.log(f"starting the node: {self.cmd.render()}")
        proc = subprocess.Popen(self.cmd.argv, env=self.cmd.env, stdin=subprocess.DEVNULL)
        started = time.monotonic()
        raylet, node_id, raylet_seen = None, None, 0.0
        outage_since = None
        verify_at = 0.0  # monotonic time of the next node-table check (once the node id is known)
        seen_alive = after_outage = False
        while True:
            if self._sleep(PROBE_S):
                self._stop_gracefully(proc)
                return None, False
            now = time.monotonic()
            if proc.poll() is not None:
                self._kill_tree(proc, [])
                return f"`ray start` exited with code {proc.returncode}", seen_alive
            if raylet is None:
                raylet = self._find_raylet(proc, psutil)
                if raylet is not None:
                    raylet_seen = now
                    node_id = next((a.split("=", 1)[1] for a in self._cmdline(raylet)
                                    if a.startswith("--node_id=")), None)
                    self.log(f"raylet pid {raylet.pid} up, node id {node_id or '?'}")
                elif now - started > START_GRACE_S:
                    return self._lost(proc, f"no raylet {START_GRACE_S:.0f}s after `ray start`"), seen_alive
            elif not self._alive(raylet, psutil):
                return self._lost(proc, f"the raylet (pid {raylet.pid}) exited"), seen_alive
            try:
                tcp_check(self.host, self.port, timeout=min(PROBE_S, 3.0))
                if outage_since is not None:
                    self.log(f"the head's GCS answers again after {now - outage_since:.0f}s; "
                             "checking that it still knows this node")
                    outage_since, after_outage, verify_at = None, True, now
            except MlxRayError as e:
                if outage_since is None:
                    outage_since = now
                    self.log(f"the head is unreachable ({e}); the node waits up to {self.head_lost_after:.0f}s")
                elif now - outage_since > self.head_lost_after:
                    return self._lost(proc, f"the head has been unreachable for {now - outage_since:.0f}s"), True
                continue
            if node_id is None or now < verify_at:
                continue
            state = node_state(self.address, node_id, self.cmd.env)
            if state == "alive":
                if not seen_alive or after_outage:
                    self.log(f"node {node_id[:12]} is ALIVE in {self.address}'s cluster")
                seen_alive, after_outage = True, False
                verify_at = time.monotonic() + VERIFY_EVERY_S
            elif state == "dead":
                return self._lost(proc, "the head marked this node dead"), True
            elif state == "absent" and (seen_alive or after_outage or now - raylet_seen > REGISTER_GRACE_S):
                return self._lost(proc, "the head does not know this node (it restarted without its state)"), True
            else:  # not registered yet, or the GCS did not answer: look again soon
                verify_at = time.monotonic() + PROBE_S

    @staticmethod
    def _cmdline(p) -> list[str]:
        try:
            return p.cmdline()
        except Exception:  # noqa: BLE001 - gone or not ours to read
            return []

    @staticmethod
    def _alive(p, psutil) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    @staticmethod
    def _descendants(proc, psutil) -> list:
        try:
            return psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def _find_raylet(self, proc, psutil):
        for p in self._descendants(proc, psutil):
            try:
                if p.name() == "raylet":
                    return p
            except psutil.Error:
                continue
        return None

    def _lost(self, proc: subprocess.Popen, reason: str) -> str:
        """Stop what is left of a node that is no longer in the cluster."""
        import psutil

        self.log(f"{reason}: stopping what is left of the node")
        self._kill_tree(proc, self._descendants(proc, psutil), term_first=True)
        return reason

    def _kill_tree(self, proc: subprocess.Popen, procs: list, *, term_first: bool = False) -> None:
        """SIGTERM (optionally) then SIGKILL `ray start` and the processes it started (recorded before)."""
        import psutil

        if term_first:
            for p in [proc, *procs]:
                try:
                    p.send_signal(signal.SIGTERM)
                except (psutil.Error, ProcessLookupError):
                    pass
            deadline = time.monotonic() + KILL_AFTER_S
            while time.monotonic() < deadline and (proc.poll() is None or any(self._alive(p, psutil) for p in procs)):
                time.sleep(0.2)
        for p in procs:
            if self._alive(p, psutil):
                try:
                    p.kill()
                except psutil.Error:
                    pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def _stop_gracefully(self, proc: subprocess.Popen) -> None:
        """Ctrl-C/SIGTERM: `ray start` drains the node on SIGTERM and leaves the cluster cleanly."""
        import psutil

        procs = self._descendants(proc, psutil)
        self.log(f"signal {self.signum}: stopping the node (SIGTERM to `ray start`, pid {proc.pid})")
        if proc.poll() is None:
            # Ray guards its SIGTERM handler against re-entry, so a second SIGTERM from a group-wide
            # kill is harmless. After Ctrl-C the terminal already sent SIGINT to the whole group.
            proc.send_signal(signal.SIGTERM)
        try:
            drain = float(self.cmd.env.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", 30))
        except ValueError:
            drain = 30.0
        try:
            proc.wait(timeout=max(drain, 0) + 15)
        except subprocess.TimeoutExpired:
            self.log("`ray start` did not stop in time: killing the node")
        self._kill_tree(proc, procs)


def _probe(address: str, node_id: str, timeout: float) -> int:
    """Subprocess side of :func:`node_state`."""
    from ray._raylet import GcsClient

    nodes = GcsClient(address=address).get_all_node_info(timeout=timeout)
    for info in nodes.values():
        if info.node_id.hex() == node_id:
            print("alive" if info.state == ALIVE else "dead")
            return 0
    print("absent")
    return 0


if __name__ == "__main__":
    sys.exit(_probe(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 10.0))
