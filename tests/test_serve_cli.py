"""`mlx-ray serve` as a user runs it: embedded Ray, the fixture model, the printed curl line, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_mlx_ray_serve_prints_a_working_curl_line_and_stops_on_ctrl_c(mlx_f32, tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_ray.cli", "serve", "--model", str(mlx_f32), "--port", "0",
                                 "--max-num-seqs", "2"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C to stop" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        text = log.read_text()
        assert "ready at http://127.0.0.1:" in text
        curl = next(line.strip() for line in text.splitlines() if line.strip().startswith("curl "))
        answer = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=120)
        body = json.loads(answer.stdout)
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        _assert_embedded_control_plane(proc.pid)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert "shutting down" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _assert_embedded_control_plane(root: int) -> None:
    """The cluster `mlx-ray serve` started: Serve's controller got the slower control loop
    (control_loop_interval_s), Ray's own event-loop instrumentation is off in Serve's processes
    (ray_event_stats), and the model's replica and the proxy run at the server's own priority."""
    import psutil

    base = psutil.Process(root).nice()
    deadline = time.monotonic() + 60
    while True:  # a worker takes its ray::<Actor> title a moment after it exists: under load, after "ready"
        found: dict[str, list[psutil.Process]] = {}
        for p in psutil.Process(root).children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:  # gone, or a zombie, since children() listed it
                continue
            for key in ("ServeController", "ServeReplica", "ProxyActor"):
                if key in cmd:
                    found.setdefault(key, []).append(p)
        if len(found) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(found) == {"ServeController", "ServeReplica", "ProxyActor"}, found
    (controller,) = found["ServeController"]
    assert controller.environ().get("RAY_SERVE_CONTROL_LOOP_INTERVAL_S") == "0.5"
    for p in [controller, *found["ServeReplica"], *found["ProxyActor"]]:  # ray_event_stats: false
        env = p.environ()
        assert (env.get("RAY_event_stats"), env.get("RAY_emit_main_service_metrics")) == ("0", "0"), p.cmdline()
    assert [p.nice() for p in found["ServeReplica"]] == [base], found
    assert found["ProxyActor"] and {p.nice() for p in found["ProxyActor"]} == {base}, found
