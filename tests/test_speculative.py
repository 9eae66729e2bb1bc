"""Speculative decoding in the paged engine (issue 33): proposers, exactness, KV rollback, the controller.

The engine tests run on the float32 fixture with the n-gram proposer drafting on every step where it
finds a draft (``auto: false``), on prompts that make the fixture copy (so drafts are both accepted
and rejected), and compare with the session's engine without speculation. The sampled-distribution
tests run the verify step's sampling and acceptance at fixed logits, many rows at once.
"""

from __future__ import annotations

import asyncio
import json

import mlx.core as mx
import numpy as np
import pytest

from fixtures_engine import collect, make_request, run_async, start_engine

from mlx_ray.engine.spec.controller import Controller, CostModel, DraftCost
from mlx_ray.engine.spec.ngram import NgramProposer, lookup

DOC = ('{"name": "Ada Lovelace", "born": 1815, "field": "mathematics", "known_for": ["Analytical Engine", '
       '"first program"], "city": "London"}')
COPY = f"Rewrite this JSON exactly, but change the city to Paris:\n{DOC}"
CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
COPY2 = f"Repeat this code exactly, renaming add to plus:\n{CODE}"


# ------------------------------------------------------------------ the proposer and the controller, no model
def test_ngram_drafts_the_continuation_of_the_latest_longest_match():
    a = np.array([1, 2, 3, 4, 5, 9, 9, 1, 2, 3])
    assert lookup(a, 2, 4, 3) == [4, 5, 9]
    assert lookup(np.array([1, 2, 3, 4, 1, 2, 3, 7, 8, 9, 1, 2, 3]), 2, 4, 2) == [7, 8]  # the latest with k after it
    assert lookup(np.array([5, 6, 7, 8]), 2, 4, 3) == []  # no repeated suffix
    assert lookup(np.array([1, 2, 9, 2]), 2, 4, 3) == []  # a 1-gram match is below prompt_lookup_min
    p = NgramProposer(2, 4)
    assert p.propose([(0, [1, 2, 3, 1, 2], 2), (1, [4, 5, 6], 2)]) == {0: [3, 1]}
    assert p.propose([(0, [1, 2, 3, 1, 2, 3], 2)]) == {0: [1, 2]}  # its tokens grew: the cached array follows
    p.forget(0)
    assert p.stats() == {"spec_ngram_lookups": 3, "spec_ngram_hits": 2}


def test_controller_turns_off_a_row_whose_acceptance_collapses_and_speculation_under_load():
    c = Controller(4, cost=CostModel(a=0.020, b=0.001))  # a query token costs 5% of a step
    rows = [(0, 50), (1, 50)]
    assert set(c.plan(rows)) == {0, 1}  # unknown rows: the prior drafts
    for _ in range(6):
        c.verified(0, 4, 4)  # row 0 copies
        c.verified(1, 4, 0)  # row 1's drafts are all rejected
    plan = c.plan(rows)
    assert plan.get(0) == 4 and 1 not in plan
    c.verified(0, 4, 3)  # (no draft wholly accepted from here: probes back off)
    probes = [c.plan(rows).get(1) for _ in range(60)]  # the row left out is probed now and then, at K = 1
    assert 1 <= sum(p == 1 for p in probes) <= 4 and all(p in (None, 1) for p in probes)
    # Under load (16 rows, a query token costing an eighth of a step, as on this CPU) nothing pays: no row drafts.
    loaded = Controller(4, cost=CostModel(a=0.050, b=0.006))
    many = [(i, 50) for i in range(16)]
    for i in range(16):
        for _ in range(4):
            loaded.verified(i, 4, 2)
    assert loaded.plan(many) == {}
    assert loaded.plan([(0, 50)]).get(0, 0) >= 2  # alone, the same acceptance pays
    # Nor does a probe where even a row drafting well would not pay: with the costs measured in the loop here
    # (a synced step 2.1x a pipelined one, bench/results/speculative_offngram_2026-12-06.json), 16 rows that
    # copy (acceptance 0.83) are never probed: each probe would be a synced step of 32 query tokens.
    cpu = CostModel(a=0.059, b=0.0065)
    cpu.ratio = {False: 0.69, True: 1.44}
    busy = Controller(4, cost=cpu)
    for i in range(16):
        for _ in range(6):
            busy.verified(i, 5, 4)
    assert [busy.plan(many) for _ in range(300)] == [{}] * 300
    assert busy.counters["spec_probes"] == 0 and busy.counters["spec_probes_skipped"] > 0
    assert busy.plan([(0, 50)]).get(0, 0) >= 2  # alone it pays
    assert c.plan([(0, 0)]) == {}  # no token left to draft (max_tokens)


