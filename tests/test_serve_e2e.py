"""End to end: the official `openai` client -> HTTP -> Ray Serve -> MLXEngine -> the real fixture model.

One two-node Ray cluster (``tests/fixtures_ray.py``: a head without gpu_apple_mps and
a "Mac" node with it) and the session's application (``tests/fixtures_serve.py``:
``smol`` with a tiny admission limit, and ``smol-faulty`` behind the fault-injecting
engine), deployed once per session.

Generations are kept short (a few tokens) so the module stays within minutes.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from fixtures_serve import APP, LIMIT, MSG
from fixtures_serve import engine_stats as _stats
from fixtures_serve import serve_handle as handle
from fixtures_serve import wait_idle as _wait_idle
from mlx_ray.serve.config import ServeConfig
from mlx_ray.serve.testing import FAULT_TRIGGER, WEDGE_TRIGGER

pytestmark = [pytest.mark.slow, pytest.mark.ray]

@pytest.fixture(scope="session")
def oa(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_replica_lands_on_the_gpu_apple_mps_node(served, ray_cluster):
    info = handle("smol").info.remote().result(timeout_s=60)
    nodes = ray_cluster.node_ids()
    assert info["node_id"] == nodes["mac"] != nodes["head"]
    # The replica process got the OpenBLAS preload through its runtime_env, and the CPU kernels.
    from mlx_ray.blas import wanted_library

    if wanted_library():
        assert info["blas"].startswith("openblas"), info
        # Ray set OMP_NUM_THREADS to the replica's num_cpus; the engine gave OpenBLAS every CPU anyway
        assert info["omp_num_threads"] == "1" and info["blas_threads"] == info["cpus"] > 1, info
    assert info["kernels"].get("dense_cpu") is True, info
    import os

    # the node's raylet was told RAY_worker_niceness=0: replicas at the priority of the process
    # that started the cluster (this one), not Ray's default +15
    assert info["niceness"] == os.nice(0), info


def test_chat_stream_equals_non_stream_and_usage(oa, mlx_f32):
    from transformers import AutoTokenizer

    full = oa.chat.completions.create(model="smol", messages=MSG, max_tokens=8, temperature=0)
    chunks = list(oa.chat.completions.create(model="smol", messages=MSG, max_tokens=8, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and "Paris" in text
    ids = AutoTokenizer.from_pretrained(str(mlx_f32)).apply_chat_template(MSG, add_generation_prompt=True)
    prompt_len = len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)
    assert full.usage.prompt_tokens == prompt_len == chunks[-1].usage.prompt_tokens
    assert full.usage.completion_tokens == chunks[-1].usage.completion_tokens
    assert full.usage.completion_tokens == 8 or full.choices[0].finish_reason == "stop"


def test_completions_max_tokens_and_stop(oa):
    r = oa.completions.create(model="smol", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    text = r.choices[0].text
    word = text.split()[1]
    s = oa.completions.create(model="smol", prompt="The capital of France is", max_tokens=6, temperature=0, stop=[word])
    assert s.choices[0].finish_reason == "stop"
    assert s.choices[0].text == text[: text.index(word)]
    st = list(oa.completions.create(model="smol", prompt="The capital of France is", max_tokens=6, temperature=0,
                                    stream=True))
    assert "".join(c.choices[0].text for c in st) == text


def test_seed_reproducible_and_n2(oa):
    kw = dict(model="smol", messages=MSG, max_tokens=6, temperature=1.0, seed=1234)
    a = oa.chat.completions.create(n=2, **kw)
    b = oa.chat.completions.create(n=2, **kw)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 12


def test_logprobs(oa):
    r = oa.chat.completions.create(model="smol", messages=MSG, max_tokens=3, temperature=0, logprobs=True,
                                   top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:  # greedy: the chosen token is the best of the top list
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob <= 0 and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4


def test_greedy_identity_with_mlx_ray_generate(oa, mlx_f32):
    r = oa.chat.completions.create(model="smol", messages=MSG, max_tokens=12, temperature=0)
    gen = subprocess.run([sys.executable, "-m", "mlx_ray.cli", "generate", "--model", str(mlx_f32), "--prompt",
                          MSG[0]["content"], "--max-tokens", "12", "--quiet"], capture_output=True, text=True,
                         timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert r.choices[0].message.content == gen.stdout.rstrip("\n")


def _post(url, body, **kw):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120, **kw)


def test_error_statuses(served):
    url = served[0]
    r = _post(url, {"model": "nope", "messages": MSG})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = _post(url, {"model": "smol", "messages": MSG, "top_p": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    r = _post(url, {"model": "smol", "messages": MSG, "max_tokens": 100000})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    r = httpx.post(url + "/v1/completions", content=b'{"model": "smol", "prompt": ', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = _post(url, {"model": "smol", "messages": MSG, "max_tokens": 400, "timeout": 0.3, "ignore_eos": True})
    assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="nope", messages=MSG)


def test_client_disconnect_frees_the_slot(served):
    url = served[0]
    _wait_idle()
    body = {"model": "smol", "messages": MSG, "max_tokens": 400, "stream": True, "temperature": 0,
            "ignore_eos": True}  # keep going past the answer
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert any(x.startswith("data: {") for x in got)
            busy = _stats()
            assert busy["inflight"] == 1
    idle = _wait_idle(timeout=20)
    assert idle["inflight"] == 0


def test_overload_gets_429_and_admitted_requests_complete(served):
    url = served[0]
    _wait_idle()
    body = {"model": "smol", "messages": MSG, "max_tokens": 6, "temperature": 0}
    with cf.ThreadPoolExecutor(12) as ex:
        rs = list(ex.map(lambda _: _post(url, body), range(12)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429, 503}, codes
    assert codes.count(200) >= LIMIT["max_num_seqs"] and (codes.count(429) + codes.count(503)) >= 1, codes
    for r in rs:
        if r.status_code == 200:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"]


def test_ingress_timeout_is_504_and_cancels_the_wedged_request(served, monkeypatch):
    """A wedged step answers nothing; past its deadline plus the grace the ingress gives up."""
    from mlx_ray.serve import ingress

    url = served[0]
    t0 = time.monotonic()
    r = _post(url, {"model": "smol-faulty", "messages": MSG, "max_tokens": 4, "stop": [WEDGE_TRIGGER], "timeout": 1})
    took = time.monotonic() - t0
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["type"] == "timeout_error" and "did not answer" in err["message"]
    assert 1 + ingress.UPSTREAM_GRACE_S - 1 < took < 1 + ingress.UPSTREAM_GRACE_S + 15
    deadline = time.monotonic() + 20  # the cancel reaches the replica's generator
    while _stats("smol-faulty")["wedged"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _stats("smol-faulty")["wedged"] == 0
    assert _wait_idle("smol-faulty")["inflight"] == 0
    # streamed: the 504 comes as the response status too (nothing was sent before the first event)
    body = {"model": "smol-faulty", "messages": MSG, "max_tokens": 4, "stop": [WEDGE_TRIGGER], "timeout": 1,
            "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 504


def test_replica_killed_mid_stream_ends_the_stream_with_an_error(served, oa):
    """SIGKILL the model's replica while a stream is open: a terminal error event, not a hang;
    Serve's replacement replica then serves."""
    import os
    import signal

    stream = oa.chat.completions.create(model="smol-faulty", messages=MSG, max_tokens=400, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    pid = handle("smol-faulty").info.remote().result(timeout_s=60)["pid"]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(openai.APIError, match="replica"):
        for _ in it:
            pass
    assert time.monotonic() - t0 < 60
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        r = _post(served[0], {"model": "smol-faulty", "messages": MSG, "max_tokens": 2})
        if r.status_code == 200:
            break
        time.sleep(2)
    assert r.status_code == 200, r.text
    assert handle("smol-faulty").info.remote().result(timeout_s=60)["pid"] != pid


def test_engine_fault_500_then_health_503_then_serve_restarts_it(served):
    url = served[0]
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    r = _post(url, {"model": "smol-faulty", "messages": MSG, "max_tokens": 2, "stop": [FAULT_TRIGGER]})
    assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
    h = httpx.get(url + "/health", timeout=30)
    assert h.status_code == 503 and "smol-faulty" in h.json()["error"]["message"]
    deadline = time.monotonic() + 180  # Serve's health check fails, it replaces the replica
    while time.monotonic() < deadline and httpx.get(url + "/health", timeout=30).status_code != 200:
        time.sleep(2)
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    ok = _post(url, {"model": "smol-faulty", "messages": MSG, "max_tokens": 2})
    assert ok.status_code == 200


def test_models_endpoint_lists_both(oa):
    assert sorted(m.id for m in oa.models.list().data) == ["smol", "smol-faulty"]


def test_replica_stays_pending_with_a_clear_message_without_the_resource(served, mlx_f32):
    from ray import serve
    from mlx_ray.errors import EngineFault
    from mlx_ray.serve.cli import deploy, wait_ready

    cfg = ServeConfig.from_args({"port": served[1].port, "models": [
        {"model": str(mlx_f32), "name": "nowhere", "placement": {"resource": "gpu_apple_nowhere"}}]})
    said = []
    try:
        url = deploy(cfg, app_name="pending", route_prefix="/pending", proxy_location="HeadOnly")
        with pytest.raises(EngineFault, match="not healthy after"):
            wait_ready(cfg, url, app_name="pending", timeout=8, say=said.append)
        app = serve.status().applications["pending"]
        assert "RUNNING" not in str(app.status)
        assert str(app.deployments[cfg.models[0].deployment_name].status).endswith("UPDATING")
        assert len(said) == 1 and "gpu_apple_nowhere" in said[0] and "ray start" in said[0], said
    finally:
        serve.delete("pending", _blocking=False)


def test_prometheus_metrics_are_exported(served, ray_cluster, oa):
    """Ray's metrics agent on the model's node exports our ray.serve.metrics (reported every few seconds)."""
    import ray

    # a request of its own (several tokens, so a time per output token), whatever ran before
    r = oa.completions.create(model="smol", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.usage.completion_tokens == 6
    node = next(n for n in ray.nodes() if n["Alive"] and n["NodeID"] == ray_cluster.node_ids()["mac"])
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    want = ["mlx_ray_requests_total", "mlx_ray_generation_tokens_total", "mlx_ray_time_to_first_token_seconds",
            "mlx_ray_request_time_per_output_token_seconds_count", "mlx_ray_requests_waiting",
            "mlx_ray_kv_cache_usage_ratio"]
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(url, timeout=10).text
        missing = [w for w in want if w not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, missing
    for name in ("mlx_ray_generation_tokens_total", "mlx_ray_request_time_per_output_token_seconds_count"):
        line = next(x for x in text.splitlines() if not x.startswith("#") and name in x and 'model="smol"' in x)
        assert float(line.rsplit(" ", 1)[1]) > 0, line


def _start_cli_on_cluster(ray_cluster, mlx_f32, *extra):
    from fixtures_ray import free_ports

    cmd = [sys.executable, "-m", "mlx_ray.cli", "serve", "--address", ray_cluster.address, "--model", str(mlx_f32),
           "--served-model-name", "remote-smol", "--resource", "none", "--num-cpus", "0", "--max-model-len", "512",
           "--port", str(free_ports(1)[0]), *extra]
    env = {**__import__("os").environ, "RAY_AUTH_MODE": "disabled"}  # the test cluster runs without token auth
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def test_cli_deploys_next_to_a_running_app_on_a_remote_cluster(served, oa, ray_cluster, mlx_f32):
    """`mlx-ray serve --address` against a cluster whose Serve already runs another app, as a RayService would."""
    import signal

    from ray import serve

    # Serve's real port: whichever app started Serve on this cluster first chose it (its config's port)
    from urllib.parse import urlparse

    served_port = urlparse(served[0]).port
    proc = _start_cli_on_cluster(ray_cluster, mlx_f32, "--app-name", "remote", "--route-prefix", "/remote")
    try:
        url, deadline = None, time.monotonic() + 300
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "ready at " in line:
                url = line.split("ready at ", 1)[1].split()[0]
        assert url, f"never ready: rc={proc.poll()} {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}"
        # The cluster's Serve keeps its own port: the printed URL must be where it really listens.
        assert url == f"http://127.0.0.1:{served_port}/remote/v1", url
        remote = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        out = remote.chat.completions.create(model="remote-smol", messages=MSG, max_tokens=4, temperature=0)
        assert out.choices[0].message.content and out.usage.completion_tokens >= 1
        assert {m.id for m in oa.models.list().data} >= {"smol"}  # the other app still answers at "/"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    assert rc == 0, proc.stderr.read()[-2000:]
    apps = serve.status().applications
    assert "remote" not in apps and "RUNNING" in str(apps[APP].status)  # only its own app was deleted


def test_cli_refuses_a_route_prefix_taken_on_the_cluster(served, ray_cluster, mlx_f32):
    proc = _start_cli_on_cluster(ray_cluster, mlx_f32, "--app-name", "clash")  # route prefix "/" is taken
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("mlx-ray serve: error: route prefix / is already used"), err
    from ray import serve

    assert "clash" not in serve.status().applications


def test_api_key_reaches_the_ingress_without_entering_ray_gcs(served, mlx_f32, tmp_path):
    """--api-key-file: the ingress reads the file on its node; no GCS value holds the key."""
    import ray
    from ray import serve
    from ray.experimental import internal_kv

    from mlx_ray.serve.cli import deploy

    secret = "sk-mlxray-" + os.urandom(8).hex()
    key = tmp_path / "key"
    key.write_text(secret + "\n")
    cfg = ServeConfig.from_args({"port": served[1].port, "api_key_file": str(key), "models": [
        {"model": str(mlx_f32), "name": "keyed", "engine": LIMIT, "placement": {"resource": None, "num_cpus": 0}}]})
    try:
        url = deploy(cfg, app_name="keyed", route_prefix="/keyed", proxy_location="HeadOnly")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "RUNNING" not in str(serve.status().applications["keyed"].status):
            time.sleep(1)
        body = {"model": "keyed", "messages": MSG, "max_tokens": 2}
        assert _post(url, body).status_code == 401
        assert _post(url, body, headers={"Authorization": f"Bearer {secret}"}).status_code == 200
        hits = []
        for ns in (None, "serve", "serve_controller", "default", "runtime_env"):
            try:
                keys = internal_kv._internal_kv_list("", namespace=ns)
            except Exception:  # noqa: BLE001 - a namespace that does not exist
                continue
            for k in keys:
                v = internal_kv._internal_kv_get(k, namespace=ns) or b""
                if secret.encode() in v:
                    hits.append((ns, k))
        assert ray.is_initialized() and not hits, f"the key is stored in the GCS under {hits}"
    finally:
        serve.delete("keyed", _blocking=False)
