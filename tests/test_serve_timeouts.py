"""The serving layer's timeouts, body limits, stream cancellation and event-loop hygiene, without Ray.

A paced fake engine emits a token after each of its ``gaps`` (seconds): a stream that makes
progress must never be cut, whatever its length; a stall after tokens must end it (an error
event in a stream; for a non-streaming request a status the official openai SDK does not
repeat); a first token that never comes is answered with a retryable status. Requests go
through the official `openai` client over Starlette's TestClient (the engine counts attempts).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import httpx
import mlx_lm.generate  # noqa: F401 - a chat choice's splitter imports it: once here, not inside a timed request
import openai
import pytest
from fastapi.testclient import TestClient

from mlx_ray.engine.protocol import (EngineConfig, FinishEvent, GenerationRequest, Grammar, LLMEngine,
                                     SamplingParams, TokenEvent)
from mlx_ray.errors import BadRequest, DeadlineExceeded
from mlx_ray.serve.config import ServeConfig
from mlx_ray.serve.generation import ModelRequest, TextPrompt
from mlx_ray.serve.ingress import OpenAIIngress, _Batches, create_app
from mlx_ray.serve.local import LocalHandle
from mlx_ray.serve.server import LLMServer

MSG = [{"role": "user", "content": "hi"}]


class PacedEngine(LLMEngine):
    """One token after each of ``gaps`` seconds, then a "length" finish. Counts its requests."""

    max_model_len: int = 128

    def __init__(self, model: str, config: EngineConfig):
        self.config = config
        self.max_model_len = config.max_model_len or 128
        self.model_id = model
        self.gaps = [0.01] * 3
        self.calls = 0  # generate() calls: one per HTTP attempt that reached the engine
        self.closed = 0  # streams that ended (finished, cancelled or closed)
        self.cancelled: list[str] = []
        self.encoded = 0
        self.template_s = 0.0  # a slow chat template (time.sleep: it holds whatever thread runs it)
        self.tokenizer = None

    async def start(self):
        pass

    def encode(self, text: str) -> list[int]:
        self.encoded += 1
        return [ord(c) % 500 for c in text]

    def encode_chat(self, messages, chat_template=None, **_):
        if self.template_s:
            time.sleep(self.template_s)
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def decode(self, ids):
        return "".join(f"t{i} " for i in ids)

    async def generate(self, req: GenerationRequest):
        self.calls += 1
        try:
            for i, gap in enumerate(self.gaps):
                await asyncio.sleep(gap)
                if req.deadline is not None and time.monotonic() > req.deadline:  # as the engine's loop does
                    yield FinishEvent("error", len(req.prompt_token_ids), i, error=DeadlineExceeded("deadline"))
                    return
                yield TokenEvent([i % 7], f"t{i} ")
            yield FinishEvent("length", len(req.prompt_token_ids), len(self.gaps))
        finally:
            self.closed += 1

    async def cancel(self, request_id):
        self.cancelled.append(request_id)

    def check_health(self):
        pass

    def stats(self):
        return {"running": 0, "waiting": 0}

    async def shutdown(self):
        pass


def make(**top):
    cfg = {"models": [{"model": "paced-dir", "name": "paced", "engine": {"max_num_seqs": 4, "max_queue": 4,
                                                                         "max_model_len": 128}}],
           "first_token_timeout_s": 1, "stall_timeout_s": 1, **top}
    scfg = ServeConfig.from_args(cfg)
    engine = PacedEngine("paced-dir", scfg.models[0].engine)
    server = LLMServer(scfg.models[0], stream_batching_interval_ms=5, engine=engine)
    ingress = OpenAIIngress({"paced": LocalHandle(server)}, scfg)
    return ingress, engine


def sdk(ingress, max_retries=2):
    client = TestClient(create_app(ingress))
    return client, openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client,
                                 max_retries=max_retries)


# -- timeouts --------------------------------------------------------------------------------------


def test_a_stream_making_progress_is_never_cut():
    """10 tokens 0.3 s apart (3 s) under a first-token and a stall timeout of 1 s each."""
    ingress, engine = make()
    engine.gaps = [0.3] * 10
    _, oa = sdk(ingress, max_retries=0)
    t0 = time.monotonic()
    chunks = list(oa.chat.completions.create(model="paced", messages=MSG, max_tokens=20, stream=True))
    assert time.monotonic() - t0 >= 2.9
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"t{i} " for i in range(10))
    assert chunks[-1].choices[0].finish_reason == "length"
    r = oa.chat.completions.create(model="paced", messages=MSG, max_tokens=20)  # non-streaming too
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == "length"
    assert engine.calls == 2


def test_a_stall_mid_stream_ends_it_with_an_error_event_and_done():
    ingress, engine = make()
    engine.gaps = [0.05, 0.05, 10.0, 0.05]
    client, oa = sdk(ingress)
    got = []
    with pytest.raises(openai.APIError) as e:  # the SDK raises on the stream's error event
        for c in oa.chat.completions.create(model="paced", messages=MSG, max_tokens=20, stream=True):
            got.append(c.choices[0].delta.content if c.choices else None)
    assert "".join(x or "" for x in got) == "t0 t1 "
    assert e.value.body["code"] == "stall_timeout" and e.value.body["type"] == "timeout_error"
    assert engine.calls == 1 and engine.closed == 1  # cancelled at the engine, not retried
    # on the wire: a 200 stream whose last frames are the error event and [DONE]
    engine.calls = 0
    t0 = time.monotonic()
    r = client.post("/v1/chat/completions", json={"model": "paced", "messages": MSG, "max_tokens": 20,
                                                  "stream": True})
    took = time.monotonic() - t0
    assert r.status_code == 200
    frames = [f for f in r.text.split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "data: [DONE]" and '"stall_timeout"' in frames[-2], frames[-3:]
    assert 1.0 < took < 8.0  # stall_timeout_s plus at most the stream's coalescing (1 s), not the 10 s stall


def test_a_stall_without_streaming_is_answered_once_and_never_retried_by_the_sdk():
    ingress, engine = make()
    engine.gaps = [0.05, 10.0, 0.05]
    client, oa = sdk(ingress, max_retries=2)  # the SDK's default: it would repeat a 408 or 5xx twice
    with pytest.raises(openai.APIStatusError) as e:
        oa.chat.completions.create(model="paced", messages=MSG, max_tokens=20)
    assert e.value.status_code == 504 and e.value.response.headers["x-should-retry"] == "false"
    assert e.value.body["code"] == "stall_timeout"
    assert engine.calls == 1  # exactly one HTTP attempt reached the engine
    assert engine.closed == 1


def test_no_first_token_is_a_retryable_503_and_the_request_is_cancelled():
    ingress, engine = make()
    engine.gaps = [10.0]
    client, oa = sdk(ingress)
    t0 = time.monotonic()
    r = client.post("/v1/completions", json={"model": "paced", "prompt": "x", "max_tokens": 5})
    assert 0.9 < time.monotonic() - t0 < 8
    assert r.status_code == 503 and r.headers["x-should-retry"] == "true"
    assert r.json()["error"]["code"] == "first_token_timeout" and r.json()["error"]["type"] == "timeout_error"
    assert engine.closed == 1  # nothing of it runs any more: a retry duplicates nothing
    engine.calls = 0
    _, oa = sdk(ingress, max_retries=1)
    with pytest.raises(openai.InternalServerError):
        oa.completions.create(model="paced", prompt="x", max_tokens=5)
    assert engine.calls == 2  # the SDK may repeat it


def test_request_timeout_s_is_the_deprecated_alias_of_the_first_token_timeout(monkeypatch):
    cfg = ServeConfig.from_args({"model_id": "m", "request_timeout_s": 7})
    assert cfg.first_token_timeout_s == 7 and cfg.request_timeout_s is None
    env = {"MODEL_ID": "m", "FIRST_TOKEN_TIMEOUT_S": "9", "STALL_TIMEOUT_S": "11", "MAX_REQUEST_BODY_BYTES": "4096"}
    cfg = ServeConfig.from_args({}, env=env)
    assert (cfg.first_token_timeout_s, cfg.stall_timeout_s, cfg.max_request_body_bytes) == (9, 11, 4096)
    with pytest.raises(BadRequest, match="deprecated alias"):
        ServeConfig.from_args({"model_id": "m", "request_timeout_s": 7, "first_token_timeout_s": 8})


# -- a cancel while another task is inside the stream (mlx_ray/serve/local.py) -----------------------


def test_local_cancel_during_a_pending_step_closes_the_stream_without_already_running():
    ingress, engine = make()
    engine.gaps = [0.01, 30.0]
    server = ingress.servers["paced"].target

    async def main():
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        call = LocalHandle(server).options(stream=True).generate.remote(
            ModelRequest([TextPrompt("hi")], SamplingParams(max_tokens=5)))
        batches = _Batches(call, 10, 10)
        assert await batches.next()  # the first token
        # a task inside the generator, waiting for the next token (as a stream does between keepalives)
        step = asyncio.ensure_future(batches.next(5.0))
        await asyncio.sleep(0.05)
        batches.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        for _ in range(5):
            await asyncio.sleep(0.02)
        gc.collect()  # a task that failed unobserved reports to the loop's exception handler when collected
        await asyncio.sleep(0)
        return errors

    errors = asyncio.run(main())
    assert not errors, [str(c.get("exception") or c.get("message")) for c in errors]
    assert engine.closed == 1 and server.open_streams == 0


# -- the event loop keeps answering while templates and grammars compile ----------------------------


async def _max_gap_while(coro, tick=0.02):
    """Run ``coro`` beside a heartbeat on the same loop; the longest the heartbeat waited, and the result."""
    gaps, stop = [], asyncio.Event()

    async def heartbeat():
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(tick)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    hb = asyncio.ensure_future(heartbeat())
    t0 = time.monotonic()
    try:
        result = await coro
    finally:
        stop.set()
        await hb
    return max(gaps, default=time.monotonic() - t0), result


def test_a_slow_chat_template_runs_off_the_event_loop():
    ingress, engine = make(first_token_timeout_s=30)  # the template's second counts as queueing
    engine.template_s = 1.0
    app = create_app(ingress)

    async def request():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/chat/completions", json={"model": "paced", "messages": MSG, "max_tokens": 3})

    gap, r = asyncio.run(_max_gap_while(request()))
    assert r.status_code == 200, r.text
    assert gap < 0.5, f"the event loop stood still for {gap:.2f}s behind the chat template"


def test_a_slow_grammar_compile_runs_off_the_event_loop():
    from mlx_ray.engine.engine import MLXEngine

    eng = MLXEngine("unused")
    seen = {}

    class SlowGrammars:
        def compile(self, g):
            time.sleep(1.0)
            seen["thread"] = threading.current_thread()
            return "compiled"

        def processor(self, compiled):
            return f"processor of {compiled}"

    def admit(request, grammar=None, adapter=None):  # MLXEngine._admit up to its grammar: built here if not before
        if grammar is None:
            grammar = eng.grammars.processor(eng.grammars.compile(request.sampling.grammar))
        seen["grammar"] = grammar
        raise BadRequest("stop here")

    eng.grammars = SlowGrammars()
    eng._admit = admit
    req = GenerationRequest("r", [1, 2], SamplingParams(max_tokens=2, grammar=Grammar("json_object")))

    async def run():
        with pytest.raises(BadRequest):
            async for _ in eng.generate(req):
                pass

    gap, _ = asyncio.run(_max_gap_while(run()))
    assert gap < 0.5, f"the event loop stood still for {gap:.2f}s behind the grammar compile"
    assert seen["grammar"] == "processor of compiled" and seen["thread"] is not threading.main_thread()


# -- request size, refused before it is tokenized -------------------------------------------------------


def test_a_10mb_body_is_refused_at_once_and_the_server_still_answers():
    ingress, engine = make()
    client, oa = sdk(ingress, max_retries=0)
    body = b'{"model": "paced", "prompt": "' + b"a" * (10 << 20) + b'", "max_tokens": 5}'
    t0 = time.monotonic()
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert time.monotonic() - t0 < 5.0
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["code"] == "request_too_large" and engine.encoded == 0

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(10):
            yield b'{"model": "paced", "prompt": "' if _ == 0 else b"a" * (1 << 20)

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and engine.encoded == 0
    out = oa.completions.create(model="paced", prompt="hello", max_tokens=3)  # still serving
    assert out.choices[0].finish_reason == "length"


def test_a_prompt_too_long_in_characters_is_refused_before_tokenizing():
    ingress, engine = make()

    class Vocab:  # the longest token has 4 characters: 2 * 4 * 128 characters can never fit
        def get_vocab(self):
            return {"a": 0, "abcd": 1}

    engine.tokenizer = Vocab()
    client, _ = sdk(ingress, max_retries=0)
    for body in ({"model": "paced", "prompt": "a" * 1025, "max_tokens": 3},
                 {"model": "paced", "messages": [{"role": "user", "content": "a" * 1025}], "max_tokens": 3}):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = client.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert engine.encoded == 0
    r = client.post("/v1/completions", json={"model": "paced", "prompt": "a" * 100, "max_tokens": 3})
    assert r.status_code == 200 and engine.encoded == 1
