"""Check, before joining, that this machine runs the head's Ray and Python.

``ray start`` refuses a version mismatch only after it has started local
daemons, with a message buried in its logs. We ask first: the head's GCS stores
the cluster metadata (``ray_version``, ``python_version``) under the internal
KV key ``cluster_metadata`` in the ``cluster`` namespace; Ray's own
``check_version_info`` reads the same key. We read it through a short-lived
``GcsClient`` in a subprocess, so a GCS that accepts TCP but never answers can
be abandoned after the timeout (the client's own retry loop takes ~40 s).

Test hook: ``MLX_RAY_LOCAL_RAY_VERSION`` / ``MLX_RAY_LOCAL_PYTHON_VERSION``
replace the local versions used in the comparison (only there), which is how
the tests simulate a mismatched Mac without installing a second Ray.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass

from ..errors import BadRequest, Conflict, DeadlineExceeded, NotFound

DEFAULT_GCS_PORT = 6379
RAY_ENV_LOCAL = "MLX_RAY_LOCAL_RAY_VERSION"
PY_ENV_LOCAL = "MLX_RAY_LOCAL_PYTHON_VERSION"


@dataclass(frozen=True)
class Versions:
    ray: str
    python: str

    def __str__(self) -> str:
        return f"Ray {self.ray} / Python {self.python}"


def parse_address(address: str) -> tuple[str, int]:
    """'host:port', 'host' (port 6379) or '[v6]:port' -> (host, port)."""
    addr = (address or "").strip()
    if not addr:
        raise BadRequest("--address is required: the head's GCS address, e.g. 10.0.0.5:6379")
    if "://" in addr:
        raise BadRequest(f"--address {address!r}: give the head's GCS HOST:PORT (e.g. 10.0.0.5:6379), not a URL")
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest.lstrip(":") or str(DEFAULT_GCS_PORT)
    elif addr.count(":") == 1:
        host, port = addr.split(":")
    else:
        host, port = addr, str(DEFAULT_GCS_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"--address {address!r}: expected HOST:PORT with a port in 1-65535")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_versions() -> Versions:
    """This machine's Ray and Python (without importing Ray), test hooks applied."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ray_version = version("ray")
    except PackageNotFoundError:
        ray_version = "not installed"
    return Versions(os.environ.get(RAY_ENV_LOCAL) or ray_version,
                    os.environ.get(PY_ENV_LOCAL) or platform.python_version())


def tcp_check(host: str, port: int, timeout: float) -> None:
    """Raise a one-line error unless a TCP connection to host:port opens within timeout."""
    where = format_address(host, port)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except socket.timeout:
        raise DeadlineExceeded(f"the Ray head's GCS at {where} did not answer within {timeout:g}s; check the "
                               "address, that the head is up, and that its firewall admits this machine")
    except socket.gaierror as e:
        raise NotFound(f"cannot resolve the Ray head {host!r} ({e.strerror}); check --address")
    except OSError as e:
        raise NotFound(f"cannot reach the Ray head's GCS at {where} ({e.strerror or e}); check the address, "
                       "that the head is up, and that its firewall admits this machine")


def head_metadata(address: str, timeout: float = 10.0, env: dict | None = None) -> dict:
    """The head's cluster metadata dict (ray_version, python_version, ...).

    ``env`` is the environment the worker will run with (it carries the token
    settings, which the GCS client needs on a token-auth cluster).
    """
    host, port = parse_address(address)
    tcp_check(host, port, timeout)
    cmd = [sys.executable, "-m", "mlx_ray.worker.versions", format_address(host, port), str(timeout)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 3.0), env=env)
    except subprocess.TimeoutExpired:
        raise DeadlineExceeded(f"the Ray head at {format_address(host, port)} accepted TCP but its GCS did not "
                               f"answer within {timeout:g}s; is that port really the head's GCS port?")
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {out.returncode}"
        if "uthenticat" in out.stderr or "UNAUTHENTICATED" in out.stderr:
            raise BadRequest(f"the Ray head at {format_address(host, port)} refused us: token authentication "
                             "failed; pass --token-file with the cluster's token")
        raise NotFound(f"could not read the cluster metadata from {format_address(host, port)}: {reason}; "
                       f"if the head runs another Ray than this machine's {local_versions().ray}, install the "
                       "head's version here")
    return json.loads(out.stdout)


def head_versions(address: str, timeout: float = 10.0, env: dict | None = None) -> Versions:
    meta = head_metadata(address, timeout, env)
    return Versions(str(meta.get("ray_version", "unknown")), str(meta.get("python_version", "unknown")))


def python_matches(head: str, local: str) -> bool:
    """Ray's rule: exact by default, (major, minor) with RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor."""
    if os.environ.get("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL", "patch") == "minor":
        return head.split(".")[:2] == local.split(".")[:2]
    return head == local


def check_versions(head: Versions, local: Versions, address: str) -> None:
    if head.ray == local.ray and python_matches(head.python, local.python):
        return
    raise Conflict(f"version mismatch: the head at {address} runs {head}, this machine has {local}; "
                   f"install Python {head.python} with ray[serve]=={head.ray} here (the versions must be equal)")


def _probe(address: str, timeout: float) -> int:
    """Subprocess side of :func:`head_metadata`: print the metadata JSON."""
    from ray._raylet import GcsClient

    client = GcsClient(address=address)
    raw = client.internal_kv_get(b"CLUSTER_METADATA", namespace=b"cluster", timeout=timeout)
    if raw is None:
        print("the head has no cluster metadata (not a Ray head, or still starting)", file=sys.stderr)
        return 1
    print(raw.decode())
    return 0


if __name__ == "__main__":
    sys.exit(_probe(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 10.0))
