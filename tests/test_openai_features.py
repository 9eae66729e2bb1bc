"""Tool calls, structured outputs, reasoning and the honest surface, through Ray Serve (issue 14).

The official ``openai`` client against the real fixture model, served with a
hermes/Qwen-style template (``tests/fixtures_openai.py``). Constrained outputs
are checked with ``jsonschema``; unconstrained ones against their own greedy
run alone. Requests run concurrently (16 rows) to keep the module short.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import jsonschema
import openai
import pytest

from fixtures_openai import OAI_MODEL

pytestmark = [pytest.mark.slow]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}},
                   "required": ["timezone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}( [A-Z][a-z]{1,11})?$"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"enum": ["Paris", "London", "Rome"]}}, "required": ["name", "age", "city"], "additionalProperties": False}
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                          "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
         "required": ["color", "hex"], "additionalProperties": False}


@pytest.fixture(scope="module")
def oa(served_tools):
    return openai.OpenAI(base_url=served_tools + "/v1", api_key="unused", max_retries=0, timeout=300)


def _pmap(fn, items):
    with cf.ThreadPoolExecutor(16) as ex:
        return list(ex.map(fn, items))


def _schema_of(name):
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def _check_calls(msg, allowed=("get_weather", "get_time")):
    assert msg.tool_calls, msg
    for c in msg.tool_calls:
        assert c.type == "function" and c.id and c.function.name in allowed
        jsonschema.validate(json.loads(c.function.arguments), _schema_of(c.function.name))


def test_tool_choice_required_and_named_give_valid_calls(oa):
    def one(i):
        choice = "required" if i % 2 else {"type": "function", "function": {"name": "get_time"}}
        # sampled, a small model may go on calling in parallel until max_tokens: one call each here
        r = oa.chat.completions.create(model=OAI_MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                       parallel_tool_calls=False, temperature=0.9, seed=i, max_tokens=120)
        return choice, r.choices[0]

    for choice, c in _pmap(one, range(10)):
        assert c.finish_reason == "tool_calls", c
        _check_calls(c.message, ("get_time",) if isinstance(choice, dict) else ("get_weather", "get_time"))
        assert len(c.message.tool_calls) == 1


def test_forced_calls_hold_only_the_declared_arguments_as_vllm_does(oa):
    """A schema that does not forbid extra properties is strict all the same under a forced tool_choice
    (vLLM's default): without it the fixture wandered into a long "description" argument until max_tokens."""
    loose = {"type": "function", "function": {**WEATHER["function"], "parameters": {
        k: v for k, v in WEATHER["function"]["parameters"].items() if k != "additionalProperties"}}}

    def one(i):
        choice = "required" if i % 2 else {"type": "function", "function": {"name": "get_weather"}}
        r = oa.chat.completions.create(model=OAI_MODEL, messages=ASK, tools=[loose], tool_choice=choice,
                                       parallel_tool_calls=False, temperature=0.8, seed=100 + i, max_tokens=80)
        return r.choices[0]

    for c in _pmap(one, range(8)):
        assert c.finish_reason == "tool_calls", c
        assert set(json.loads(c.message.tool_calls[0].function.arguments)) <= {"city", "unit"}


def test_strict_schema_closes_every_undeclared_object():
    from mlx_ray.serve.tool_calls import strict_schema

    s = strict_schema({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                                        "c": {"type": "array", "items": {"properties": {}}}},
                       "$defs": {"d": {"type": "object"}}, "anyOf": [{"type": "object"}]})
    assert s["additionalProperties"] is False and s["properties"]["a"]["additionalProperties"] is False
    assert s["properties"]["c"]["items"]["additionalProperties"] is False
    assert s["$defs"]["d"]["additionalProperties"] is False and s["anyOf"][0]["additionalProperties"] is False
    assert strict_schema({"type": "object", "additionalProperties": True})["additionalProperties"] is True
    assert "additionalProperties" not in strict_schema({"type": "string"})


def test_streamed_calls_equal_non_streamed_and_a_tool_result_round_trips(oa):
    # greedy, the fixture goes on calling in parallel until max_tokens: the complete calls are returned
    kw = dict(model=OAI_MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=100)
    full = oa.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    for chunk in oa.chat.completions.create(stream=True, **kw):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            c = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            c["name"] += d.function.name or ""
            c["arguments"] += d.function.arguments or ""
    want = [(c.function.name, c.function.arguments) for c in full.message.tool_calls]
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == want
    assert len(want) >= 2 and all(c["id"] for c in calls.values())  # parallel calls, each with an id
    _check_calls(full.message)
    call = full.message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    final = oa.chat.completions.create(model=OAI_MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=24)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    # the template saw the call and the result: the prompt holds both
    assert final.usage.prompt_tokens > oa.chat.completions.create(
        model=OAI_MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1).usage.prompt_tokens + 20


