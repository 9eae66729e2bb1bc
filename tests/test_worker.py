"""`mlx-ray worker`: a real multi-node join on this machine, version and reachability refusals,
the dry run, and the launchd / systemd files.

Metal cannot run here: the join forces the Apple GPU resource with
``--resources-override`` (the documented way), and the macOS command shape is
checked by building it for platform "darwin" with a faked Metal detection.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from fixtures_worker import (clean_env, cluster_nodes, free_port, gcs_nodes, group_alive, make_token, start_head,
                             stop_group)

pytestmark = pytest.mark.ray  # run on the cluster's Ray by scripts/test.sh

CLI = [sys.executable, "-m", "mlx_ray.cli"]


def run_cli(*args, env=None, timeout=60):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else clean_env())


def _metrics_up(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.status == 200 and b"# TYPE ray_" in r.read()
    except OSError:
        return False


def _wait_for(pred, timeout, what, poll=1.0, check=None):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if check:
            check()
        assert time.monotonic() < deadline, what
        time.sleep(poll)


def test_worker_joins_and_rejoins_a_restarted_head():
    """`worker start --block` joins a real head with gpu_apple_mps, its labels and limits, and prints the
    Prometheus target where Ray's metrics are. Then the head is killed (SIGKILL of its whole process group: a
    crashed head pod) and a new head, without the old one's state, is started on the same port: the supervisor
    brings the node back into the new cluster, with gpu_apple_mps, within 60 s of the new head being up. Its
    SIGTERM at the end is a clean stop, not a lost node. (One test: each worker start costs ~20 s here.)"""
    temp_dir = Path(tempfile.mkdtemp(prefix="mlxray-r-", dir="/tmp"))  # short: Ray's socket paths are long
    token = make_token(temp_dir)
    (temp_dir / "h1").mkdir()
    (temp_dir / "h2").mkdir()
    heads, sup, log = [], None, None
    try:
        heads.append(start_head(temp_dir / "h1", token))
        head = heads[0]
        log_path = temp_dir / "worker.log"
        log = open(log_path, "w")
        # The pinned agent port must be free again when the node restarts: the old node is stopped first.
        metrics_port = free_port()  # not the default 8080: this machine may use it
        cmd = [*CLI, "worker", "start", "--address", head.address, "--token-file", str(token),
               "--resources-override", '{"gpu_apple_mps": 1}', "--num-cpus", "1", "--node-name", "rejoining-mac",
               "--label", "site=test", "--memory", "512MiB", "--object-store-memory", "200MiB", "--block",
               "--metrics-export-port", str(metrics_port), "--", "--dashboard-agent-listen-port", str(free_port())]
        sup = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env=clean_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="10"))

        def supervisor_alive():
            assert sup.poll() is None, log_path.read_text()[-3000:]

        def mine(h):
            return [n for n in gcs_nodes(h) if n["name"] == "rejoining-mac" and n["alive"]]

        (first,) = _wait_for(lambda: mine(head), 120, "the worker never joined the first head",
                             check=supervisor_alive)
        # The supervisor has seen its node in the cluster (it reads the head's node table as a check).
        _wait_for(lambda: "is ALIVE in" in log_path.read_text(), 60, "the supervisor never saw its node ALIVE",
                  check=supervisor_alive)
        # What a Ray driver sees, and where a task asking for the Apple GPU resource runs.
        seen = cluster_nodes(head, place=True)
        (joined,) = [n for n in seen["nodes"] if n["id"] == first["id"]]
        assert joined["alive"] and joined["resources"]["gpu_apple_mps"] == 1 and joined["resources"]["CPU"] == 1
        assert joined["resources"]["memory"] == 512 * 1024**2
        assert joined["labels"]["site"] == "test" and joined["labels"]["mlx-ray.io/accelerator"] == "cpu"
        assert seen["placed"] == first["id"]  # the head has no gpu_apple_mps: only the new node can run it
        out = log_path.read_text()
        assert "versions match" in out and token.read_text().strip() not in out
        # The scrape target it printed is where Ray's metrics are
        assert f"Prometheus) at http://127.0.0.1:{metrics_port}/metrics" in out, out
        _wait_for(lambda: _metrics_up(metrics_port), 60, f"no Ray metrics on port {metrics_port}",
                  check=supervisor_alive)

        os.killpg(head.proc.pid, signal.SIGKILL)  # the head crashes: GCS, raylet and all
        head.proc.wait()
        _wait_for(lambda: not group_alive(head.proc.pid), 30, "the first head's processes did not die")
        t_killed = time.monotonic()
        heads.append(start_head(temp_dir / "h2", token, port=head.port))
        new = heads[1]
        t_up = time.monotonic()
        assert first["id"] not in {n["id"] for n in gcs_nodes(new)}  # a new cluster: the old node is unknown
        (node,) = _wait_for(lambda: mine(new), 60, "the worker did not rejoin the new head within 60 s",
                            check=supervisor_alive)
        rejoin_s, since_kill_s = time.monotonic() - t_up, time.monotonic() - t_killed
        print(f"rejoined {rejoin_s:.1f}s after the new head was up ({since_kill_s:.1f}s after the kill)")
        assert node["id"] != first["id"]
        seen = cluster_nodes(new, place=True)  # what a driver of the new cluster sees, and where the task runs
        (info,) = [n for n in seen["nodes"] if n["id"] == node["id"]]
        assert info["alive"] and info["resources"]["gpu_apple_mps"] == 1
        assert seen["placed"] == node["id"]
        out = log_path.read_text()
        # One supervisor started the node at least twice: a first rejoin attempt may lose its raylet while the
        # new head is still settling (seen under a loaded CI), and the supervisor then tries again, as it should.
        assert out.count("starting the node:") >= 2, out[-3000:]
        assert out.count("supervising a node for") == 1, out[-3000:]
        assert "rejoining 127.0.0.1:" in out and token.read_text().strip() not in out
        # Every earlier raylet is gone: only the last one the supervisor started is alive.
        pids = [int(p) for p in re.findall(r"raylet pid (\d+) up", out)]
        assert len(pids) >= 2 and not any(_pid_alive(p) for p in pids[:-1]), out[-3000:]
        stop_group(sup)  # SIGTERM: Ray's graceful path drains the node first
        after = {n["id"]: n for n in gcs_nodes(new)}
        assert not after[node["id"]]["alive"]
        # A clean stop, not a lost node (UNEXPECTED_TERMINATION); which of these two is recorded depends on
        # whether the drain was acknowledged before the exit (seen: EXPECTED_TERMINATION in most runs,
        # AUTOSCALER_DRAIN_PREEMPTED in one CI run).
        assert after[node["id"]]["death"] in ("EXPECTED_TERMINATION", "AUTOSCALER_DRAIN_PREEMPTED"), after[node["id"]]
    finally:
        if sup is not None:
            stop_group(sup)
        if log is not None:
            log.close()
        for h in heads:
            stop_group(h.proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert sup.returncode == 0 and not group_alive(sup.pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


_OTHER_RAY = "2.60.0" if version("ray") == "2.53.0" else "2.53.0"  # this session may run on either


@pytest.mark.parametrize("hook,value,named", [
    ("MLX_RAY_LOCAL_RAY_VERSION", _OTHER_RAY, f"Ray {_OTHER_RAY}"),
    ("MLX_RAY_LOCAL_PYTHON_VERSION", "3.12.9", "Python 3.12.9"),
])
def test_version_mismatch_refused_naming_both(ray_head, hook, value, named):
    import platform

    from importlib.metadata import version

    res = run_cli("worker", "start", "--address", ray_head.address, "--token-file", str(ray_head.token_file),
                  "--resources-override", '{"gpu_apple_mps": 1}', env=clean_env(**{hook: value}))
    assert res.returncode == 4, res.stderr
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "version mismatch" in line
    assert f"Ray {version('ray')} / Python {platform.python_version()}" in line  # the head's
    assert named in line  # ours
    assert "ray start" not in res.stdout + res.stderr  # refused before anything ran


def test_missing_token_is_refused_clearly(ray_head, tmp_path):
    res = run_cli("worker", "start", "--address", ray_head.address, "--timeout", "5",
                  env=clean_env(HOME=str(tmp_path)))  # no ~/.ray/auth_token either
    assert res.returncode != 0
    assert "--token-file" in res.stderr and "Traceback" not in res.stderr


def test_closed_port_fails_fast_and_clearly():
    port = free_port()  # nothing listens there
    res = run_cli("worker", "start", "--address", f"127.0.0.1:{port}", "--timeout", "3")
    assert res.returncode == 3
    assert f"cannot reach the Ray head's GCS at 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr


def test_silent_head_fails_within_the_timeout():
    """A port that accepts TCP but never speaks gRPC (a firewall or the wrong service)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        t0 = time.monotonic()
        res = run_cli("worker", "start", "--address", f"127.0.0.1:{srv.getsockname()[1]}", "--timeout", "3")
        elapsed = time.monotonic() - t0
    assert res.returncode == 8, res.stderr
    assert "did not answer within 3s" in res.stderr
    assert elapsed < 3 + 10  # the probe is abandoned at the timeout (+ interpreter start-up slack)


