"""``run_load`` and ``mlx-ray bench serve`` against a real local HTTP server.

The server is a tiny FastAPI app run by uvicorn on a free port; it streams
OpenAI-shaped SSE chunks (one token each), answers 401 without the right key
and 500 for prompts containing FAIL, so every count below is known exactly.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mlx_ray.bench.openai_load import normalize_base_url, run_load
from mlx_ray.cli import main as cli_main

KEY = "sk-test-123"


@pytest.fixture(autouse=True)
def _no_blas_reexec(monkeypatch):
    """cli.main re-execs the process to preload OpenBLAS; inside pytest that would restart the run."""
    monkeypatch.setenv("MLX_RAY_BLAS_REEXEC", "1")
WORDS = ["Paris", " is", " the", " capital", " city", " of", " France", "."]


def _app(send_usage: bool):
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        if req.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "bad key", "type": "authentication_error"}}, status_code=401)
        body = await req.json()
        if "FAIL" in body["messages"][-1]["content"]:
            return JSONResponse({"error": {"message": "boom", "type": "engine_error"}}, status_code=500)
        n = min(body["max_tokens"], len(WORDS))

        async def events():
            base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
            yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n"
            for w in WORDS[:n]:
                await asyncio.sleep(0.002)
                yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"content": w}}]}) + "\n\n"
            yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}) + "\n\n"
            if send_usage and body.get("stream_options", {}).get("include_usage"):
                usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                yield "data: " + json.dumps({**base, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module", params=[True, False], ids=["usage", "no-usage"])
def stub_url(request):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_app(request.param), log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    th.join(timeout=10)


def test_normalize_base_url():
    assert normalize_base_url("http://h:1") == "http://h:1/v1"
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"
    assert normalize_base_url("http://h:1/app/v1/chat/completions") == "http://h:1/app/v1"


def test_run_load_counts_tokens_and_latencies(stub_url):
    r = run_load(stub_url, "m", concurrency=4, num_requests=10, prompts=["hi", "there"], max_tokens=5, api_key=KEY)
    assert (r["requests"], r["completed"], r["errors"]) == (10, 10, 0)
    assert r["output_tokens"] == 50
    assert r["output_tok_s"] == pytest.approx(50 / r["duration_s"])
    assert r["ttft_s"]["n"] == 10 and r["itl_s"]["n"] == 40  # 4 gaps per 5-token stream
    for k in ("ttft_s", "itl_s", "latency_s"):
        assert 0 < r[k]["p50"] <= r[k]["p99"] <= r[k]["max"]
    assert r["ttft_s"]["max"] <= r["latency_s"]["max"]


def test_run_load_counts_errors_by_kind(stub_url):
    r = run_load(stub_url, "m", concurrency=3, num_requests=6, prompts=["ok", "FAIL please"], max_tokens=3,
                 api_key=KEY)
    assert (r["completed"], r["errors"], r["error_kinds"]) == (3, 3, {"http_500": 3})
    assert r["output_tokens"] == 9
    bad = run_load(stub_url, "m", concurrency=2, num_requests=2, prompts=["x"], max_tokens=3, api_key="wrong")
    assert bad["error_kinds"] == {"http_401": 2} and bad["output_tokens"] == 0 and bad["ttft_s"]["p50"] is None


def test_run_load_unreachable_server_is_counted():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = run_load(f"http://127.0.0.1:{port}", "m", 2, 2, ["x"], max_tokens=2, timeout=5)
    assert r["errors"] == 2 and list(r["error_kinds"]) == ["APIConnectionError"]


def test_bench_serve_cli_table_and_json(stub_url, tmp_path, capsys):
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "\n")
    out = tmp_path / "serve.json"
    rc = cli_main(["bench", "serve", "--url", stub_url, "--model", "m", "--concurrency", "1,3",
                   "--max-tokens", "4", "--num-requests", "6", "--api-key-file", str(keyfile), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| concurrency |" in text and "TTFT p50 ms" in text
    report = json.loads(out.read_text())
    assert [r["concurrency"] for r in report["runs"]] == [1, 3]
    assert all(r["output_tokens"] == 24 and r["errors"] == 0 for r in report["runs"])


def test_bench_serve_cli_bad_usage(stub_url, tmp_path, capsys):
    assert cli_main(["bench", "serve", "--url", stub_url, "--model", "m", "--concurrency", "a,b"]) == 2
    assert cli_main(["bench", "serve", "--url", stub_url, "--model", "m",
                     "--api-key-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("mlx-ray bench: error:") for e in err)
