"""The seed's family and a sliding-window family through Ray Serve, with the official client.

One application on the session's two-node cluster serves the tiny AutoAWQ qwen2
(q/k/v biases, GEMM, group 128: the shape of Qwen2.5-32B-Instruct-AWQ) and the
tiny gemma3 (sliding-window layers); each answer must be the tokens mlx-lm's own
greedy loop gives for the same chat prompt.
"""

from __future__ import annotations

import openai
import pytest

from mlx_ray.serve.config import ServeConfig

# Not marked ``ray``: the families differ in the engine, not in what they ask of Ray; the Serve path
# they take is test_serve_e2e's, which the cluster's Ray 2.53.0 runs too (scripts/test.sh).
pytestmark = [pytest.mark.slow]

APP = "mlx-ray-zoo"
MSG = [{"role": "user", "content": "What is the capital of France?"}]
N = 8


@pytest.fixture(scope="module")
def zoo_served(ray_cluster, awq_qwen2_model, zoo_model):
    from fixtures_ray import free_ports
    from ray import serve

    from mlx_ray.serve.cli import deploy, wait_ready

    gemma = zoo_model("gemma3_text")
    # no custom resource and no CPU reservation: the session's e2e app holds the 'Mac' node's
    placement = {"resource": None, "num_cpus": 0}
    cfg = ServeConfig.from_args({"port": free_ports(1)[0], "models": [
        {"model": str(awq_qwen2_model), "name": "awq-qwen2", "engine": {"max_model_len": 256}, "placement": placement},
        {"model": str(gemma), "name": "gemma3", "engine": {"max_model_len": 256}, "placement": placement},
    ]})
    url = deploy(cfg, app_name=APP, route_prefix="/zoo", proxy_location="HeadOnly")
    wait_ready(cfg, url, app_name=APP, timeout=300)
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120), {
        "awq-qwen2": awq_qwen2_model, "gemma3": gemma}
    serve.delete(APP)


def _mlx_lm_text(path) -> str:
    from mlx_lm import load, stream_generate

    model, tok = load(str(path))
    prompt = tok.apply_chat_template(MSG, add_generation_prompt=True)
    return "".join(r.text for r in stream_generate(model, tok, prompt=prompt, max_tokens=N))


@pytest.mark.parametrize("name", ["awq-qwen2", "gemma3"])
def test_served_family_is_greedy_identical_to_mlx_lm(zoo_served, name):
    oa, paths = zoo_served
    r = oa.chat.completions.create(model=name, messages=MSG, max_tokens=N, temperature=0)
    assert r.usage.completion_tokens == N and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == _mlx_lm_text(paths[name])
