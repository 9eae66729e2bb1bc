"""The sides of the server benchmarks (``bench/engine_vs_mlxlm.py``, ``bench/workload_l.py``).

``mlx_lm.server`` and ``mlx-ray serve`` started here on a free loopback port
(in the caller's session, so a worker started with ``setsid`` holds the whole
server tree in its CPU autogroup), the fixture converted once into the bench
cache, the servers' peak memory and CPU, and, for ``mlx-ray serve``, the
engine's ``stats()`` fetched through Serve's handle from a short-lived Ray
driver (the ingress's ``/health`` does not carry them).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Sequence

import psutil

from mlx_ray.blas import env_with_fast_blas

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works, step by step.",
    "Describe the water cycle to a ten-year-old.",
    "Write a letter to a friend about your summer holiday by the sea.",
    "What are the main causes of the French Revolution? Explain in detail.",
    "Give me a recipe for a vegetable soup with instructions.",
    "Describe a walk through a busy market in a large city.",
    "Explain the difference between weather and climate with examples.",
    "Write a poem about autumn leaves and the passing of time.",
    "How do bees make honey? Describe the whole process.",
    "Tell me about the history of the bicycle.",
    "Write a dialogue between a cat and a dog about breakfast.",
    "Explain why the sky is blue in simple words.",
    "Describe your ideal weekend in the mountains.",
    "What should a beginner know before learning to play the guitar?",
    "Write a short fairy tale about a brave little mouse.",
]


# -- measuring ---------------------------------------------------------------------------------
class Usage:
    """CPU seconds and peak resident memory of a set of processes over a ``with`` block.

    The peak is the kernel's high-water mark (``VmHWM``: since process start, so
    it never decreases across levels); nothing is sampled, so measuring costs the
    measured process nothing. CPU covers every process of the side (the engine
    with its in-process client; mlx_lm.server plus the worker running its client).
    """

    def __init__(self, *pids: int):
        self.procs = [psutil.Process(p) for p in pids]
        self.n_peak = max(1, len(self.procs) - 1)  # the server's processes: all but the last (the client)
        self.peak, self.cpu_s = 0, 0.0

    def _cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:  # a Ray worker that ended mid-level: its time is lost
                continue
            total += t.user + t.system
        return total

    def __enter__(self):
        self._cpu0 = self._cpu()
        return self

    def __exit__(self, *exc):
        self.cpu_s = self._cpu() - self._cpu0
        self.peak = max(peak_rss(p.pid) for p in self.procs[:self.n_peak])


def peak_rss(pid: int) -> int:
    """The kernel's high-water mark of ``pid``'s resident memory (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return psutil.Process(pid).memory_info().rss
    except (OSError, psutil.Error):  # a Ray worker that ended mid-level
        return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's high-water mark of ``pid`` to its current RSS (``clear_refs`` 5); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def machine_info() -> dict:
    """CPU model, cores, memory, platform and load average now."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "load_avg": os.getloadavg()}


# -- the model --------------------------------------------------------------------------------
def fixture_model(q4: bool) -> Path:
    """The SmolLM2-135M fixture converted to float32 (or q4-g64) in the bench cache (once)."""
    from mlx_ray.conversion.convert import convert
    from mlx_ray.fixtures import smollm2_hf_dir

    cache = Path(tempfile.gettempdir()) / "mlx-ray-bench-cache"
    kw = dict(quantize=True, q_bits=4, q_group_size=64) if q4 else dict(quantize=False, dtype="float32")
    try:
        return Path(convert(str(smollm2_hf_dir()), cache_dir=cache, **kw))
    except Exception as e:  # already converted by an earlier run
        from mlx_ray.conversion.cache import resolve_model

        name = "SmolLM2-135M-Instruct/" + ("q4-g64" if q4 else "f32")
        print(f"(reusing {name}: {e})", file=sys.stderr)
        return resolve_model(name, cache)


# -- servers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], what: str, log: str, timeout: float) -> None:
    """Poll ``ready()`` until it holds; RuntimeError naming ``log`` if ``proc`` exits or time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}); see {log}")
        if ready():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s; see {log}")


