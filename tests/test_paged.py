"""The paged KV cache: block accounting, prefix sharing, admission by blocks, 8-bit KV, and token identity.

The engine tests elsewhere run on whatever ``kv_cache="auto"`` picks here (the
paged cache once its CPU kernel is verified); these force each backend.
"""

from __future__ import annotations

import asyncio

import mlx.core as mx
import pytest

from fixtures_engine import collect, make_request, run_async, start_engine

from mlx_ray.engine.block_prefix import BlockPrefixCache
from mlx_ray.engine.kv_pool import KVPool, LayerShape
from mlx_ray.engine.protocol import EngineConfig

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Count from one to five.",
             "What is 2 + 2?"]


def chat(engine, q):
    return engine.encode_chat([{"role": "user", "content": q}])


# ------------------------------------------------------------------ blocks, no model
def _pool(blocks=8, bs=4, bits=None):
    return KVPool([LayerShape(2, 64)], mx.float32, blocks, bs, bits=bits)


def test_prefix_blocks_are_shared_by_reference_and_tails_copied_on_write():
    pool = _pool()
    cache = BlockPrefixCache(pool, max_blocks=8)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    tokens = list(range(10))  # blocks: [0..3] [4..7] [8, 9]
    cache.insert(tokens, [a, b, c])
    for blk in (a, b, c):  # the sequence lets go: the cache's references remain, evictable
        pool.decref(blk)
        cache.release(blk)
    assert [pool.refs[x] for x in (a, b, c)] == [1, 1, 1] and len(cache.evictable) == 3
    full, tail = cache.match(list(range(10)) + [99, 100])  # shares 2 full blocks, then the 2-token tail
    assert full == [a, b] and tail == (c, 2)
    full, tail = cache.match(list(range(9)) + [99, 100])  # 1 token of the tail
    assert full == [a, b] and tail == (c, 1)
    full, tail = cache.match([0, 1, 2, 3, 4, 5, 50, 51, 52])  # leaves the second block part-way
    assert full == [a] and tail == (b, 2)
    full, tail = cache.match([7, 1, 2, 3, 4])
    assert full == [] and tail is None
    full, tail = cache.match(list(range(8)))  # never the prompt's last token: it must be computed
    assert full == [a] and tail == (b, 3)


def test_eviction_frees_lru_blocks_and_their_descendants_only_when_unused():
    pool = _pool(blocks=4)
    cache = BlockPrefixCache(pool, max_blocks=4)
    a, b = pool.allocate(), pool.allocate()
    cache.insert(list(range(8)), [a, b])
    pool.decref(a)
    cache.release(a)  # b still used by its sequence
    assert list(cache.evictable) == [a]
    assert cache.evict_one()  # dropping a drops b from the cache (unreachable), b stays with its user
    assert pool.refs[a] == 0 and pool.refs[b] == 1 and len(cache) == 0
    assert pool.decref(b) and pool.num_free == 4


def test_quantized_pool_round_trips_within_8_bit_error():
    pool = _pool(bits=8)
    x = mx.random.normal((1, 2, 3, 64), key=mx.random.key(0))
    pool.write(0, mx.array([5, 1, 6], dtype=mx.int32), x, x)
    packed, scales, biases = pool.k[0]
    got = mx.dequantize(packed[mx.array([5, 1, 6])].reshape(6, -1), scales[mx.array([5, 1, 6])].reshape(6, -1),
                        biases[mx.array([5, 1, 6])].reshape(6, -1), group_size=64, bits=8)
    want = x.transpose(0, 2, 1, 3).reshape(6, 64)
    assert mx.abs(got - want).max().item() < 0.02
    assert pool.block_bytes == 4 * 2 * 2 * (64 + 2 * 4)  # 8-bit values + f32 scale and bias per group


# ------------------------------------------------------------------ the engine on the paged cache
@pytest.fixture(scope="module")
def paged_engine(mlx_f32):
    e = start_engine(mlx_f32, kv_cache="paged", max_num_seqs=8, max_queue=16, kv_budget_bytes=256 << 20,
                     prefix_cache_bytes=0, max_model_len=2048)
    yield e
    run_async(e.shutdown())


