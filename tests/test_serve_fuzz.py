"""Bounded fuzz: schemathesis against the app's own OpenAPI document, on the session's real Ray Serve app.

Requests are generated from ``/openapi.json`` (the request models' schemas,
``serve/openapi.py``), schema-valid and schema-violating, and sent over real HTTP
to the real engine and model. Asserted: no 5xx (nor a 200 stream ending in a
server error), no hang (a per-request timeout), and afterwards the server is
healthy, answers a normal chat request through the official client, and holds
no engine slot (``no_leaked_slots``).

Bounded by ``MAX_EXAMPLES`` and a wall-clock ``BUDGET_S``, whichever comes first.
Two test-side changes to the document keep the cost down and the fuzz useful:
``model`` is one of a served name or an unknown one (a random string is always
404 and reaches nothing), and ``max_tokens`` is either small or beyond the
context (long generations would spend the budget on decoding, not on parsing).

Not marked ``ray``: the request path it exercises is mlx-ray's own code, which
test_serve_e2e.py already runs on Ray 2.53.0; a second minute on that Ray buys little.
"""

from __future__ import annotations

import collections
import copy
import time

import httpx
import openai
import pytest

from fixtures_serve import LIMIT, MSG, wait_idle

pytestmark = [pytest.mark.slow]

MAX_EXAMPLES = 120
BUDGET_S = 45.0
REQUEST_TIMEOUT_S = 60.0  # per request: past it, a hang
SMALL_MAX_TOKENS = 8


def fuzz_document(doc: dict, models: list[str]) -> dict:
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"type": "string", "enum": [*models, "no-such-model"]}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": SMALL_MAX_TOKENS},
                                          {"type": "integer", "minimum": LIMIT["max_model_len"] + 1}]}
    # chat's default max_tokens is "as many as fit": make it explicit, small or past the context
    schemas["ChatCompletionRequest"].setdefault("required", []).append("max_tokens")
    return doc


def test_fuzz_no_5xx_no_hang_and_healthy_after(served):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    url, _ = served
    doc = httpx.get(url + "/openapi.json", timeout=30).json()
    assert doc["paths"]["/v1/chat/completions"]["post"]["requestBody"], "the request body is not documented"
    schema = schemathesis.openapi.from_dict(fuzz_document(doc, ["smol"]))
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    strategy = st.one_of(*(op.as_strategy(generation_mode=mode) for op in operations
                           for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)))
    statuses: collections.Counter = collections.Counter()
    stop_at = time.monotonic() + BUDGET_S

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False, print_blob=True)
    @given(case=strategy)
    def one(case):
        if time.monotonic() > stop_at:
            return
        response = case.call(base_url=url, timeout=REQUEST_TIMEOUT_S)  # a hang raises ReadTimeout here
        statuses[response.status_code] += 1
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code == 200 and "text/event-stream" in response.headers.get("content-type", ""):
            assert response.text.endswith("data: [DONE]\n\n"), response.text[-500:]
            assert '"type":"server_error"' not in response.text, response.text[-1000:]

    one()
    print(f"fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 20 and statuses[200] and statuses[400]  # it did reach the engine and validation
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    # what the fuzz's own requests left running (a timed-out client's request is cancelled, a deadline's runs to
    # it) ends first: the admission limit is 2 + 1, so a normal request right now could be a correct 429
    wait_idle("smol", timeout=60)
    oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = oa.chat.completions.create(model="smol", messages=MSG, max_tokens=4, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1
    assert wait_idle("smol", timeout=60)["inflight"] == 0