def test_controller_counts_what_the_draft_model_costs():
    # On this CPU a step's fixed costs dominate: the 4-bit fixture drafting for the float32 one costs about as
    # much a forward as the target (0.96x, measured: docs/benchmarks.md), so even a draft every token of which
    # is accepted loses: the controller neither drafts nor probes with it, alone or under load.
    target = dict(a=0.030, b=0.003)
    slow = Controller(4, cost=CostModel(**target), draft=DraftCost(a=0.029, b=0.001))
    for _ in range(6):
        slow.verified(0, 4, 4)
    assert [slow.plan([(0, 50)]) for _ in range(100)] == [{}] * 100
    assert slow.counters["spec_probes"] == 0
    # The same rows with a draft a tenth as costly (a 0.5B drafting for a 32B): K = 4 alone.
    cheap = Controller(4, cost=CostModel(**target), draft=DraftCost(a=0.003, b=0.0003))
    for _ in range(6):
        cheap.verified(0, 4, 4)
    assert cheap.plan([(0, 50)]) == {0: 4}
    # Its first ask of a row catches up on the row's prompt: charged spread over the steps the row has left, so
    # a long prompt with a few tokens to go is not worth starting the draft for, and one with many is.
    assert cheap.plan([(0, 9, 2000)]) == {}
    assert cheap.plan([(0, 400, 2000)]) == {0: 4}
    # A draft that turns out slower live than at calibration (its propose calls timed) is dropped.
    for _ in range(30):
        cheap.draft_cost([1, 1, 1, 1], 1, 4 * 0.033)
    assert cheap.draft.forward(1) == pytest.approx(0.033, rel=0.05)
    assert cheap.plan([(0, 50)]) == {}
    # A proposer without a model (n-gram) costs its host time per row asked, measured the same way.
    ng = DraftCost()
    for _ in range(20):
        ng.observe([], 4, 0.002)
    assert ng.forward(3) == 0.0 and ng.host == pytest.approx(0.0005)


def test_controller_checks_its_plans_against_what_they_deliver():
    c = Controller(4, cost=CostModel(a=0.030, b=0.002))
    many = [(i, 50) for i in range(16)]
    for i in range(16):
        for _ in range(6):
            c.verified(i, 4, 4)  # every row copies: the model promises a gain at 16 rows
    assert c.plan(many) and c.promised > 0
    for _ in range(3):  # ... but such steps deliver 0.6 of it (measured: the read-back tokens over the step's time)
        c.realized(16, c.promised, 0.6 * c.promised)
    assert c.efficiency(16) == pytest.approx(0.6) and c.plan(many) == {}
    assert c.plan([(0, 50)]) == {0: 4}  # alone it still pays, scaled by the same 0.6 (no size 1 measured yet)
    for _ in range(3):
        c.realized(1, 1.0, 1.0)  # where steps deliver what was promised, the promise stands
    assert c.efficiency(1) == pytest.approx(1.0) and c.efficiency(8) < 1.0


def test_cost_model_scales_the_calibrated_line_by_what_steps_cost_live():
    m = CostModel(a=0.05, b=0.006)
    for n in (1, 1, 2, 5, 1, 3) * 2:
        m.observe(n, False, 0.8 * (0.05 + 0.006 * n))  # plain steps overlap their graph building
        m.observe(n + 4, True, 1.1 * (0.05 + 0.006 * (n + 4)))
    m.observe(30, True, 50.0)  # one outlier moves it little
    assert m.predict(4, False) == pytest.approx(0.8 * 0.074, rel=0.01)  # never seen: the line, scaled
    assert m.predict(5, True) == pytest.approx(1.1 * 0.080, rel=0.01)  # seen often: its own mean
    assert m.predict(7, True) == pytest.approx(1.1 * 0.092, rel=0.15)
    for _ in range(3):
        m.observe(16, False, 0.3)  # measured at n = 16: its own mean, whatever the line says
    assert m.predict(16, False) == pytest.approx(0.3, rel=0.01)