def test_paged_batch_is_token_identical_to_mlx_lm_and_copies_no_kv(paged_engine, mlxlm_greedy):
    e = paged_engine
    assert e.stats()["kv_cache"] == "paged"
    prompts = [chat(e, q) for q in QUESTIONS]

    async def main():  # staggered: request k starts k * 30 ms later, so rows join a running batch
        async def one(k):
            await asyncio.sleep(0.03 * k)
            return await collect(e, make_request(f"pg{k}", prompts[k], max_tokens=24))
        return await asyncio.gather(*(one(k) for k in range(len(prompts))))

    results = run_async(main())
    for ids, (got, _, _, _, fin) in zip(prompts, results):
        assert fin.error is None
        assert got == mlxlm_greedy(ids, 24)
    s = e.stats()
    assert s["kv_copy_bytes_total"] == 0 and s["kv_admit_copy_bytes_total"] == 0 and s["kv_finish_copy_bytes_total"] == 0
    assert s["kv_blocks_used"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"] and s["inflight"] == 0


def test_paged_prefix_hit_gives_the_same_tokens_as_a_miss(mlx_f32, mlxlm_greedy):
    # warmup=False: an empty prefix cache (the warm-up would leave the chat preamble cached)
    e = start_engine(mlx_f32, kv_cache="paged", max_num_seqs=4, kv_budget_bytes=64 << 20,
                     prefix_cache_bytes=32 << 20, max_model_len=1024, warmup=False)
    try:
        # 51 tokens: one full block, then a tail of 18 (copied on write)
        ids = chat(e, "What is the capital of France? Answer in one short sentence, please, and be precise about it.")
        assert len(ids) == 51
        miss = run_async(collect(e, make_request("miss", ids, max_tokens=16)))
        hit = run_async(collect(e, make_request("hit", ids, max_tokens=16)))
        assert miss[4].cached_tokens == 0 and hit[4].cached_tokens == len(ids) - 1  # all but the last token
        assert hit[0] == miss[0] == mlxlm_greedy(ids, 16)
        # A longer prompt that leaves the cached blocks part-way: its shared tail is copied, once.
        longer = ids[:-3] + chat(e, "and of Spain?")
        got = run_async(collect(e, make_request("tail", longer, max_tokens=8)))
        assert got[4].cached_tokens == len(ids) - 3 and got[0] == mlxlm_greedy(longer, 8)
        s = e.stats()
        assert s["kv_admit_copy_bytes_total"] > 0 and s["kv_finish_copy_bytes_total"] == 0
        assert s["kv_blocks_used"] == 0 and s["prefix_hits"] == 2
    finally:
        run_async(e.shutdown())


def _peak_running(e, prompts, max_tokens):
    """The most rows running in one step, counted by the loop at every step (not sampled on a timer)."""
    backend, counts = e._sched.backend, []
    real_step = backend.step

    def step():
        counts.append(len(e._sched.active))
        return real_step()

    async def main():
        tasks = [asyncio.ensure_future(collect(e, make_request(f"adm{i}-{id(e)}", p, max_tokens=max_tokens,
                                                               ignore_eos=True)))
                 for i, p in enumerate(prompts)]
        for t in tasks:
            assert (await t)[4].error is None

    backend.step = step
    try:
        run_async(main())
    finally:
        del backend.step
    return max(counts)


def test_admission_by_blocks_runs_more_rows_than_the_batch_cache_in_the_same_budget(mlx_f32):
    budget = 14 << 20  # 9 blocks of 32 tokens (1.47 MB each; 8 usable beside the trash block); the batch cache's 256-token row is 11.8 MB
    kw = dict(max_num_seqs=8, max_queue=16, kv_budget_bytes=budget, prefix_cache_bytes=0, max_model_len=256)
    paged = start_engine(mlx_f32, kv_cache="paged", **kw)
    batch = start_engine(mlx_f32, kv_cache="batch", **kw)
    try:
        prompts = [chat(paged, q)[:40] for q in QUESTIONS]  # 40 + 24 tokens: 2 blocks each
        assert _peak_running(paged, prompts, 24) == 4
        assert _peak_running(batch, prompts, 24) == 1
        assert paged.stats()["kv_blocks_used"] == 0
    finally:
        run_async(paged.shutdown())
        run_async(batch.shutdown())


def _timeline(e, first, rest):
    """Start ``first`` (rid, ids, max_tokens), wait for its first token, then submit ``rest`` in order:
    each request's (first-token time, finish time), and the engine's stats at the end."""
    from mlx_ray.engine.protocol import TokenEvent

    async def main():
        loop, times = asyncio.get_running_loop(), {}

        async def one(rid, ids, n, started=None):
            t0 = None
            async for ev in e.generate(make_request(rid, ids, max_tokens=n, ignore_eos=True)):
                if isinstance(ev, TokenEvent) and t0 is None:
                    t0 = loop.time()
                    if started:
                        started.set()
                elif not isinstance(ev, TokenEvent):
                    assert ev.error is None and ev.completion_tokens == n
            times[rid] = (t0, loop.time())

        started = asyncio.Event()
        tasks = [asyncio.ensure_future(one(*first, started=started))]
        await started.wait()
        tasks += [asyncio.ensure_future(one(*r)) for r in rest]
        await asyncio.gather(*tasks)
        return times
    return run_async(main()), e.stats()


def test_backfill_starts_only_what_cannot_delay_the_waiting_head(mlx_f32):
    """EASY backfilling: with A running, head H waits for A's blocks; D would fit now but would still
    hold blocks when A is done (H would wait for it): it must wait behind H; C fits and finishes
    before A: it starts at once. Strict FIFO (admission="fifo") starts C only after H."""
    block = 30 * 3 * 64 * 2 * 4 * 4  # f32 K+V of 4 tokens, 30 layers of 3 KV heads of 64
    kw = dict(kv_cache="paged", kv_block_size=4, kv_budget_bytes=21 * block, prefix_cache_bytes=0,
              max_num_seqs=8, max_model_len=96)
    p = [[1, 17, 300, 4242, 9 + i] for i in range(4)]  # 5 tokens each
    A = ("A", p[0], 22)   # 7 blocks, ~22 steps
    H = ("H", p[1], 75)   # 20 blocks: waits until A is done (13 free beside A)
    D = ("D", p[2], 30)   # 9 blocks: fits now, but outlasts A and the pool has nothing spare for H then
    C = ("C", p[3], 3)    # 2 blocks, done long before A
    e = start_engine(mlx_f32, **kw)
    try:
        assert e.stats()["kv_blocks_total"] == 20
        t, s = _timeline(e, A, [H, D, C])
        assert s["requests_backfilled"] == 1
        assert t["C"][1] < t["A"][1]  # C ran beside A
        assert t["H"][0] < t["D"][0]  # D did not overtake H
        assert s["kv_blocks_used"] == 0 and s["inflight"] == 0
    finally:
        run_async(e.shutdown())
    e = start_engine(mlx_f32, admission="fifo", **kw)
    try:
        t, s = _timeline(e, A, [H, D, C])
        assert s["requests_backfilled"] == 0
        assert t["C"][0] > t["H"][0] and t["C"][0] > t["A"][1]
    finally:
        run_async(e.shutdown())


def test_8_bit_kv_agrees_with_float_kv_on_the_next_token(mlx_f32, mlxlm_f32):
    """Teacher-forced top-1 agreement of 8-bit KV against float32 KV on the parity prompts (>= 0.99).

    Each prompt and its 48-token greedy continuation (float KV) are scored through each pool (``score``: every
    position attends to K/V as stored, as decode reads them). At the default group of 32 (two groups
    per 64-wide head); group 64 gave 283/288 (0.983) here."""
    from mlx_lm.sample_utils import greedy_sampler

    from mlx_ray.engine import paged
    from mlx_ray.parity.prompts import load_prompts

    model, tok = mlxlm_f32
    shapes, dtype = paged.layer_shapes(model)
    batches = {bits: paged.build(model, shapes, dtype, kv_budget=64 << 20, block_size=32, bits=bits, group_size=EngineConfig().kv_group_size,
                                 prefix_bytes=0, prefill_chunk=64, max_rows=1) for bits in (None, 8)}
    prompts = [p.token_ids(tok) for p in load_prompts(None)[:6]]
    conts = {batches[None].insert_row(ids, 48, greedy_sampler, []).uid: [] for ids in prompts}
    while batches[None].rows or any(len(c) < 48 for c in conts.values()):  # the float cache's greedy text, batched
        for r in batches[None].step():
            conts[r.uid].append(r.token)
    agree = total = 0
    for ids, cont in zip(prompts, conts.values()):
        top = {bits: mx.argmax(b.score(ids + cont[:-1])[len(ids) - 1:], axis=-1).tolist() for bits, b in batches.items()}
        assert len(top[8]) == 48
        agree += sum(a == b for a, b in zip(top[None], top[8]))
        total += 48
    assert total == 6 * 48 and agree / total >= 0.99, f"top-1 agreement {agree}/{total}"


def test_kv_bits_on_a_model_the_paged_cache_cannot_take_fails_in_one_line(zoo_model):
    from mlx_ray.engine.engine import MLXEngine
    from mlx_ray.engine.protocol import EngineConfig
    from mlx_ray.errors import BadRequest

    e = MLXEngine(zoo_model("gemma3_text"), EngineConfig(kv_bits=8, max_model_len=256, kv_budget_bytes=64 << 20))
    with pytest.raises(BadRequest, match=r"kv_bits=8 needs the paged KV cache.*RotatingKVCache"):
        run_async(e.start())
    auto = start_engine(zoo_model("gemma3_text"), max_model_len=256, kv_budget_bytes=64 << 20)
    try:
        assert auto.stats()["kv_cache"] == "batch"  # sliding windows keep mlx-lm's batch cache
    finally:
        run_async(auto.shutdown())


# ------------------------------------------------------------------ the step's own faults
def _batch(model, budget=64 << 20, max_rows=4):
    from mlx_ray.engine import paged

    shapes, dtype = paged.layer_shapes(model)
    return paged.build(model, shapes, dtype, kv_budget=budget, block_size=32, bits=None,
                       group_size=EngineConfig().kv_group_size, prefix_bytes=0, prefill_chunk=64, max_rows=max_rows)


def _run(batch, rows: dict, n: int) -> dict:
    """Step ``batch`` until every row of ``rows`` ({uid: []}) has ``n`` tokens; fills and returns ``rows``."""
    for _ in range(4 * n + 20):
        for r in batch.step():
            rows[r.uid].append(r.token)
        if all(len(t) >= n for t in rows.values()) and not batch.rows:
            return rows
    raise AssertionError(f"rows did not finish: {rows}")


def chat_ids(tok, q):
    return list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))


