"""The HTTP layer (ingress + LLMServer) against a fake engine, without Ray.

The fake engine is a unit-test double of the protocol (mlx_ray/engine/protocol.py):
deterministic "words" instead of a model, the engine's admission limit, deadlines
and cancellation. It lets these tests pin every OpenAI shape and error status in
a second; the real engine and model go through Ray Serve in test_serve_e2e.py.
Requests go through the official `openai` client over Starlette's TestClient.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import openai
import pytest
from fastapi.testclient import TestClient

from mlx_ray.engine.protocol import (EngineConfig, FinishEvent, GenerationRequest, LLMEngine, TokenEvent,
                                     TokenLogprob)
from mlx_ray.errors import BadRequest, ContextOverflow, DeadlineExceeded, EngineFault, Overloaded
from mlx_ray.serve.config import ServeConfig
from mlx_ray.serve.generation import ModelRequest, TextPrompt
from mlx_ray.serve.ingress import OpenAIIngress, create_app
from mlx_ray.serve.local import LocalHandle
from mlx_ray.serve.server import MAX_COALESCE_S, Inbox, LLMServer

pytestmark = pytest.mark.ray  # run on the cluster's Ray by scripts/test.sh

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "zeta"]


class FakeEngine(LLMEngine):
    """Token id i -> text WORDS[i % 8] + " ". Token 7 is EOS. Prompt ids: one per character."""

    max_model_len: int = 256  # set per instance below (the contract declares it)

    def __init__(self, model: str, config: EngineConfig):
        self.config = config
        self.max_model_len = config.max_model_len or 256
        self.model_id = model
        self.active: set[str] = set()
        self.cancelled: list[str] = []
        self.dead: str | None = None
        self.step_s = 0.002

    async def start(self):
        pass

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 500 for c in text]

    def encode_chat(self, messages, chat_template=None, add_generation_prompt=True):
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def decode(self, ids):
        return "".join(WORDS[i % 8] + " " for i in ids)

    async def generate(self, req: GenerationRequest):
        if self.dead:
            raise EngineFault(self.dead)
        sp = req.sampling
        if len(req.prompt_token_ids) + sp.max_tokens > self.max_model_len:
            raise ContextOverflow(f"{len(req.prompt_token_ids)} + {sp.max_tokens} > {self.max_model_len}",
                                  param="max_tokens")
        if len(self.active) >= self.config.max_num_seqs + self.config.max_queue:
            raise Overloaded("queue full", retry_after=2.0)
        self.active.add(req.request_id)
        rng = random.Random(sp.seed if sp.seed is not None else time.time_ns())
        text, n = "", 0
        try:
            while n < sp.max_tokens:
                if req.deadline is not None and time.monotonic() > req.deadline:
                    yield FinishEvent("error", len(req.prompt_token_ids), n, error=DeadlineExceeded("deadline passed"))
                    return
                await asyncio.sleep(self.step_s)
                tok = (n * 3 + len(req.prompt_token_ids)) % 7 if sp.temperature == 0 else rng.randrange(7)
                n += 1
                word = WORDS[tok] + " "
                cut = [text.find(s, 0) for s in sp.stop if s in text + word]
                if cut:
                    yield FinishEvent("stop", len(req.prompt_token_ids), n)
                    return
                text += word
                lp = [TokenLogprob(tok, -0.5, [(tok, -0.5), ((tok + 1) % 7, -1.5)][: sp.top_logprobs])] if sp.logprobs else None
                yield TokenEvent([tok], word, lp)
            yield FinishEvent("length", len(req.prompt_token_ids), n, cached_tokens=3)
        finally:
            self.active.discard(req.request_id)

    async def cancel(self, request_id):
        self.cancelled.append(request_id)

    def check_health(self):
        if self.dead:
            raise EngineFault(self.dead)

    def stats(self):
        return {"running": len(self.active), "waiting": 0}

    async def shutdown(self):
        pass


def make(api_key=None, max_num_seqs=4, max_queue=0, **top):
    cfg = {"models": [{"model": "fake-dir", "name": "fake", "engine": {"max_num_seqs": max_num_seqs,
                                                                       "max_queue": max_queue, "max_model_len": 128}}],
           **top}
    if api_key:
        cfg["api_key"] = api_key
    scfg = ServeConfig.from_args(cfg)
    engine = FakeEngine("fake-dir", scfg.models[0].engine)
    server = LLMServer(scfg.models[0], stream_batching_interval_ms=5, engine=engine)
    ingress = OpenAIIngress({"fake": LocalHandle(server)}, scfg)
    client = TestClient(create_app(ingress))
    return client, engine


@pytest.fixture(scope="module")
def api():
    client, engine = make()
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    return client, oa, engine


MSG = [{"role": "user", "content": "hi"}]


def test_chat_non_streaming_shape_and_usage(api):
    _, oa, _ = api
    r = oa.chat.completions.create(model="fake", messages=MSG, max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert len(r.choices[0].message.content.split()) == 5
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == len("<user>hi<assistant>")
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_chat_streaming_matches_non_streaming_and_reports_usage(api):
    _, oa, _ = api
    full = oa.chat.completions.create(model="fake", messages=MSG, max_tokens=6, temperature=0)
    chunks = list(oa.chat.completions.create(model="fake", messages=MSG, max_tokens=6, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_sse_ends_with_done(api):
    client, _, _ = api
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_n_seed_stop_and_logprobs(api):
    _, oa, _ = api
    a = oa.chat.completions.create(model="fake", messages=MSG, max_tokens=8, seed=3, n=2)
    b = oa.chat.completions.create(model="fake", messages=MSG, max_tokens=8, seed=3, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # choice i uses seed + i
    assert a.usage.completion_tokens == 16 and a.usage.prompt_tokens == len("<user>hi<assistant>")
    words = a.choices[0].message.content.split()
    stopped = oa.chat.completions.create(model="fake", messages=MSG, max_tokens=8, seed=3, stop=[words[2]])
    assert stopped.choices[0].finish_reason == "stop"
    assert words[2] not in stopped.choices[0].message.content.split()[2:]
    lp = oa.chat.completions.create(model="fake", messages=MSG, max_tokens=3, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 3 and content[0].token == lp.choices[0].message.content.split(" ")[0] + " "
    assert len(content[0].top_logprobs) == 2 and content[0].top_logprobs[0].logprob == -0.5
    c = oa.completions.create(model="fake", prompt="abc", max_tokens=3, logprobs=1)
    assert len(c.choices[0].logprobs.tokens) == 3 and c.choices[0].logprobs.text_offset[:2] == [0, len(c.choices[0].logprobs.tokens[0])]


def test_completions_batch_prompts(api):
    _, oa, _ = api
    r = oa.completions.create(model="fake", prompt=["ab", "abcd"], max_tokens=2, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 8


def test_models_and_health(api):
    client, oa, _ = api
    assert [m.id for m in oa.models.list().data] == ["fake"]
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "messages": MSG}, 404, "model"),
    ({"model": "fake", "messages": MSG, "temperature": 5}, 400, "temperature"),
    ({"model": "fake", "messages": []}, 400, "messages"),
    ({"model": "fake"}, 400, "messages"),
    ({"model": "fake", "messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "fake", "messages": MSG, "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": "fake", "messages": MSG, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"model": "fake", "messages": MSG, "functions": [{"name": "f"}]}, 400, "functions"),
    ({"model": "fake", "messages": MSG, "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": "fake", "messages": MSG, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    # content parts are validated with the request (the fuzz found a 500 here: text() refused them too late)
    ({"model": "fake", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ({"model": "fake", "messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, 400, "messages"),
])
def test_errors_have_openai_body(api, body, status, param):
    client, _, _ = api
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_openapi_documents_the_request_bodies(api):
    client, _, _ = api
    doc = client.get("/openapi.json").json()
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        props = doc["components"]["schemas"][model]["properties"]
        assert props["top_p"]["exclusiveMinimum"] == 0 and props["top_p"]["maximum"] == 1  # the engine's LIMITS
    assert "TextPart" in doc["components"]["schemas"]


def test_context_overflow_code(api):
    client, _, _ = api
    r = client.post("/v1/chat/completions", json={"model": "fake", "messages": MSG, "max_tokens": 1000})
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_malformed_json_is_400(api):
    client, _, _ = api
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_json_object_is_accepted_when_asked():
    client, _ = make()
    r = client.post("/v1/chat/completions", json={"model": "fake", "max_tokens": 2, "response_format": {"type": "json_object"},
                                                  "messages": [{"role": "user", "content": "answer in JSON"}]})
    assert r.status_code == 200


def test_overload_429_with_retry_after():
    client, engine = make(max_num_seqs=1, max_queue=0)
    engine.active.add("someone-else")
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2, "stream": True})
    assert r.status_code == 429  # refused before the stream starts: a status, not an SSE error


def test_deadline_408():
    client, engine = make()
    engine.step_s = 0.05
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 50, "timeout": 0.12})
    assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
    assert r.headers["x-should-retry"] == "false"  # the openai SDK would repeat a 408: the client's deadline passed


def test_engine_fault_500_and_health_503():
    client, engine = make()
    engine.dead = "generation loop died: boom"
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    h = client.get("/health")
    assert h.status_code == 503 and "boom" in h.json()["error"]["message"]


def test_api_key_required_except_health():
    client, _ = make(api_key="s3cret")
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_stream_coalesces_tokens():
    client, engine = make()
    engine.step_s = 0.0005
    cfg = ServeConfig.from_args({"models": [{"model": "m"}]})
    server = LLMServer(cfg.models[0], stream_batching_interval_ms=50, engine=engine)

    async def count():
        from mlx_ray.engine.protocol import SamplingParams
        batches = [b async for b in server.generate(ModelRequest([TextPrompt("x")], SamplingParams(max_tokens=40)))]
        return batches

    batches = asyncio.run(count())
    tokens = sum(1 for b in batches for item in b if isinstance(item.event, TokenEvent))
    assert tokens == 40 and len(batches) < 20


def test_message_budget_coalesces_concurrent_streams_but_not_first_tokens():
    """4 streams at a budget of 20 messages/s: each batch waits 4 / 20 = 0.2 s, so 30 tokens 10 ms apart
    come in a few batches per stream, not ~30; the first batch is not held (it carries the first token
    alone), and every stream still delivers all its tokens and its finish."""
    cfg = ServeConfig.from_args({"models": [{"model": "m"}]})
    assert cfg.stream_messages_per_s > 0  # on by default

    async def run(budget):
        engine = FakeEngine("m", cfg.models[0].engine)
        engine.step_s = 0.01
        server = LLMServer(cfg.models[0], stream_batching_interval_ms=1, engine=engine, stream_messages_per_s=budget)
        from mlx_ray.engine.protocol import SamplingParams

        async def one(i):
            return [b async for b in server.generate(ModelRequest([TextPrompt(f"p{i}")], SamplingParams(max_tokens=30)))]

        out = await asyncio.gather(*(one(i) for i in range(4)))
        assert server.open_streams == 0
        return out

    for budget, most in ((20.0, 8), (0.0, None)):
        streams = asyncio.run(run(budget))
        for batches in streams:
            tokens = [item for b in batches for item in b if isinstance(item.event, TokenEvent)]
            assert len(tokens) == 30 and isinstance(batches[-1][-1].event, FinishEvent)
            assert sum(isinstance(item.event, TokenEvent) for item in batches[0]) == 1
            if most is not None:
                assert len(batches) <= most, len(batches)
            else:
                assert len(batches) >= 20, len(batches)  # 10 ms steps, 1 ms interval: about a batch per token


def test_stream_interval_is_the_budget_share_capped():
    cfg = ServeConfig.from_args({"models": [{"model": "m"}]})
    server = LLMServer(cfg.models[0], stream_batching_interval_ms=10, engine=FakeEngine("m", cfg.models[0].engine),
                       stream_messages_per_s=50)
    for n, want in ((0, 0.01), (1, 0.02), (16, 0.32), (32, 0.64), (500, MAX_COALESCE_S)):
        server.open_streams = n
        assert server.stream_interval() == pytest.approx(want)
    server.messages_per_s = 0
    server.open_streams = 32
    assert server.stream_interval() == pytest.approx(0.01)


def test_inbox_hands_a_finish_over_at_once():
    """A batch held for the interval is released as soon as a choice finishes (no end-of-stream delay)."""
    async def run():
        inbox = Inbox()
        loop = asyncio.get_running_loop()
        inbox.put_nowait((0, TokenEvent([1], "a")))
        later = asyncio.ensure_future(inbox.take(loop.time() + 60))
        await asyncio.sleep(0.01)
        assert not later.done()  # a token alone waits for the interval
        inbox.put_nowait((0, FinishEvent("stop", 1, 1)))
        batch = await asyncio.wait_for(later, 5)
        assert [type(ev) for _, ev in batch] == [TokenEvent, FinishEvent]
        inbox.put_nowait((1, TokenEvent([2], "b")))  # past not_before: at once
        assert [ev.text for _, ev in await asyncio.wait_for(inbox.take(0.0), 5)] == ["b"]

    asyncio.run(run())


def test_cancel_reaches_engine():
    cfg = ServeConfig.from_args({"models": [{"model": "m"}]})
    engine = FakeEngine("m", cfg.models[0].engine)
    engine.step_s = 0.01
    server = LLMServer(cfg.models[0], stream_batching_interval_ms=1, engine=engine)

    async def go():
        from mlx_ray.engine.protocol import SamplingParams
        gen = server.generate(ModelRequest([TextPrompt("x")], SamplingParams(max_tokens=200), request_id="r1"))
        await gen.__anext__()
        await gen.aclose()
        await asyncio.sleep(0.05)

    asyncio.run(go())
    assert engine.cancelled == ["r1-0-0"] and not engine.active


def test_bad_config_names_the_field():
    with pytest.raises(BadRequest, match=r"models\.0\.engine\.max_num_seqs"):
        ServeConfig.from_args({"models": [{"model": "m", "engine": {"max_num_seqs": 0}}]})
    with pytest.raises(BadRequest, match=r"models\.0\.placement\.max_queued_requests"):
        ServeConfig.from_args({"models": [{"model": "m", "placement": {"max_queued_requests": 0}}]})
    with pytest.raises(BadRequest, match="MODEL_ID"):
        ServeConfig.from_args({}, env={})
    cfg = ServeConfig.from_args({}, env={"MODEL_ID": "x/y", "MAX_MODEL_LEN": "2048", "MAX_NUM_SEQS": "8"})
    assert cfg.models[0].engine.max_model_len == 2048 and cfg.models[0].max_ongoing_requests == 8 + 64


def test_print_config_is_a_valid_serve_config(tmp_path):
    import subprocess
    import sys

    import yaml
    from ray.serve.schema import ServeDeploySchema

    key = tmp_path / "key"
    key.write_text("sk-test-0123456789\n")
    out = subprocess.run([sys.executable, "-m", "mlx_ray.cli", "serve", "--model", "/models/smol", "--model", "org/other",
                          "--max-model-len", "2048", "--api-key-file", str(key), "--print-config"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    block = yaml.safe_load(out.stdout)
    # pydantic 2 API on Ray 2.60, pydantic.v1's on 2.53
    schema = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    schema = schema(block)
    (app,) = schema.applications
    assert app.import_path == "mlx_ray.serve:app"
    models = [d for d in app.deployments if d.name.startswith("LLMServer:")]
    assert len(models) == 2
    assert all(d.ray_actor_options.resources == {"gpu_apple_mps": 1.0} for d in models)
    assert models[0].max_ongoing_requests == 16 + 64  # the engine's admission limit
    # the printed args rebuild the same config, and the builder accepts them as Serve would
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray._common.utils import import_attr

    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    assert type(built).__name__ == "Application"
    cfg = ServeConfig.from_args(app.args)
    assert [m.name for m in cfg.models] == ["/models/smol", "org/other"]
    assert cfg.resolve_api_key() == "sk-test-0123456789"  # read from the file named in args
    assert "sk-test-0123456789" not in out.stdout and cfg.api_key is None  # the path travels, never the key


def test_app_import_path_reads_env_vars(monkeypatch):
    from mlx_ray.serve import app

    monkeypatch.setenv("MODEL_ID", "org/model")
    monkeypatch.setenv("MAX_MODEL_LEN", "1024")
    assert type(app({})).__name__ == "Application"
    monkeypatch.setenv("MAX_MODEL_LEN", "-3")
    with pytest.raises(BadRequest, match="max_model_len"):
        app({})


def test_remote_token_auth_env(tmp_path):
    from mlx_ray.serve.cli import use_token_auth

    assert use_token_auth({}) is False
    env = {"RAY_AUTH_TOKEN": "abc"}
    assert use_token_auth(env) and env["RAY_AUTH_MODE"] == "token"
    with pytest.raises(BadRequest, match="RAY_AUTH_TOKEN_PATH"):
        use_token_auth({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    (tmp_path / "tok").write_text("abc")
    assert use_token_auth({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")})
    assert use_token_auth({"RAY_AUTH_TOKEN": "abc", "RAY_AUTH_MODE": "disabled"}) is False  # the user's choice wins


def test_time_per_output_token_is_observed_once_per_request():
    """TPOT = (last token - first token) / (completion tokens - 1), one observation per finished request."""
    from mlx_ray.serve.metrics import ServerMetrics

    class Recorder:
        def __init__(self):
            self.values = []

        def observe(self, v, *a, **k):
            self.values.append(v)

    m = ServerMetrics("smol")
    m.tpot = Recorder()
    m.finished(FinishEvent("length", 5, 9), first_token_at=10.0, last_token_at=12.0)
    m.finished(FinishEvent("length", 5, 1), first_token_at=10.0, last_token_at=10.0)  # one token: no interval
    m.finished(FinishEvent("error", 5, 0))  # no token at all
    assert m.tpot.values == [pytest.approx(0.25)]
