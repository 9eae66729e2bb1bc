"""The served mlx-ray replicas on the fine-tune's node: found, and put to sleep for the job, through Ray Serve.

A fine-tune shares the Mac's memory with the models it serves. The driver is already connected to the
cluster, so it asks Ray Serve, as any Ray user would, rather than an HTTP address (no URL, no API key):
``serve.status()`` lists the applications and their running replicas, and each deployment's handle asks
its replicas ``replica_state()``. A deployment that does not answer it is not an mlx-ray model server
and is left alone. Each replica says which Ray node it runs on and how much MLX memory it holds.

A handle sends each call to one replica of its choosing, so a call names the node (``node_id``): a
replica elsewhere answers without acting, and the calls repeat until every replica on the node has
answered (``_cover``).

``asleep(node_id)`` puts the node's replicas to sleep and wakes them when the block ends, however it ends
(the job failed, was interrupted): vLLM's sleep mode, ``engine.sleep`` / ``engine.wake_up``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from mlx_ray.errors import EngineFault

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0
WAVES = 6  # rounds of calls to reach every replica of a deployment (a handle picks the replica)


@dataclass(frozen=True)
class Replica:
    """One mlx-ray model replica as it described itself (``LLMServer.replica_state``)."""

    app: str
    deployment: str
    model: str
    replica: str
    node_id: str
    pid: int
    memory_bytes: int
    sleeping: bool

    def describe(self) -> str:
        from .memory import gb

        return f"the served model {self.model} (replica on node {self.node_id[:12]}) holds {gb(self.memory_bytes)}"


def _deployments() -> list[tuple[str, str, int]]:
    """(application, deployment, running replicas) of every deployment Serve runs on the cluster."""
    from ray import serve

    try:
        status = serve.status()
    except Exception as e:  # noqa: BLE001 - Serve unreachable: nothing is served that we can find
        log.info("Serve status not available (%s): no served replicas found", type(e).__name__)
        return []
    out = []
    for app, a in status.applications.items():
        for dep, d in a.deployments.items():
            running = dict(d.replica_states or {}).get("RUNNING", 0)
            if running:
                out.append((app, dep, running))
    return out


def _cover(app: str, dep: str, running: int, method: str, want=None, timeout_s: float = CALL_TIMEOUT_S,
           **kw) -> dict[str, Replica]:
    """Call ``method(**kw)`` on the deployment's replicas until every one has answered (``want``: the
    replica ids that must have answered; default all ``running``); replica id -> its answer. Raises
    AttributeError when the deployment is not an mlx-ray model server."""
    from ray import serve

    handle = serve.get_deployment_handle(dep, app_name=app)
    seen: dict[str, Replica] = {}
    for _ in range(WAVES):
        calls = [getattr(handle, method).remote(**kw) for _ in range(max(1, running - len(seen)))]
        for call in calls:
            try:
                s = call.result(timeout_s=timeout_s)
            except Exception as e:  # noqa: BLE001 - Ray wraps the replica's AttributeError
                if method in str(e) and ("does not exist" in str(e) or "has no attribute" in str(e)):
                    raise AttributeError(f"{app}/{dep} is not an mlx-ray model server") from None
                raise
            r = Replica(app, dep, s["model"], s.get("replica") or f"{s['node_id']}:{s['pid']}", s["node_id"],
                        s["pid"], int(s.get("memory_bytes") or 0), bool(s["sleeping"]))
            seen[r.replica] = r
        if (want is not None and want <= seen.keys()) or (want is None and len(seen) >= running):
            break
    return seen


def replicas_on(node_id: str) -> list[Replica]:
    """The mlx-ray model replicas that run on Ray node ``node_id`` (Ray must be initialised)."""
    out = []
    for app, dep, running in _deployments():
        try:
            found = _cover(app, dep, running, "replica_state")
        except AttributeError:
            continue
        except Exception as e:  # noqa: BLE001 - a replica that cannot answer holds nothing we could free
            log.warning("%s/%s did not say where it runs: %s", app, dep, e)
            continue
        out += [r for r in found.values() if r.node_id == node_id]
    return out


def _sleep(replicas: list[Replica], grace_s: float | None) -> list[Replica]:
    out = []
    for (app, dep), group in _groups(replicas).items():
        want = {r.replica for r in group}
        got = _cover(app, dep, len(group), "sleep", want=want, timeout_s=CALL_TIMEOUT_S + (grace_s or 120),
                     grace_s=grace_s, node_id=group[0].node_id)
        out += [got[r] for r in want if r in got]
    return out


def _wake(replicas: list[Replica]) -> list[Replica]:
    out = []
    for (app, dep), group in _groups(replicas).items():
        want = {r.replica for r in group}
        got = _cover(app, dep, len(group), "wake_up", want=want, timeout_s=600.0, node_id=group[0].node_id)
        out += [got[r] for r in want if r in got]
    return out


def _groups(replicas: list[Replica]) -> dict[tuple[str, str], list[Replica]]:
    out: dict[tuple[str, str], list[Replica]] = {}
    for r in replicas:
        out.setdefault((r.app, r.deployment), []).append(r)
    return out


@contextlib.contextmanager
def asleep(node_id: str, grace_s: float | None = None, say=print) -> Iterator[list[Replica]]:
    """Put the mlx-ray replicas on node ``node_id`` to sleep for the block, and wake them afterwards, even
    when the block fails; yields them as they reported once asleep."""
    replicas = [r for r in replicas_on(node_id) if not r.sleeping]  # one already asleep is someone else's
    if not replicas:
        yield []
        return
    try:
        slept = _sleep(replicas, grace_s)
        for r in slept:
            say(f"[mlx-ray] put {r.model} (replica {r.replica} on node {node_id[:12]}) to sleep for the job; "
                f"it holds {r.memory_bytes / 1e9:.1f} GB now")
        missing = {r.replica for r in replicas} - {r.replica for r in slept if r.sleeping}
        if missing:
            raise EngineFault(f"replica(s) {', '.join(sorted(missing))} did not go to sleep; the job did not start")
        yield slept
    finally:
        try:
            woke = _wake(replicas)
        except Exception as e:
            raise EngineFault(f"could not wake the served replica(s) after the job ({type(e).__name__}: {e}); "
                              f"wake them with POST /wake_up") from e
        still = [r.model for r in woke if r.sleeping] + [r.model for r in replicas
                                                         if r.replica not in {w.replica for w in woke}]
        if still:
            raise EngineFault(f"{', '.join(still)} did not wake after the job; wake them with POST /wake_up")
        for r in woke:
            say(f"[mlx-ray] woke {r.model} (replica {r.replica}) again")