def test_recovery_from_a_failed_step_frees_the_old_pool_before_allocating_the_new(mlxlm_f32):
    """A failed step (here a sampler that raises mid-step, its forward still a lazy graph on the pool) is followed by
    ``reset``, as the scheduler does, inside the handler: peak memory during the reset stays ~1x the pool, not 2x."""
    from mlx_lm.sample_utils import greedy_sampler

    model, tok = mlxlm_f32
    batch = _batch(model, budget=96 << 20)
    pool_bytes = batch.pool.nbytes
    assert pool_bytes > 80 << 20
    calls = []

    def failing(logprobs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("[metal::malloc] Attempting to allocate 9999999999 bytes (simulated)")
        return greedy_sampler(logprobs)

    ids = chat_ids(tok, QUESTIONS[0])
    batch.insert_row(ids, 16, greedy_sampler, [])
    batch.insert_row(chat_ids(tok, QUESTIONS[1]), 16, failing, [])
    with pytest.raises(RuntimeError, match="simulated"):
        try:
            for _ in range(10):
                batch.step()
        except RuntimeError:  # what Scheduler._fail_batch does, in its except clause
            mx.synchronize()
            active = mx.get_active_memory()
            mx.reset_peak_memory()
            batch.reset()
            extra = mx.get_peak_memory() - active
            raise
    assert len(calls) == 3
    assert extra < 0.25 * pool_bytes, f"the reset held {extra / pool_bytes:.2f}x the pool on top of the old one"
    assert batch.pool.nbytes == pool_bytes and not batch.rows and batch.used_blocks == 0
    # The batch serves again, with the same tokens as a fresh one.
    fresh = _batch(model, budget=96 << 20)
    want = _run(fresh, {fresh.insert_row(ids, 8, greedy_sampler, []).uid: []}, 8)
    got = _run(batch, {batch.insert_row(ids, 8, greedy_sampler, []).uid: []}, 8)
    assert list(got.values()) == list(want.values())


@pytest.mark.parametrize("processor", [dict(repetition_penalty=1.5, repetition_context_size=64),
                                       dict(logit_bias={28: 3.0, 30: -100.0})], ids=["penalty", "logit_bias"])
def test_a_row_with_a_penalty_keeps_the_batch_pipelined_and_its_tokens(mlxlm_f32, monkeypatch, processor):
    """One row with a logits processor (repetition penalty, or logit_bias) in a batch of three: every step's forward, for all rows,
    is queued on the previous step's lazy tokens before the host reads them (the pipelined order); and every row's
    tokens are those it gets alone."""
    from mlx_lm.sample_utils import greedy_sampler, make_logits_processors

    model, tok = mlxlm_f32
    n = 16
    prompts = [chat_ids(tok, q) for q in QUESTIONS[:3]]
    procs = [[], make_logits_processors(**processor), []]

    alone = []
    for ids, pr in zip(prompts, procs):
        b = _batch(model)
        alone.append(list(_run(b, {b.insert_row(ids, n, greedy_sampler, pr).uid: []}, n).values())[0])

    batch = _batch(model)
    events = []
    real_decode, real_read, real_step = batch._decode_logits, batch._read, batch.step

    def decode(rows, inputs=None):
        events.append(("decode", inputs is not None))
        return real_decode(rows, inputs)

    def read(step):
        events.append(("read",))
        return real_read(step)

    def step():
        events.append(("step",))
        return real_step()

    monkeypatch.setattr(batch, "_decode_logits", decode)
    monkeypatch.setattr(batch, "_read", read)
    monkeypatch.setattr(batch, "step", step)
    uids = [batch.insert_row(ids, n, greedy_sampler, pr).uid for ids, pr in zip(prompts, procs)]
    got = _run(batch, {u: [] for u in uids}, n)
    assert [got[u] for u in uids] == alone
    # Per step: the order of its decode forward and its read of the previous step.
    steps, cur = [], None
    for ev in events:
        if ev[0] == "step":
            cur = []
            steps.append(cur)
        else:
            cur.append(ev)
    pipelined = [s for s in steps if ("read",) in s and any(e[0] == "decode" for e in s)]
    assert len(pipelined) >= n - 2, steps
    for s in pipelined:
        first_decode = next(i for i, e in enumerate(s) if e[0] == "decode")
        assert s[first_decode] == ("decode", True), s  # built on the previous step's lazy tokens
        assert first_decode < s.index(("read",)), f"the host read the previous step before queueing this one: {s}"


def test_the_load_probe_feeds_only_tokens_of_the_model_vocabulary(tiny_llama_hf, tmp_path):
    """``paged.check`` on a model whose vocabulary (1,024) is smaller than the probe's fixed token ids: it must pass
    (a token past the embedding reads outside it: garbage, and the paged cache was refused)."""
    from mlx_lm.utils import load_model

    from mlx_ray.conversion.convert import convert
    from mlx_ray.engine import paged

    path = convert(str(tiny_llama_hf), out=str(tmp_path / "tiny-f32"), quantize=False, dtype="float32",
                   progress=False)
    import mlx.nn as nn

    model, config = load_model(path)
    assert config["vocab_size"] == 1024
    seen = []

    class Spy(nn.Module):  # the embedding, recording the largest token id it is given
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, x):
            seen.append(int(x.max().item()))
            return self.inner(x)

        def as_linear(self, x):  # tied output layer
            return self.inner.as_linear(x)

    model.model.embed_tokens = Spy(model.model.embed_tokens)
    shapes, dtype = paged.layer_shapes(model)
    assert paged.check(model, shapes, dtype, None, 32) is None
    assert paged.check(model, shapes, dtype, 8, 32) is None
    assert seen and max(seen) < 1024, f"the probe fed token {max(seen)} to a vocabulary of 1024"