def test_dry_run_masks_the_token(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cr3t-cluster-token\n")
    env = clean_env(RAY_AUTH_TOKEN="s3cr3t-env-token")
    res = run_cli("worker", "start", "--address", "10.0.0.5:6379", "--token-file", str(token), "--block",
                  "--dry-run", env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "s3cr3t" not in out + res.stderr
    assert f"RAY_AUTH_TOKEN_PATH={token}" in out and "RAY_AUTH_MODE=token" in out
    cmdline = out.strip().splitlines()[-1]
    assert " start --address 10.0.0.5:6379 " in cmdline and cmdline.endswith("--block")
    # Without a token file, an inherited RAY_AUTH_TOKEN is forwarded but shown masked.
    res = run_cli("worker", "start", "--address", "10.0.0.5:6379", "--dry-run", env=env)
    assert "RAY_AUTH_TOKEN=****" in res.stdout and "s3cr3t" not in res.stdout


def test_dry_run_on_linux_is_honest():
    res = run_cli("worker", "start", "--address", "10.0.0.5:6379", "--block", "--dry-run")
    assert res.returncode == 0, res.stderr
    cmdline = res.stdout.strip().splitlines()[-1]
    import mlx.core as mx

    if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        assert "--num-gpus 0" in cmdline
    assert "gpu_apple_mps" not in cmdline and "caffeinate" not in cmdline
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in cmdline
    assert "# supervised:" in res.stdout  # --block: the node runs under the rejoining supervisor
    # Ray's metrics on a fixed port (Ray's own default is a random one) and the scrape target shown
    assert " --metrics-export-port 8080 " in cmdline
    assert re.search(r"^# Prometheus scrape target: http://[0-9.]+:8080/metrics$", res.stdout, re.M), res.stdout


def test_metrics_export_port_theirs_wins_and_0_is_rays_choice():
    from mlx_ray.worker import command, resources

    res = resources.detect(num_cpus=1, num_gpus=0)
    theirs = command.build("10.0.0.5:6379", res, block=False, platform="linux", base_env={},
                           extra_args=["--metrics-export-port=9100", "--node-ip-address", "100.64.0.2"])
    assert [a for a in theirs.argv if "metrics-export-port" in a] == ["--metrics-export-port=9100"]
    assert command.scrape_target(theirs, "10.0.0.5") == "http://100.64.0.2:9100/metrics"
    ours = command.build("10.0.0.5:6379", res, block=False, platform="linux", base_env={}, metrics_export_port=9200)
    assert ours.argv[ours.argv.index("--metrics-export-port") + 1] == "9200"
    assert command.scrape_target(ours, "127.0.0.1") == "http://127.0.0.1:9200/metrics"  # the route to the head
    rays = command.build("10.0.0.5:6379", res, block=False, platform="linux", base_env={}, metrics_export_port=0)
    assert "--metrics-export-port" not in rays.argv and command.scrape_target(rays, "10.0.0.5") is None


def test_macos_command_shape(monkeypatch):
    """Metal is faked here (no Apple GPU on this machine); the rest is the real code path."""
    from mlx_ray.worker import command, resources

    monkeypatch.setattr(resources, "detect_accelerator", lambda: ("metal", "Metal Apple M2 Max (applegpu)", 64 * 2**30))
    monkeypatch.setattr(resources, "total_memory", lambda: 64 * 2**30)
    res = resources.detect(num_cpus=8)
    assert res.num_gpus == 1 and res.resources == {"gpu_apple_mps": 1.0}
    assert res.memory + res.object_store_memory <= 0.25 * 64 * 2**30 + 1  # 75% left to MLX
    cmd = command.build("10.0.0.5:6379", res, block=True, platform="darwin", base_env={"PATH": "/usr/bin"})
    assert cmd.argv[:2] == ["/usr/bin/caffeinate", "-s"] and cmd.argv[-1] == "--block"
    i = cmd.argv.index("--resources")
    assert json.loads(cmd.argv[i + 1]) == {"gpu_apple_mps": 1}
    assert cmd.argv[cmd.argv.index("--num-gpus") + 1] == "1"
    assert cmd.env_updates["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
    assert cmd.env_updates["RAY_worker_niceness"] == "0"  # replicas at the priority of a person's processes
    assert "LD_PRELOAD" not in cmd.env_updates


def test_performance_cores_on_apple_silicon(monkeypatch):
    from mlx_ray.worker import resources

    monkeypatch.setattr(resources.sys, "platform", "darwin")
    monkeypatch.setattr(resources, "_sysctl", lambda name: {"hw.perflevel0.physicalcpu": "8",
                                                            "hw.physicalcpu": "12"}.get(name))
    assert resources.detect_cpus()[0] == 8


def test_memory_split_leaves_mlx_its_share():
    from mlx_ray.worker.resources import GiB, OBJECT_STORE_MIN, memory_split

    for total in (8 * GiB, 24 * GiB, 64 * GiB, 192 * GiB):
        mem, store = memory_split(total, 0.75)
        assert store >= OBJECT_STORE_MIN and store <= 4 * GiB
        assert mem + store <= total * 0.25 + 1


def _service_args(tmp_path, *extra):
    token = tmp_path / "token"
    token.write_text("s3cr3t\n")
    return ["--address", "10.0.0.5:6379", "--token-file", str(token), "--resources-override",
            '{"gpu_apple_mps": 1}', "--num-cpus", "8", *extra]


def test_launchd_plist_install_and_print(tmp_path):
    path = tmp_path / "LaunchAgents" / "io.ray.test.plist"
    args = _service_args(tmp_path)
    res = run_cli("worker", "launchd", "install", "--user-agent", "--service-label", "io.ray.test",
                  "--path", str(path), "--log-dir", str(tmp_path / "logs"), *args)
    assert res.returncode == 0, res.stderr
    if sys.platform != "darwin":
        assert "not loaded" in res.stdout
    raw = path.read_bytes()
    assert b"s3cr3t" not in raw
    plist = plistlib.loads(raw)
    assert plist["Label"] == "io.ray.test" and plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    assert "UserName" not in plist  # a LaunchAgent runs as whoever logs in
    prog = plist["ProgramArguments"]
    assert prog[0] == sys.executable and prog[1:5] == ["-m", "mlx_ray.cli", "worker", "start"]
    assert "--block" in prog and prog[prog.index("--address") + 1] == "10.0.0.5:6379"
    assert json.loads(prog[prog.index("--resources-override") + 1]) == {"gpu_apple_mps": 1}
    assert prog[prog.index("--token-file") + 1] == str(tmp_path / "token")
    assert "--metrics-export-port" not in prog  # the default: `worker start` pins it itself
    env = plist["EnvironmentVariables"]
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "token")
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"  # a launchd agent always runs on macOS
    assert env["PATH"].split(":")[0] == str(__import__("pathlib").Path(sys.executable).parent)
    assert plist["StandardOutPath"].startswith(str(tmp_path / "logs"))
    assert plist["StandardErrorPath"].startswith(str(tmp_path / "logs"))
    # print shows the same file without writing anything
    printed = run_cli("worker", "launchd", "print", "--user-agent", "--service-label", "io.ray.test",
                      "--path", str(tmp_path / "other.plist"), "--log-dir", str(tmp_path / "logs"), *args)
    assert plistlib.loads(printed.stdout.encode()) == plist
    assert not (tmp_path / "other.plist").exists()
    res = run_cli("worker", "launchd", "uninstall", "--user-agent", "--service-label", "io.ray.test",
                  "--path", str(path))
    assert res.returncode == 0 and not path.exists()


def test_systemd_unit(tmp_path):
    from mlx_ray.worker.systemd import parse, unquote_words

    path = tmp_path / "mlx-ray-worker.service"
    res = run_cli("worker", "install", "--systemd", "--no-load", "--run-as", "nobody", "--path", str(path),
                  *_service_args(tmp_path, "--label", "pct=50%", "--metrics-export-port", "9100"),
                  "--", "--node-ip-address", "100.64.0.2")
    assert res.returncode == 0, res.stderr
    text = path.read_text()
    assert "s3cr3t" not in text
    unit = parse(text)
    service = dict(unit["Service"])
    assert service["Restart"] == "always" and dict(unit["Install"])["WantedBy"] == "multi-user.target"
    assert service["User"] == "nobody" and service["KillMode"] == "mixed"
    argv = unquote_words(service["ExecStart"])
    assert argv[0] == sys.executable and argv[3:5] == ["worker", "start"] and "--block" in argv
    assert json.loads(argv[argv.index("--resources-override") + 1]) == {"gpu_apple_mps": 1}
    assert argv[argv.index("--label") + 1] == "pct=50%"
    assert argv[argv.index("--metrics-export-port") + 1] == "9100"  # the unit keeps a non-default port
    assert argv[-3:] == ["--", "--node-ip-address", "100.64.0.2"]  # passed on to `ray start`
    envs = dict(unquote_words(v)[0].split("=", 1) for k, v in unit["Service"] if k == "Environment")
    assert envs["RAY_AUTH_MODE"] == "token" and envs["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "token")
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in envs  # a systemd unit is for Linux


@pytest.mark.parametrize("args,code,needle", [
    (["--address", "10.0.0.5:6379", "--resources-override", "{bad"], 2, "not valid JSON"),
    (["--address", "10.0.0.5:6379", "--resources-override", '{"CPU": 4}'], 2, "--num-cpus"),
    (["--address", "ray://10.0.0.5:10001"], 2, "not a URL"),
    (["--address", "10.0.0.5:99999"], 2, "port"),
    (["--address", "10.0.0.5:6379", "--token-file", "/nonexistent/token"], 3, "no such file"),
    (["--address", "10.0.0.5:6379", "--object-store-memory", "1MiB"], 2, "at least"),
])
def test_bad_input_is_one_line(args, code, needle):
    res = run_cli("worker", "start", *args, "--dry-run")
    assert res.returncode == code, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_systemd_quoting_round_trips():
    from mlx_ray.worker.systemd import quote, unquote_words

    words = ["/opt/py thon/bin/python", '{"gpu_apple_mps": 1}', "50%", "$HOME", "a\\b", "it's", "", "plain"]
    assert unquote_words(" ".join(quote(w) for w in words)) == words


def test_worker_and_doctor_import_neither_mlx_nor_ray():
    code = ("import sys, mlx_ray.worker.cli, mlx_ray.doctor, mlx_ray.worker.checks, mlx_ray.worker.launchd; "
            "print(sorted(m for m in ('mlx.core', 'ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------- the boot-time services' commands

class _Runner:
    """Replaces servicefile.run: records each command, answers with the given return codes."""

    def __init__(self, codes=None):
        self.calls, self.codes = [], codes or {}

    def __call__(self, argv, timeout=60):
        self.calls.append(list(argv))
        rc = next((c for k, c in self.codes.items() if k in argv[:2]), 0)  # by (sub)command
        return subprocess.CompletedProcess(argv, rc, "", "Bootstrap failed: 5: Input/output error" if rc else "")


@pytest.fixture
def runner(monkeypatch):
    from mlx_ray.worker import launchd, servicefile, systemd

    r = _Runner()
    monkeypatch.setattr(servicefile, "run", r)
    monkeypatch.setattr(launchd, "PLATFORM", "darwin")  # launchctl is never run: the runner records it
    monkeypatch.setattr(systemd, "PLATFORM", "linux")
    monkeypatch.setattr(systemd, "HAVE_SYSTEMCTL", True)
    return r


def _main(*argv):
    from mlx_ray.cli import main

    return main(list(argv))


def test_launch_daemon_install_and_uninstall(tmp_path, runner, capsys):
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "LaunchDaemons" / "io.ray.test.plist"
    logs = tmp_path / "logs"
    if os.geteuid() != 0:  # installing a daemon needs root; say so in one line
        rc = _main("worker", "install", "--run-as", "nobody", "--service-label", "io.ray.test", "--path", str(path),
                   "--log-dir", str(logs), *_service_args(tmp_path))
        assert rc == 2 and "needs root" in capsys.readouterr().err and not runner.calls
        return
    rc = _main("worker", "install", "--run-as", "nobody", "--service-label", "io.ray.test", "--path", str(path),
               "--log-dir", str(logs), *_service_args(tmp_path))
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert runner.calls == [["plutil", "-lint", str(path)],
                            ["launchctl", "bootout", "system/io.ray.test"],
                            ["launchctl", "enable", "system/io.ray.test"],
                            ["launchctl", "bootstrap", "system", str(path)]]
    assert "loaded io.ray.test into system as nobody" in out.out
    raw = path.read_bytes()
    assert b"s3cr3t" not in raw
    assert path.stat().st_mode & 0o777 == 0o644  # launchd ignores a daemon plist others can write
    plist = plistlib.loads(raw)
    assert plist["UserName"] == "nobody" and plist["GroupName"] == grp.getgrgid(nobody.pw_gid).gr_name
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True and plist["ThrottleInterval"] == 30
    assert plist["WorkingDirectory"] == nobody.pw_dir
    env = plist["EnvironmentVariables"]
    assert env["HOME"] == nobody.pw_dir and env["USER"] == "nobody"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "token") and "RAY_AUTH_TOKEN" not in env
    prog = plist["ProgramArguments"]
    assert prog[1:5] == ["-m", "mlx_ray.cli", "worker", "start"] and "--block" in prog
    assert "--no-supervise" not in prog  # the supervisor is what rejoins a restarted head
    assert plist["StandardOutPath"] == str(logs / "io.ray.test.out.log")
    assert plist["StandardErrorPath"] == str(logs / "io.ray.test.err.log")
    assert logs.stat().st_uid == nobody.pw_uid  # the worker's account writes its logs
    # print shows the same plist without writing or running anything
    runner.calls.clear()
    assert _main("worker", "print", "--run-as", "nobody", "--service-label", "io.ray.test", "--log-dir", str(logs),
                 *_service_args(tmp_path)) == 0
    assert plistlib.loads(capsys.readouterr().out.encode()) == plist and not runner.calls
    assert _main("worker", "uninstall", "--service-label", "io.ray.test", "--path", str(path)) == 0
    assert runner.calls == [["launchctl", "bootout", "system/io.ray.test"]] and not path.exists()


def test_launch_agent_is_still_there_for_who_prefers_it(tmp_path, runner, capsys):
    path = tmp_path / "LaunchAgents" / "io.ray.test.plist"
    rc = _main("worker", "install", "--user-agent", "--service-label", "io.ray.test", "--path", str(path),
               "--log-dir", str(tmp_path / "logs"), *_service_args(tmp_path))
    assert rc == 0, capsys.readouterr().err
    dom = f"gui/{os.getuid()}"
    assert runner.calls == [["plutil", "-lint", str(path)], ["launchctl", "bootout", f"{dom}/io.ray.test"],
                            ["launchctl", "enable", f"{dom}/io.ray.test"],
                            ["launchctl", "bootstrap", dom, str(path)]]
    assert "UserName" not in plistlib.loads(path.read_bytes())


def test_failed_bootstrap_is_one_line(tmp_path, runner, capsys):
    runner.codes["bootstrap"] = 5
    rc = _main("worker", "install", "--user-agent", "--service-label", "io.ray.test",
               "--path", str(tmp_path / "a.plist"), "--log-dir", str(tmp_path / "logs"), *_service_args(tmp_path))
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "launchctl bootstrap" in err and "Input/output" in err


def test_daemon_needs_root_and_never_runs_as_root(tmp_path, runner, monkeypatch, capsys):
    import types

    from mlx_ray.worker import launchd

    args = ["--path", str(tmp_path / "d.plist"), "--log-dir", str(tmp_path / "logs"), *_service_args(tmp_path)]
    for extra, needle in ((["--run-as", "root"], "refusing to run the worker as root"),
                          (["--run-as", "no-such-user-xyz"], "no such user"),
                          (["--user-agent", "--run-as", "nobody"], "--run-as is for a system service")):
        assert _main("worker", "install", *extra, *args) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    monkeypatch.setattr(launchd, "os", types.SimpleNamespace(geteuid=lambda: 501, getuid=lambda: 501))
    assert _main("worker", "install", "--run-as", "nobody", *args) == 2
    err = capsys.readouterr().err.strip()
    assert "needs root: rerun with sudo" in err and len(err.splitlines()) == 1
    assert not runner.calls and not (tmp_path / "d.plist").exists()


def test_systemd_system_and_user_units_commands(tmp_path, runner, capsys):
    from mlx_ray.worker.systemd import parse

    path = tmp_path / "mlx-ray-test.service"
    rc = _main("worker", "install", "--systemd", "--run-as", "nobody", "--path", str(path), *_service_args(tmp_path))
    if os.geteuid() != 0:  # a system unit needs root: refused in one line, nothing written or run
        assert rc == 2 and "needs root" in capsys.readouterr().err and not runner.calls and not path.exists()
    else:
        assert rc == 0, capsys.readouterr().err
        assert runner.calls == [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "mlx-ray-test"]]
        service = dict(parse(path.read_text())["Service"])
        assert service["User"] == "nobody" and service["Restart"] == "always"
        assert dict(parse(path.read_text())["Install"])["WantedBy"] == "multi-user.target"
        runner.calls.clear()
        assert _main("worker", "uninstall", "--systemd", "--path", str(path)) == 0
        assert runner.calls == [["systemctl", "disable", "--now", "mlx-ray-test"], ["systemctl", "daemon-reload"]]
        assert not path.exists()
    runner.calls.clear()
    user = tmp_path / "user.service"
    assert _main("worker", "install", "--systemd", "--user-agent", "--path", str(user), *_service_args(tmp_path)) == 0
    assert runner.calls == [["systemctl", "--user", "daemon-reload"],
                            ["systemctl", "--user", "enable", "--now", "user"]]
    unit = parse(user.read_text())
    assert "User" not in dict(unit["Service"]) and dict(unit["Install"])["WantedBy"] == "default.target"
