"""The RayService path against a stock Ray head (no mlx-ray, no MLX), on this session's Ray.

``.ci/run`` runs this module twice: on the newest Ray and on the cluster's 2.53.0.
The head's environment applies the block that ``mlx-ray serve --print-config``
prints (model by ``MODEL_ID``/``MAX_MODEL_LEN``, route prefix ``/llm-secondary``,
the code from ``mlx-ray package`` through ``--package-uri``) with ``serve deploy``,
as KubeRay does; then ``mlx-ray serve --address`` deploys a second app from the
node's side. Serve retries a failed build (and a retry can land on the node that
has mlx-ray), so the test fails if any build attempt failed, not only the last.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml

from fixtures_ray import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.ray]

MSG = [{"role": "user", "content": "What is the capital of France?"}]
PREFIX = "/llm-secondary"


def _wait_running(stock, app: str, timeout: float = 300) -> dict:
    """Poll `serve status` from the head's env until `app` runs; fail on the first failure seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        r = stock.head_cli("serve", "status", "--address", stock.dashboard, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        status = yaml.safe_load(r.stdout) or {}
        last = (status.get("applications") or {}).get(app)
        if last:
            assert last["status"] not in ("DEPLOY_FAILED", "UNHEALTHY"), yaml.safe_dump(last)[-3000:]
            failed = [a for a in stock.build_attempts() if a["state"] == "FAILED"]
            assert not failed, f"a build attempt failed (Serve would retry it): {failed[0].get('error_message')}"
            if last["status"] == "RUNNING":
                return last
        time.sleep(1.0)
    raise AssertionError(f"{app} not RUNNING after {timeout:.0f}s: {last}")


def _chat(base_url: str, model: str) -> str:
    oa = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    r = oa.chat.completions.create(model=model, messages=MSG, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    return r.choices[0].message.content


def test_stock_head_has_neither_mlx_ray_nor_mlx(stock_cluster):
    r = stock_cluster.head_cli("python", "-c", "import importlib.util as u, ray; "
                               "print(ray.__version__, u.find_spec('mlx_ray'), u.find_spec('mlx'))")
    assert r.returncode == 0, r.stderr
    import ray

    assert r.stdout.split() == [ray.__version__, "None", "None"]


def test_printed_block_deploys_from_the_stock_head(stock_cluster, mlx_f32, model_cache, tmp_path):
    model = str(mlx_f32.relative_to(model_cache))  # a cache name: the Mac resolves it on its cache
    cli = [sys.executable, "-m", "mlx_ray.cli", "serve", "--model", model, "--max-model-len", "1024",
           "--num-cpus", "1", "--print-config", "--env-vars", "--route-prefix", PREFIX,
           "--package-uri", stock_cluster.package_uri]
    out = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    block = yaml.safe_load(out)
    app = block["applications"][0]
    assert app["runtime_env"]["env_vars"] == {"MODEL_ID": model, "MAX_MODEL_LEN": "1024"}
    assert app["runtime_env"]["py_modules"] == [stock_cluster.package_uri]
    assert app["route_prefix"] == PREFIX and app["args"] == {}
    # what a RayService adds around the applications
    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": stock_cluster.http_port},
           **block}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = stock_cluster.head_cli("serve", "deploy", str(path), "--address", stock_cluster.dashboard)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    _wait_running(stock_cluster, app["name"])

    attempts = stock_cluster.build_attempts()
    assert attempts and all(a["state"] == "FINISHED" for a in attempts), attempts
    assert {a["node_id"] for a in attempts} == {stock_cluster.head_node_id()}, "the build did not run on the head"
    assert "ModuleNotFoundError" not in stock_cluster.controller_log()

    base = f"http://127.0.0.1:{stock_cluster.http_port}{PREFIX}/v1"
    assert "Paris" in _chat(base, model)
    oa = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    card = next(m for m in oa.models.list().data if m.id == model)
    assert card.model_dump().get("max_model_len") == 1024