# ------------------------------------------------------------------ sampled rows: the target's distribution
class _Row:
    def __init__(self, uid, tokens, sampler, processors):
        self.uid, self.tokens, self.sampler, self.processors = uid, tokens, sampler, processors


FILTERS = {
    "temperature": dict(temperature=0.8),
    "top_p": dict(temperature=0.7, top_p=0.9),
    "top_k": dict(temperature=1.0, top_k=5),
    "min_p": dict(temperature=1.0, min_p=0.05),
    "penalties": dict(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3),
    "logit_bias": dict(temperature=1.0, logit_bias={3: 2.5, 7: -100}),
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_verified_tokens_follow_the_target_distribution_for_each_filter(name):
    """Rows draft one token at fixed logits; what the verify step emits (first token; second token when the
    draft was accepted) must follow the distribution plain decoding samples from (chi-square, p > 0.001)."""
    from scipy.stats import chisquare

    from mlx_ray.engine.protocol import SamplingParams
    from mlx_ray.engine.sampling import make_logits_processors, make_sampler
    from mlx_ray.engine.spec.verify import accepted, sample_positions

    V, N, prompt = 12, 3000, [1, 2, 3, 1]
    params = SamplingParams(**FILTERS[name])
    raw = mx.random.normal((2, V), key=mx.random.key(11)) * 1.5
    draft = [int(mx.argsort(raw[0])[-2].item())]  # a likely but not the likeliest token: accepted, rejected
    rows = [_Row(i, list(prompt), make_sampler(params, default_seed=i), make_logits_processors(params, len(prompt)))
            for i in range(N)]
    logits = mx.concatenate([raw] * N, axis=0)
    drafts, index = {i: draft for i in range(N)}, {i: 2 * i for i in range(N)}
    toks, _ = sample_positions(logits, rows, drafts, index)
    toks = toks.tolist()
    first, second = np.zeros(V), np.zeros(V)
    for i in range(N):
        a = accepted(toks, 2 * i, draft)
        out = toks[2 * i:2 * i + a + 1]
        first[out[0]] += 1
        if a:
            second[out[1]] += 1

    def target(ctx, x):  # plain decoding's exact distribution there: the sampler's kept weights (its twin)
        from mlx_ray.kernels.sampler import twin_parts

        y = x[None]
        for p in make_logits_processors(params, len(prompt)):
            y = p(mx.array(ctx, dtype=mx.int32), y)
        lp = y - mx.logsumexp(y, axis=-1, keepdims=True)
        w = twin_parts(lp, params.temperature, params.top_k, params.top_p, params.min_p, 0.0)["weights"]
        w = np.array(w.tolist()[0], dtype=np.float64)
        return w / w.sum()

    for counts, p in ((first, target(prompt, raw[0])), (second, target(prompt + draft, raw[1]))):
        keep = p > 0
        assert counts[~keep].sum() == 0  # never a token the filters remove
        exp = p[keep] / p[keep].sum() * counts.sum()
        big = exp >= 5  # chi-square's rule; the small cells pooled
        obs_c = np.append(counts[keep][big], counts[keep][~big].sum())
        exp_c = np.append(exp[big], exp[~big].sum())
        if exp_c[-1] == 0:
            obs_c, exp_c = obs_c[:-1], exp_c[:-1]
        assert chisquare(obs_c, exp_c).pvalue > 1e-3, (name, obs_c, exp_c)
    assert 0 < second.sum() < N  # the draft was both accepted and rejected


# ------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def spec_engine(mlx_f32):
    e = start_engine(mlx_f32, max_num_seqs=16, max_queue=16, kv_budget_bytes=256 << 20, prefix_cache_bytes=16 << 20,
                     max_model_len=1024, warmup=False,
                     speculative={"method": "ngram", "num_speculative_tokens": 4, "auto": False})
    yield e
    run_async(e.shutdown())


def _chat(e, text):
    return e.encode_chat([{"role": "user", "content": text}])


def _gather(e, reqs):
    async def main():
        async def one(k, r):
            await asyncio.sleep(0.02 * k)  # staggered: rows join a running batch, mid-verify
            return await collect(e, r)
        return await asyncio.gather(*(one(k, r) for k, r in enumerate(reqs)))
    return run_async(main())


def _blocks_free(e):
    s = e.stats()
    b = e._sched.backend
    return s["kv_blocks_used"] == 0 and b.outstanding == 0 and s["inflight"] == 0


def test_greedy_rows_are_token_identical_alone_and_in_a_staggered_batch_of_16(spec_engine, engine_f32):
    e = spec_engine
    prompts = [_chat(e, COPY), _chat(e, COPY2)]
    want = {}
    for i, ids in enumerate(prompts):
        got = run_async(collect(engine_f32, make_request(f"ref{i}", ids, max_tokens=40, logprobs=True)))
        want[i] = got
    before = e.stats()
    alone = run_async(collect(e, make_request("alone", prompts[0], max_tokens=40, logprobs=True)))
    assert alone[0] == want[0][0] and alone[1] == want[0][1]
    assert [lp.token_id for lp in alone[3]] == want[0][0]
    assert np.allclose([lp.logprob for lp in alone[3]], [lp.logprob for lp in want[0][3]], atol=1e-3)
    # 16 rows: both prompts, max_tokens and stop strings that end rows inside drafted runs.
    text0 = want[0][1]
    stop = text0[len(text0) // 2:len(text0) // 2 + 6]
    reqs = []
    for k in range(16):
        i = k % 2
        kw = dict(max_tokens=40)
        if k % 4 == 2:
            kw["max_tokens"] = 5 + k  # a limit inside a drafted run
        if k % 8 == 1:
            kw = dict(max_tokens=40, stop=[stop]) if i == 0 else kw
        reqs.append(make_request(f"b{k}", prompts[i], **kw))
    results = _gather(e, reqs)
    for k, (r, (ids, text, _, _, fin)) in enumerate(zip(reqs, results)):
        ref_ids, ref_text = want[k % 2][0], want[k % 2][1]
        assert fin.error is None
        if r.sampling.stop:
            assert fin.finish_reason == "stop" and text == ref_text[:ref_text.index(stop)]
        else:
            n = r.sampling.max_tokens
            assert ids == ref_ids[:n], k
            assert fin.completion_tokens == len(ids) and (fin.finish_reason == "length") == (len(ids) == n)
    s = e.stats()
    drafted = s["spec_drafted_tokens"] - before["spec_drafted_tokens"]
    acc = s["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert 0 < acc < drafted  # drafts were accepted and rejected
    assert _blocks_free(e)


def test_json_schema_rows_stay_valid_under_speculation(spec_engine):
    e = spec_engine
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "integer"},
                                               "city": {"type": "string"}},
              "required": ["name", "born", "city"], "additionalProperties": False}
    from mlx_ray.engine.protocol import Grammar

    before = e.stats()["spec_accepted_tokens"]
    reqs = [make_request(f"js{k}", _chat(e, COPY), max_tokens=60, grammar=Grammar("json_schema", schema),
                         **({} if k == 0 else dict(temperature=0.7, top_p=0.9, seed=k))) for k in range(3)]
    for ids, text, _, _, fin in _gather(e, reqs):
        assert fin.error is None and fin.finish_reason == "stop", text
        obj = json.loads(text)
        assert set(obj) == {"name", "born", "city"} and isinstance(obj["born"], int)
    assert e.stats()["spec_accepted_tokens"] > before
    assert _blocks_free(e)


