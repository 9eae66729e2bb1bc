"""Engine correctness on the real float32 fixture: identity with mlx-lm, batching, seeds, cancel, prefix cache."""

from __future__ import annotations

import asyncio
import math

import pytest
from fixtures_engine import collect, make_request, run_async

from mlx_ray.engine.protocol import FinishEvent, TokenEvent
from mlx_ray.errors import BadRequest, ContextOverflow

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three colors.",
    "Explain gravity in one sentence.", "Who wrote Hamlet?", "What is 2+2?",
    "Name a yellow fruit.", "Tell me a joke about cats.",
]
BATCH_MAX_TOKENS = [24] + [12] * 7


def chat(engine, q):
    return engine.encode_chat([{"role": "user", "content": q}])


def test_greedy_alone_is_token_identical_to_mlx_lm(engine_f32, mlxlm_greedy):
    for i, (q, n) in enumerate(zip(QUESTIONS[:2], BATCH_MAX_TOKENS)):  # references shared with the batch test
        ids = chat(engine_f32, q)
        got, text, _, _, fin = run_async(collect(engine_f32, make_request(f"alone-{i}", ids, max_tokens=n)))
        assert got == mlxlm_greedy(ids, n)
        assert fin.finish_reason in ("stop", "length") and fin.error is None
        assert fin.prompt_tokens == len(ids) and fin.completion_tokens == len(got)
    assert text  # the France answer: "The capital of France is Paris." (FACTS.md), checked below too


def test_greedy_in_batch_of_8_joining_at_different_steps_is_token_identical(engine_f32, mlxlm_greedy):
    prompts = [chat(engine_f32, q) for q in QUESTIONS]
    max_tokens = BATCH_MAX_TOKENS

    async def main():
        progress = [asyncio.Event() for _ in range(len(prompts))]
        joined_at = {}

        async def first():  # request 0 paces the others: request k joins after its k-th token
            out, n = [], 0
            async for ev in engine_f32.generate(make_request("b0", prompts[0], max_tokens=max_tokens[0])):
                if isinstance(ev, TokenEvent):
                    out += ev.token_ids
                    n += len(ev.token_ids)
                    for k in range(1, min(n, len(prompts) - 1) + 1):
                        progress[k].set()
                else:
                    return out, ev

        async def later(k):
            await progress[k].wait()
            joined_at[k] = engine_f32.stats()["steps"]
            got, _, _, _, fin = await collect(engine_f32, make_request(f"b{k}", prompts[k], max_tokens=max_tokens[k]))
            return got, fin

        results = await asyncio.gather(first(), *(later(k) for k in range(1, len(prompts))))
        return results, joined_at

    results, joined_at = run_async(main())
    assert len(set(joined_at.values())) > 1  # they really joined at different steps
    for k, (got, fin) in enumerate(results):
        assert fin.error is None
        assert got == mlxlm_greedy(prompts[k], max_tokens[k]), f"request {k} ({QUESTIONS[k]!r}) diverged"
    assert engine_f32.tokenizer.decode(results[0][0][:-1]) == "The capital of France is Paris."


def test_seeded_sampling_is_reproducible_alone_and_batched(engine_f32):
    ids = chat(engine_f32, "Invent a name for a dragon.")
    kw = dict(max_tokens=8, temperature=0.9, top_p=0.95, top_k=40)

    alone = run_async(collect(engine_f32, make_request("s-alone", ids, seed=7, **kw)))[0]
    again = run_async(collect(engine_f32, make_request("s-again", ids, seed=7, **kw)))[0]

    async def batched():
        return await asyncio.gather(*(collect(engine_f32, make_request(f"s-b{s}", ids, seed=s, **kw))
                                      for s in (1, 7, 2, 3)))

    outs = [r[0] for r in run_async(batched())]
    assert alone == again == outs[1]
    assert len({tuple(o) for o in outs}) > 1  # different seeds, different samples


def test_cancelling_one_request_leaves_the_others_unchanged(engine_f32, mlxlm_greedy):
    prompts = [chat(engine_f32, q) for q in QUESTIONS[1:4]]

    async def main():
        async def victim():
            n = 0
            async for ev in engine_f32.generate(make_request("victim", prompts[0], max_tokens=64)):
                if isinstance(ev, TokenEvent):
                    n += len(ev.token_ids)
                    if n == 3:
                        await engine_f32.cancel("victim")
                else:
                    return n, ev

        return await asyncio.gather(victim(), *(collect(engine_f32, make_request(f"keep{i}", p, max_tokens=12))
                                                for i, p in enumerate(prompts[1:])))

    (n, fin), *others = run_async(main())
    assert fin.finish_reason == "cancelled" and 3 <= n < 64
    for p, (got, *_, ofin) in zip(prompts[1:], others):
        assert ofin.error is None
        assert got == mlxlm_greedy(p, 12)