def test_json_schema_strict_and_json_object(oa):
    def one(i):
        if i < 12:
            r = oa.chat.completions.create(
                model=OAI_MODEL, messages=[{"role": "user", "content": "Invent a person."}], temperature=1.0, seed=i,
                max_tokens=120, response_format={"type": "json_schema",
                                                "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
            return "schema", r.choices[0]
        system = {"role": "system", "content": 'Reply only with a short JSON object, for example {"answer": "yes"}.'}
        q = ["Is the sky blue?", "What is 2 + 2?", "Name a fruit.", "What color is grass?"][i - 12]
        r = oa.chat.completions.create(model=OAI_MODEL, messages=[system, {"role": "user", "content": q}],
                                       temperature=0, max_tokens=200, response_format={"type": "json_object"})
        return "object", r.choices[0]

    for kind, c in _pmap(one, range(16)):
        assert c.finish_reason == "stop", c
        value = json.loads(c.message.content)
        if kind == "schema":
            jsonschema.validate(value, PERSON)
        else:
            assert isinstance(value, dict)


def test_mixed_batch_constrained_rows_never_disturb_the_others(oa):
    prompts = ["Tell me about the sea.", "Name three fruits.", "What is 2 + 2?", "Describe a cat.",
               "Who wrote Hamlet?", "Say hello."]
    plain = lambda i: oa.chat.completions.create(  # noqa: E731
        model=OAI_MODEL, messages=[{"role": "user", "content": prompts[i]}], temperature=0, max_tokens=24
    ).choices[0].message.content
    alone = [plain(i) for i in range(6)]

    def one(i):
        if i % 2:
            return plain(i // 2)
        schema = [PERSON, COLOR][(i // 2) % 2]
        r = oa.chat.completions.create(
            model=OAI_MODEL, messages=[{"role": "user", "content": prompts[i // 2]}], temperature=0.8, seed=i,
            max_tokens=120, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        return None

    out = _pmap(one, range(12))
    assert [out[i] for i in range(1, 12, 2)] == alone


def test_reasoning_is_split_streamed_and_not(oa, served_tools):
    shot = [{"role": "user", "content": "What is the capital of Italy?"},
            {"role": "assistant", "content": "<think>\nItaly's capital city is Rome.\n</think>\n\nRome."},
            {"role": "user", "content": "What is the capital of France?"}]
    kw = dict(model=OAI_MODEL, messages=shot, temperature=0, max_tokens=48,
              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    full = oa.chat.completions.create(**kw).choices[0].message
    chunks = list(oa.chat.completions.create(stream=True, **kw))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.reasoning_content and reasoning == full.reasoning_content and content == (full.content or "")
    # the split is exactly the raw text's: the same prompt as a plain completion, cut at the marker
    prompt = httpx.post(served_tools + "/v1/chat/completions", timeout=120, json={
        "model": OAI_MODEL, "messages": shot, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": True},
        "logprobs": False}).json()
    raw = oa.completions.create(model=OAI_MODEL, prompt=_render(oa, shot), temperature=0, max_tokens=48).choices[0].text
    assert prompt["usage"]["prompt_tokens"] > 0
    head, sep, tail = raw.partition("</think>")
    assert full.reasoning_content == head and (full.content or "") == tail
    off = oa.chat.completions.create(model=OAI_MODEL, messages=shot[-1:], temperature=0, max_tokens=8).choices[0]
    assert not getattr(off.message, "reasoning_content", None)  # no thinking section opened: all content


def _render(oa, messages):
    from jinja2 import Template

    from fixtures_openai import TOOLS_TEMPLATE

    return Template(TOOLS_TEMPLATE).render(messages=messages, add_generation_prompt=True, enable_thinking=True)


def test_unsupported_schema_feature_and_refused_fields_are_400s(oa):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=OAI_MODEL, messages=ASK, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}})
    assert "uniqueItems" in str(e.value) and e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=OAI_MODEL, messages=ASK, max_tokens=8,
                                   functions=[{"name": "f", "parameters": {}}])
    assert e.value.body["param"] == "functions"


def test_logit_bias_keeps_a_token_out(oa, mlx_f32):
    from transformers import AutoTokenizer

    msg = [{"role": "user", "content": "What is the capital of France?"}]
    first = oa.chat.completions.create(model=OAI_MODEL, messages=msg, temperature=0, max_tokens=12)
    text = first.choices[0].message.content
    tok = AutoTokenizer.from_pretrained(str(mlx_f32))
    banned = tok.encode(text, add_special_tokens=False)[0]
    again = oa.chat.completions.create(model=OAI_MODEL, messages=msg, temperature=0, max_tokens=12,
                                       logit_bias={str(banned): -100})
    assert banned not in tok.encode(again.choices[0].message.content, add_special_tokens=False)


def test_models_report_the_context_and_streams_keep_alive(oa, served_tools):
    card = next(m for m in oa.models.list().data if m.id == OAI_MODEL)
    assert card.max_model_len == 2048
    long = [{"role": "user", "content": "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 120}]
    with httpx.stream("POST", served_tools + "/v1/chat/completions", timeout=120, json={
            "model": OAI_MODEL, "messages": long, "max_tokens": 2, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    first_data = next(i for i, ln in enumerate(lines) if ln.startswith("data:"))
    assert ": keepalive" in lines[:first_data] and lines[-1] == "data: [DONE]"
