"""Engine parts without a model forward: text streaming, stop strings, sampling, memory, prefix cache."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_ray.engine import memory, sampling
from mlx_ray.engine.prefix_cache import PrefixCache
from mlx_ray.engine.protocol import SamplingParams
from mlx_ray.engine.textstream import TextStream
from mlx_ray.errors import BadRequest


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf):
    from mlx_lm.tokenizer_utils import load

    return load(smollm2_hf)


@pytest.mark.parametrize("text,splits", [("北京是中国的首都。", True), ("Party time 🎉🎊 and 👩‍👩‍👧 family", True),
                                         ("naïve café — ok", False)])
def test_deltas_never_split_utf8(tokenizer, text, splits):
    ids = tokenizer.encode(text, add_special_tokens=False)
    # Byte-level BPE: some tokens of CJK / emoji are not valid UTF-8 on their own.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids) == splits
    ts = TextStream(tokenizer.detokenizer)
    deltas = [ts.add(t) for t in ids] + [ts.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    if splits:
        assert "" in deltas[:-1]  # some token completed no character and was held back


def test_stop_string_split_across_tokens_is_caught_and_not_emitted(tokenizer):
    text = "The answer is forty-two. END OF STORY and more"
    ids = tokenizer.encode(text, add_special_tokens=False)
    ts = TextStream(tokenizer.detokenizer, stop=["END OF STORY"])
    out = ""
    for t in ids:
        out += ts.add(t)
        if ts.stopped:
            break
    assert ts.stopped
    assert out == "The answer is forty-two. "
    assert "END" not in out


def test_partial_stop_string_is_released_when_it_cannot_match(tokenizer):
    ids = tokenizer.encode("abc ENDLESS fun", add_special_tokens=False)
    ts = TextStream(tokenizer.detokenizer, stop=["END."])
    out = "".join(ts.add(t) for t in ids) + ts.finish()
    assert not ts.stopped
    assert out == "abc ENDLESS fun"


def test_earliest_stop_string_wins(tokenizer):
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    ts = TextStream(tokenizer.detokenizer, stop=["four", "two"])
    out = "".join(ts.add(t) for t in ids)
    assert ts.stopped and out == "one "


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("min_p", 2.0), ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("top_logprobs", 21), ("stop", [""]), ("stop_token_ids", [10**9]),
])
def test_invalid_sampling_params_are_bad_requests(field, value):
    with pytest.raises(BadRequest) as e:
        sampling.validate(SamplingParams(**{field: value}), vocab_size=49152)
    assert e.value.param == field


def test_keyed_sampler_is_reproducible_and_independent_of_global_state():
    logprobs = mx.log(mx.softmax(mx.array(np.random.default_rng(0).normal(size=(1, 1000)).astype(np.float32))))
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=123)

    def draw(n=20):
        s = sampling.make_sampler(p)
        return [s(logprobs).item() for _ in range(n)]

    a = draw()
    mx.random.seed(999)  # the global PRNG must not matter
    _ = mx.random.uniform(shape=(10,))
    b = draw()
    assert a == b
    assert len(set(a)) > 1  # it does sample
    assert sampling.make_sampler(SamplingParams(temperature=0)) is sampling.greedy_sampler


def test_penalties_follow_openai_semantics():
    vocab, prompt = 8, [1, 2]
    logits = mx.array([[1.0, 2.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
    context = mx.array(prompt + [3, 3, 4])  # generated: 3 twice, 4 once
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    out = logits
    for proc in sampling.make_logits_processors(p, prompt_len=len(prompt)):
        out = proc(context, out)
    got = out.tolist()[0]
    want = [1.0, 2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 - 0.5, 0.0 - 0.5 - 0.25, 0.0, 0.0, 0.0]
    assert got == pytest.approx(want)
    assert len(got) == vocab


def test_top_logprobs_are_sorted_and_exact():
    lp = mx.array(np.log(np.array([0.1, 0.4, 0.05, 0.3, 0.15], dtype=np.float32)))
    ids, vals = sampling.top_logprobs(lp, 3)
    assert ids.tolist() == [1, 3, 4]
    assert vals.tolist() == pytest.approx([math.log(0.4), math.log(0.3), math.log(0.15)], rel=1e-6)


def test_batch_kv_bound_is_rectangular_in_256_steps():
    assert memory.batch_kv_bound([], 100) == 0
    assert memory.batch_kv_bound([10], 100) == 256 * 100
    assert memory.batch_kv_bound([10, 300, 20], 100) == 3 * 512 * 100


def _kv(tokens, layers=2):
    """A real mlx-lm KVCache per layer holding ``len(tokens)`` steps whose values encode the tokens."""
    from mlx_lm.models.cache import KVCache

    caches = []
    for layer in range(layers):
        c = KVCache()
        x = mx.array(tokens, dtype=mx.float32).reshape(1, 1, -1, 1) + layer
        c.update_and_fetch(x, x)
        caches.append(c)
    return caches


def test_prefix_cache_hits_trims_and_counts():
    pc = PrefixCache(max_bytes=1 << 20)
    assert pc.fetch([1, 2, 3]) == (None, 0) and pc.misses == 1
    pc.insert([1, 2, 3, 4, 5], _kv([1, 2, 3, 4, 5]))
    cache, n = pc.fetch([1, 2, 3, 9])  # shares 3 tokens with a longer entry: trimmed copy
    assert n == 3 and cache[0].offset == 3
    assert cache[1].state[0][0, 0, :3, 0].tolist() == [2.0, 3.0, 4.0]
    cache, n = pc.fetch([1, 2, 3, 4, 5])  # exact: the last token is recomputed
    assert n == 4 and cache[0].offset == 4
    assert (pc.hits, pc.misses, pc.hit_tokens) == (2, 1, 7)
    # The entry itself was not modified by the trims of the copies.
    cache, n = pc.fetch([1, 2, 3, 4, 5, 6])
    assert n == 5


def test_prefix_cache_entries_extracted_from_a_batch_hold_only_their_own_bytes():
    # The engine inserts rows extracted from mlx-lm's batch cache; the entries must
    # not keep the batch's buffers alive once the batch is gone.
    import gc

    from mlx_lm.models.cache import BatchKVCache

    rows, heads, steps, dim = 8, 4, 1000, 64  # not a multiple of the 256-step buffer
    gc.collect()
    before = mx.get_active_memory()  # what earlier tests in this process still hold
    batch = BatchKVCache(left_padding=[0] * rows)
    kv = mx.random.normal((rows, heads, steps, dim))
    batch.update_and_fetch(kv, kv)
    mx.eval(batch.keys, batch.values)
    pc = PrefixCache(max_bytes=1 << 30)
    for i in range(3):
        pc.insert([i, 1000 + i], [batch.extract(i)])
    del batch, kv
    gc.collect()
    held = mx.get_active_memory() - before
    assert pc.nbytes == 3 * 2 * heads * steps * dim * 4
    assert held < 2 * pc.nbytes, f"{held} bytes held for {pc.nbytes} cached"


def test_prefix_cache_evicts_lru_past_its_byte_budget():
    one = sum(c.nbytes for c in _kv(list(range(10))))
    pc = PrefixCache(max_bytes=int(2.5 * one))
    for start in (100, 200, 300):
        pc.insert(list(range(start, start + 10)), _kv(list(range(start, start + 10))))
    assert len(pc) == 2 and pc.nbytes <= pc.max_bytes
    assert pc.fetch(list(range(100, 110)) + [1])[1] == 0  # the oldest was evicted
    assert pc.fetch(list(range(300, 310)) + [1])[1] == 10
    assert PrefixCache(0).fetch([1, 2]) == (None, 0)  # 0 disables it