def test_serve_address_from_the_node_side(stock_cluster, mlx_f32, model_cache):
    """`mlx-ray serve --address HEAD` next to the config-deployed app: the code travels with the job."""
    model = str(mlx_f32)
    proc = subprocess.Popen([sys.executable, "-m", "mlx_ray.cli", "serve", "--address", stock_cluster.gcs,
                             "--model", model, "--served-model-name", "remote", "--max-model-len", "512",
                             "--app-name", "remote", "--route-prefix", "/remote",
                             "--ready-timeout", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=stock_cluster.node_env)
    lines = []
    try:
        deadline = time.monotonic() + 330
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "ready at" in line:
                break
        assert any("ready at" in ln for ln in lines), "".join(lines)[-3000:]
        url = next(ln for ln in lines if "ready at" in ln).split("ready at", 1)[1].split()[0]
        assert url.endswith("/remote/v1"), url
        assert "Paris" in _chat(url, "remote")
        # the config-deployed app is untouched
        assert "Paris" in _chat(f"http://127.0.0.1:{stock_cluster.http_port}{PREFIX}/v1",
                                str(mlx_f32.relative_to(model_cache)))
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines)[-2000:] + rest[-2000:]


def _deployed_apps(stock) -> list[dict]:
    """The config-deployed applications running now (`serve deploy` declares the whole set: keep them)."""
    r = stock.head_cli("serve", "status", "--address", stock.dashboard)
    running = (yaml.safe_load(r.stdout) or {}).get("applications") or {}
    current = stock.head_cli("serve", "config", "--address", stock.dashboard).stdout
    return [a for a in yaml.safe_load_all(current) if isinstance(a, dict) and a.get("name") in running]


def test_the_router_block_deploys_from_the_stock_head_beside_the_model(stock_cluster, mlx_f32, model_cache, tmp_path):
    """The README's RayService shape: the mlx-ray app and the router app side by side in one config,
    applied from the head's own environment; the router runs on the head and answers under its public name."""
    model = str(mlx_f32.relative_to(model_cache))
    arm = f"http://127.0.0.1:{stock_cluster.http_port}{PREFIX}/v1"
    (dead,) = free_ports(1)
    router_cfg = tmp_path / "router.yaml"
    router_cfg.write_text(yaml.safe_dump({"public_model": "chat", "policy": "overflow", "arms": [
        {"name": "mac", "role": "primary", "base_url": arm, "model": model, "max_running": 4,
         "load": {"mlx_ray": arm + "/load"}},
        {"name": "elsewhere", "role": "secondary", "base_url": f"http://127.0.0.1:{dead}/v1", "model": "x"}]}))
    out = subprocess.run([sys.executable, "-m", "mlx_ray.cli", "route", "--config", str(router_cfg), "--print-config",
                          "--route-prefix", "/router", "--package-uri", stock_cluster.package_uri],
                         capture_output=True, text=True, check=True).stdout
    (block,) = yaml.safe_load(out)["applications"]
    assert block["import_path"] == "mlx_ray.router:app" and block["route_prefix"] == "/router"
    assert block["deployments"][0]["ray_actor_options"]["resources"] == {"node:__internal_head__": 0.001}
    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": stock_cluster.http_port},
           "applications": [a for a in _deployed_apps(stock_cluster) if a["name"] != block["name"]] + [block]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = stock_cluster.head_cli("serve", "deploy", str(path), "--address", stock_cluster.dashboard)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    _wait_running(stock_cluster, block["name"])
    base = f"http://127.0.0.1:{stock_cluster.http_port}/router"
    health = httpx.get(base + "/health", timeout=30).json()
    assert health["node_id"] == stock_cluster.head_node_id(), health
    assert health["arms"]["mac"]["up"] and not health["arms"]["elsewhere"]["up"], health
    assert "Paris" in _chat(base + "/v1", "chat")


def test_without_the_package_the_stock_head_fails_the_build(stock_cluster, mlx_f32, model_cache, tmp_path):
    """The control: the same block without --package-uri fails on this head, and the guard sees it.

    Last in the module: it leaves a failed build in the cluster's task history."""
    model = str(mlx_f32.relative_to(model_cache))
    out = subprocess.run([sys.executable, "-m", "mlx_ray.cli", "serve", "--model", model, "--print-config",
                          "--env-vars", "--app-name", "no-package", "--route-prefix", "/no-package"],
                         capture_output=True, text=True, check=True).stdout
    block = yaml.safe_load(out)
    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": stock_cluster.http_port},
           "applications": _deployed_apps(stock_cluster) + block["applications"]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = stock_cluster.head_cli("serve", "deploy", str(path), "--address", stock_cluster.dashboard)
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(AssertionError, match="No module named 'mlx_ray'"):
        _wait_running(stock_cluster, "no-package", timeout=180)