def test_abandoned_stream_frees_its_row(engine_f32):
    async def main():
        gen = engine_f32.generate(make_request("abandon", chat(engine_f32, "Count to fifty."), max_tokens=200))
        async for ev in gen:
            assert isinstance(ev, TokenEvent)
            break
        await gen.aclose()  # what a disconnecting HTTP client does
        for _ in range(200):
            if engine_f32.stats()["inflight"] == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert run_async(main())


def test_prefix_cache_hit_gives_the_same_tokens_as_a_miss(engine_f32, mlxlm_greedy):
    base = engine_f32.encode("A unique preamble about the migration of arctic terns across the oceans. " * 3)
    longer = base + engine_f32.encode(" In summary, the terns")
    before = dict(engine_f32.stats())

    miss = run_async(collect(engine_f32, make_request("p-miss", base, max_tokens=8)))
    hit = run_async(collect(engine_f32, make_request("p-hit", base, max_tokens=8)))
    ext = run_async(collect(engine_f32, make_request("p-ext", longer, max_tokens=8)))

    assert miss[4].cached_tokens == 0
    assert hit[4].cached_tokens == len(base) - 1  # all but the last token came from the cache
    assert ext[4].cached_tokens >= len(base)
    assert hit[0] == miss[0] == mlxlm_greedy(base, 8)
    assert ext[0] == mlxlm_greedy(longer, 8)
    after = engine_f32.stats()
    assert after["prefix_hits"] - before["prefix_hits"] >= 2
    assert after["prefix_misses"] - before["prefix_misses"] >= 1
    assert 0 < after["prefix_cache_bytes"] <= after["prefix_cache_budget_bytes"]


def test_stop_strings_stop_tokens_and_length(engine_f32):
    ids = chat(engine_f32, QUESTIONS[0])  # greedy answer: "The capital of France is Paris."
    got, text, _, _, fin = run_async(collect(engine_f32, make_request("stop-s", ids, max_tokens=24,
                                                                     stop=["France is P"])))
    assert (text, fin.finish_reason) == ("The capital of ", "stop")
    paris = engine_f32.encode(" Paris")[-1]
    got, text, _, _, fin = run_async(collect(engine_f32, make_request("stop-t", ids, max_tokens=24,
                                                                     stop_token_ids=[paris])))
    assert got[-1] == paris and fin.finish_reason == "stop" and text == "The capital of France is"
    got, text, _, _, fin = run_async(collect(engine_f32, make_request("len", ids, max_tokens=3)))
    assert fin.finish_reason == "length" and fin.completion_tokens == len(got) == 3


def test_logprobs_and_top_logprobs(engine_f32):
    ids = chat(engine_f32, QUESTIONS[0])
    got, _, _, lps, fin = run_async(collect(engine_f32, make_request("lp", ids, max_tokens=5, logprobs=True,
                                                                    top_logprobs=5)))
    assert len(lps) == len(got) == 5
    for tok, lp in zip(got, lps):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 5
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert lp.top[0] == (tok, pytest.approx(lp.logprob))  # greedy picks the most likely


@pytest.mark.parametrize("kw", [dict(repetition_penalty=5e-324), dict(repetition_penalty=1e300),
                                dict(temperature=5e-324), dict(temperature=1e-300, top_k=3, seed=1)], ids=str)
def test_extreme_valid_sampling_values_give_finite_logprobs_and_honour_filters(engine_f32, kw):
    """Found by the fuzz: repetition_penalty 5e-324 is 0 in float32 (0/0 = NaN logprobs, a 500 on JSON),
    and a denormal temperature turned the row's logprobs to NaN, so top_k 3 kept a token at -20.9 nats."""
    ids = chat(engine_f32, QUESTIONS[0])
    got, _, _, lps, fin = run_async(collect(engine_f32, make_request("x", ids, max_tokens=4, logprobs=True,
                                                                    top_logprobs=3, **kw)))
    assert fin.finish_reason == "length" and len(lps) == len(got) == 4
    for tok, lp in zip(got, lps):
        assert math.isfinite(lp.logprob) and all(math.isfinite(v) for _, v in lp.top)
        if "temperature" in kw:  # below 1e-5 it is greedy, as in vLLM
            assert lp.top[0][0] == tok


@pytest.mark.parametrize("prompt,raw", [("北京是中国的首都。上海是", True), ("Reply only with emoji: party", False)])
def test_utf8_deltas_from_the_model_are_whole_characters(engine_f32, prompt, raw):
    ids = engine_f32.encode(prompt) if raw else chat(engine_f32, prompt)
    got, text, deltas, _, fin = run_async(collect(engine_f32, make_request(f"utf8-{raw}", ids, max_tokens=16)))
    assert any(ord(c) > 0x2FFF for c in text)  # it did produce CJK / emoji (multi-token characters)
    assert "" in deltas  # a token that completed no character emitted nothing
    assert all("\ufffd" not in d for d in deltas)
    body = got[:-1] if fin.finish_reason == "stop" else got
    assert text == engine_f32.tokenizer.decode(body).rstrip("\ufffd")  # a cut-off last character is dropped