def test_cancel_mid_verify_frees_every_block(spec_engine):
    e = spec_engine
    b = e._sched.backend

    async def main():
        req = make_request("cancel-me", _chat(e, COPY2), max_tokens=400, ignore_eos=True)
        n = 0
        async for ev in e.generate(req):
            n += len(getattr(ev, "token_ids", []))
            if n >= 12 and b._inflight is not None and b._inflight.drafts:  # a verify step is in flight
                await e.cancel("cancel-me")
                break
        for _ in range(200):
            if e.stats()["inflight"] == 0 and not b.rows:
                return
            await asyncio.sleep(0.01)

    run_async(main())
    assert _blocks_free(e) and b.pool.num_free + len(b.prefix) + 1 == b.pool.num_blocks


def test_speculative_config_and_flag():
    from types import SimpleNamespace

    from mlx_ray.errors import BadRequest
    from mlx_ray.serve.cli import config_from_args
    from mlx_ray.serve.config import ServeConfig

    args = SimpleNamespace(config=None, model=["m"], served_model_name=[], max_model_len=None, max_num_seqs=None,
                           max_queue=None, kv_cache=None, admission=None, kv_bits=None, kv_budget_mib=None,
                           prefix_cache_mib=None, resource=None, num_cpus=None, host=None, port=None,
                           api_key_file=None, api_key_env=None,
                           speculative='{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    spec = config_from_args(args).models[0].engine.speculative
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_max, spec.auto) == ("ngram", 3, 5, True)
    assert ServeConfig.validate_dict({"models": [{"model": "m"}]}).models[0].engine.speculative is None  # off
    with pytest.raises(BadRequest, match="draft_model"):
        ServeConfig.validate_dict({"models": [{"model": "m", "engine": {"speculative": {"method": "draft"}}}]})