# mlx_lm.server's own main() under ``python -c``, with two changes that leave its serving alone: the listen
# backlog (``request_queue_size``, socketserver's 5) set to argv[1], and a line on stderr per model (re)load.
_MLX_LM_SERVER_LAUNCH = """
import http.server, sys, time
import mlx_lm.server as server
http.server.ThreadingHTTPServer.request_queue_size = int(sys.argv.pop(1))
_load = server.ModelProvider._load
def load(self, model_path, adapter_path=None, draft_model_path=None):
    t = time.perf_counter()
    _load(self, model_path, adapter_path, draft_model_path)
    print(f"{LOAD_MARK} {time.perf_counter() - t:.3f} s {adapter_path}", file=sys.stderr, flush=True)
server.ModelProvider._load = load
server.main()
"""
LOAD_MARK = "mlx-ray-bench: model loaded in"


class MlxLmServer:
    """``mlx_lm.server`` on a free loopback port. ``listen_backlog``: started through :data:`_MLX_LM_SERVER_LAUNCH`
    with that listen backlog (socketserver's default, 5, is what ``python -m mlx_lm.server`` listens with: more
    connections opened at once than its accept loop takes wait for a SYN retransmit, and while the loop is held
    up, e.g. by a model reload holding the GIL, some are reset), its model loads counted by :meth:`loads`."""

    def __init__(self, model_dir: Path, decode_concurrency: int, listen_backlog: Optional[int] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(model_dir)  # requests must name the exact path the server was started with
        self.log = tempfile.NamedTemporaryFile(prefix="mlx_lm_server_", suffix=".log", delete=False)
        if listen_backlog is None:
            launch = ["-m", "mlx_lm.server"]
        else:
            launch = ["-c", _MLX_LM_SERVER_LAUNCH.replace("{LOAD_MARK}", LOAD_MARK), str(listen_backlog)]
        cmd = [sys.executable, *launch, "--model", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), "--decode-concurrency", str(decode_concurrency), "--log-level", "WARNING"]
        # Same session (autogroup) as the worker that loads it; the driver kills the worker's group.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env_with_fast_blas())

    def wait_ready(self, timeout: float = 180.0) -> None:
        def healthy() -> bool:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                return True
            except OSError:
                return False

        wait_until(self.proc, healthy, "mlx_lm.server", self.log.name, timeout)

    def loads(self) -> list[tuple[float, str]]:
        """(seconds, adapter path or ``None``) of every model load so far (with ``listen_backlog`` only)."""
        out = []
        for line in Path(self.log.name).read_text(errors="replace").splitlines():
            if line.startswith(LOAD_MARK):
                secs, _, adapter = line[len(LOAD_MARK):].strip().partition(" s ")
                out.append((float(secs), None if adapter == "None" else adapter))
        return out

    def log_tail(self, n: int = 2000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class MlxRayServe:
    """``mlx-ray serve`` (embedded Ray, Serve's proxy, the model's replica) on a free loopback port.

    Started in the worker's session, so the whole Ray process tree shares the
    side's CPU autogroup; the load generator runs in the worker process, as for
    mlx_lm.server. ``pythonpath`` serves another checkout's ``mlx_ray`` (a git
    worktree, also the server's working directory: see ``bench/workload_l.py``);
    ``extra_args`` go to the command line
    after ``--config`` (e.g. ``--kv-bits 8``); ``serve_config``: more ServeConfig fields
    (e.g. ``{"stream_messages_per_s": 0}``); ``engine_class``: the model's (``bench/serve_overhead.py``).
    """

    MODEL = "bench"
    APP = "mlx-ray"  # `mlx-ray serve`'s default --app-name

    def __init__(self, model_dir: Path, engine_cfg: dict, pythonpath: str | None = None,
                 extra_args: Sequence[str] = (), serve_config: Optional[dict] = None,
                 engine_class: Optional[str] = None):
        import yaml

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = self.MODEL
        model = {"model": str(model_dir), "name": self.MODEL, "engine": engine_cfg}
        if engine_class:
            model["engine_class"] = engine_class
        cfg = {"models": [model], "port": self.port, **(serve_config or {})}
        self.cfg = tempfile.NamedTemporaryFile("w", prefix="mlx_ray_serve_", suffix=".yaml", delete=False)
        yaml.safe_dump(cfg, self.cfg)
        self.cfg.close()
        self.log = tempfile.NamedTemporaryFile(prefix="mlx_ray_serve_", suffix=".log", delete=False)
        self.env = env_with_pythonpath(pythonpath)
        cmd = [sys.executable, "-m", "mlx_ray.cli", "serve", "--config", self.cfg.name, *extra_args]
        # In the served tree: `python -m` puts the working directory first on sys.path, and Ray puts the
        # driver's there on its workers' (a checkout's own mlx_ray/ would win over PYTHONPATH).
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=pythonpath or None)

    def wait_ready(self, timeout: float = 300.0) -> None:
        wait_until(self.proc, lambda: "ready at" in Path(self.log.name).read_text(errors="replace"),
                   "mlx-ray serve", self.log.name, timeout)

    def pids(self) -> list[int]:
        """The serve process and every process it started (Ray's daemons, the proxy, the replica)."""
        root = psutil.Process(self.proc.pid)
        return [root.pid] + [c.pid for c in root.children(recursive=True)]

    def gcs_address(self) -> str:
        """``ip:port`` of this server's embedded Ray: the ``--gcs-address`` its raylet and agents were given
        (what ``ray.init(address="auto")`` looks for, but only in this server's process tree)."""
        for pid in self.pids():
            try:
                args = psutil.Process(pid).cmdline()
            except psutil.Error:
                continue
            for a in args:
                if a.startswith("--gcs-address=") and a.split("=", 1)[1]:
                    return a.split("=", 1)[1]
        raise RuntimeError(f"no --gcs-address under mlx-ray serve (pid {self.proc.pid})")

    def engine(self, timeout: float = 120.0) -> dict:
        """``{"stats": engine.stats(), "info": server.info()}`` of the model's replica (see ``serve_engine``)."""
        return serve_engine(self.gcs_address(), self.APP, self.MODEL, self.env, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        Path(self.cfg.name).unlink(missing_ok=True)


def env_with_pythonpath(pythonpath: str | None) -> dict:
    """The fast-BLAS environment, with ``pythonpath`` first on PYTHONPATH when given."""
    env = env_with_fast_blas()
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
    return env


_ENGINE_PROBE = r"""
import json, sys
import ray
from ray import serve
from mlx_ray.serve.config import ModelConfig
addr, app, name = sys.argv[1:4]
ray.init(address=addr, logging_level="ERROR", log_to_driver=False)
h = serve.get_deployment_handle(ModelConfig(model="-", name=name).deployment_name, app_name=app)
out = {"stats": h.stats.remote().result(timeout_s=60), "info": h.info.remote().result(timeout_s=60)}
print("ENGINE-PROBE " + json.dumps(out, default=str), flush=True)
"""


def serve_engine(gcs_address: str, app: str, model_name: str, env: dict | None = None, timeout: float = 120.0) -> dict:
    """The engine's ``stats()`` and the server's ``info()`` (pid, node, ...) through Serve's handle.

    Asked from a Ray driver in its own short-lived process (``env``: the side's,
    so the deployment's name comes from the served checkout), between the
    measured runs, so no driver lives beside the measured server."""
    env = dict(os.environ if env is None else env)
    if "RAY_AUTH_MODE" not in env and (Path.home() / ".ray" / "auth_token").exists():
        # A local Ray (>= 2.52) started with this token in place runs in token mode; a driver
        # given an address only turns it on when told.
        env["RAY_AUTH_MODE"] = "token"
    p = subprocess.run([sys.executable, "-c", _ENGINE_PROBE, gcs_address, app, model_name],
                       capture_output=True, text=True, timeout=timeout, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("ENGINE-PROBE "):
            return json.loads(line[len("ENGINE-PROBE "):])
    raise RuntimeError(f"engine probe of {gcs_address} failed ({p.returncode}): {(p.stderr or p.stdout)[-2000:]}")