def test_requests_that_cannot_be_admitted_raise_before_the_first_event(engine_f32):
    ids = chat(engine_f32, "hi")

    async def first_event(req):
        async for ev in engine_f32.generate(req):
            return ev

    with pytest.raises(ContextOverflow):
        run_async(first_event(make_request("too-long", ids, max_tokens=engine_f32.max_model_len)))
    with pytest.raises(BadRequest, match="empty"):
        run_async(first_event(make_request("empty", [], max_tokens=4)))
    with pytest.raises(BadRequest, match="token ids"):
        run_async(first_event(make_request("oov", [10**7], max_tokens=4)))
    with pytest.raises(BadRequest) as e:
        run_async(first_event(make_request("tlp", ids, max_tokens=4, logprobs=True, top_logprobs=21)))
    assert e.value.param == "top_logprobs"

    async def duplicate():
        first = engine_f32.generate(make_request("dup", ids, max_tokens=8))
        await first.__anext__()
        try:
            await first_event(make_request("dup", ids, max_tokens=8))
        finally:
            await first.aclose()

    with pytest.raises(BadRequest, match="already running"):
        run_async(duplicate())


def test_chat_template_missing_is_a_clear_error(mlx_f32_no_template):
    from mlx_ray.engine.engine import MLXEngine

    engine = MLXEngine(mlx_f32_no_template)  # tokenizer helpers load lazily, no loop needed
    with pytest.raises(BadRequest, match="no chat template"):
        engine.encode_chat([{"role": "user", "content": "hi"}])
    ids = engine.encode_chat([{"role": "user", "content": "hi"}],
                             chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert engine.tokenizer.decode(ids) == "<user>hi"


def test_finish_event_usage_counts(engine_f32):
    ids = chat(engine_f32, QUESTIONS[5])
    got, _, _, _, fin = run_async(collect(engine_f32, make_request("usage", ids, max_tokens=6)))
    assert isinstance(fin, FinishEvent)
    assert (fin.prompt_tokens, fin.completion_tokens) == (len(ids), len(got))
    s = engine_f32.stats()
    for key in ("running", "waiting", "kv_bytes_used", "kv_budget_bytes", "prefix_hits", "prefix_misses",
                "prompt_tokens_total", "generation_tokens_total"):
        assert key in s


@pytest.mark.parametrize("kv_cache", ["paged", "batch"])
def test_warm_up_runs_at_start_caches_the_preamble_and_zeroes_the_counters(mlx_f32, mlxlm_greedy, kv_cache, caplog):
    """The start-up warm-up (greedy with logprobs, top_p, top_k + min_p chat requests) runs through the
    real loop; the counters are zero after it, and a user's first chat request hits the chat template's
    preamble in the prefix cache, with mlx-lm's tokens."""
    from mlx_ray.engine.warmup import WARMUP_REQUESTS
    import logging

    from fixtures_engine import start_engine

    with caplog.at_level(logging.INFO, logger="mlx_ray.engine.warmup"):
        e = start_engine(mlx_f32, kv_cache=kv_cache, max_num_seqs=4, kv_budget_bytes=64 << 20,
                         prefix_cache_bytes=32 << 20, max_model_len=1024)
    try:
        assert any("warmed up" in r.getMessage() for r in caplog.records)
        s = e.stats()
        assert s["requests_finished"] == s["steps"] == s["prompt_tokens_total"] == s["generation_tokens_total"] == 0
        assert s["prefix_hits"] == s["prefix_misses"] == 0 and s["prefix_cache_entries"] > 0
        assert s["kv_bytes_used"] == 0 and s["inflight"] == 0
        ids = chat(e, QUESTIONS[0])
        warm = chat(e, WARMUP_REQUESTS[0][0])
        shared = next(i for i, (a, b) in enumerate(zip(ids, warm)) if a != b)
        assert shared >= 8  # SmolLM2's template: "<|im_start|>system\nYou are a helpful AI assistant ..."
        got, _, _, _, fin = run_async(collect(e, make_request("first", ids, max_tokens=8)))
        assert 0 < fin.cached_tokens <= shared and got == mlxlm_greedy(ids, 8)
        assert e.stats()["requests_finished"] == 1 and e.stats()["prefix_hits"] == 1
    finally:
        run_async(e.shutdown())


def test_shutdown_gives_the_memory_back(mlx_f32):
    """An engine shut down in a process that goes on (a bench's sides, a test session) releases its weights,
    KV pool and MLX's buffer cache, as sleep does; its stats stay readable."""
    import gc

    import mlx.core as mx
    from fixtures_engine import start_engine

    from mlx_ray.engine import memory

    gc.collect()
    mx.clear_cache()
    base = memory.mlx_memory()
    e = start_engine(mlx_f32, kv_budget_bytes=64 << 20, prefix_cache_bytes=0, max_model_len=256)
    held = memory.mlx_memory() - base
    assert held > 500e6, held  # the float32 weights alone are 0.54 GB
    run_async(e.shutdown())
    assert memory.mlx_memory() - base < 0.05 * held, (memory.mlx_memory() - base, held)
    assert e.stats()["running"] == 0 and e.stats()["requests_finished"] == 0  # the warm-up's were zeroed