# ------------------------------------------------------------------ the draft model (the fixture at 4 bits)
@pytest.fixture(scope="module")
def draft_engine(mlx_f32, mlx_q4):
    e = start_engine(mlx_f32, max_num_seqs=8, max_queue=16, kv_budget_bytes=64 << 20, prefix_cache_bytes=8 << 20,
                     max_model_len=1024, warmup=False, prefill_chunk=16,  # the draft catches up in chunks of 16
                     speculative={"method": "draft", "draft_model": str(mlx_q4), "num_speculative_tokens": 3,
                                  "auto": False})
    yield e
    run_async(e.shutdown())


def test_draft_model_greedy_rows_are_token_identical_and_its_blocks_are_admitted(draft_engine, engine_f32):
    e = draft_engine
    b = e._sched.backend
    # Admission counts the draft's KV: the budget holds blocks of both models' K/V.
    draft_bytes = b.spec.proposer.pool.block_bytes
    assert b.pool.num_blocks == (64 << 20) // (b.pool.block_bytes + draft_bytes)
    prompts = [_chat(e, COPY), _chat(e, "Name three primary colors."), _chat(e, COPY2)]
    want = [run_async(collect(engine_f32, make_request(f"dref{i}", p, max_tokens=24)))[0] for i, p in enumerate(prompts)]
    reqs = [make_request(f"d{k}", prompts[k % 3], max_tokens=24 if k % 4 else 9) for k in range(6)]
    for r, (ids, _, _, _, fin) in zip(reqs, _gather(e, reqs)):
        assert fin.error is None and ids == want[int(r.request_id[1:]) % 3][:r.sampling.max_tokens]
    s = e.stats()
    assert s["spec_accepted_tokens"] > 0.5 * s["spec_drafted_tokens"] > 0  # the 4-bit fixture agrees with f32
    # The draft's KV is written on demand: each row's first asks caught up on its prompt, 16 positions a step
    # (its drafts agree with the target above, so what the catch-up wrote is the prompt's K/V).
    assert s["spec_draft_asks_catching_up"] >= len(reqs) * 2
    assert _blocks_free(e)


def test_a_draft_with_another_tokenizer_is_refused_in_one_line():
    from mlx_ray.engine.spec.draft import check_tokenizers, refuse

    class Tok:
        def __init__(self, vocab, eos):
            self.vocab, self.eos_token_ids = vocab, eos

        def get_vocab(self):
            return self.vocab

    target = Tok({"a": 0, "b": 1, "c": 2}, [2])
    assert check_tokenizers(target, Tok({"a": 0, "b": 1, "c": 2}, [2]), "d") is None
    why = check_tokenizers(target, Tok({"a": 0, "x": 1, "c": 2}, [2]), "d")
    err = refuse("small-draft", why)
    assert "vocabulary differs" in str(err) and "\n" not in str(err) and err.param == "speculative"
    assert "end-of-sequence" in check_tokenizers(target, Tok({"a": 0, "b": 1, "c": 2}, [1]), "d")
