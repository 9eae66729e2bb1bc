"""Multi-LoRA serving on the real float32 fixture: adapters written by mlx-lm's own code, served in one batch.

The adapters are random LoRAs of the fixture (``mlx_lm.tuner.utils.linear_to_lora_layers``, ``lora_b``
drawn small so they change the answers), saved as ``mlx_lm.lora`` saves them, with mlx-ray's manifest, on
the session's model cache beside the base (mlx_ray/adapters.py). The engine runs them for 1-3, the
OpenAI app (no Serve) for 4-5.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from fixtures_engine import collect, make_request, run_async, start_engine

from mlx_ray import adapters as layout
from mlx_ray.bench.adapters import write_random_adapter

PROMPTS = ["What is the capital of France?", "Name a yellow fruit.", "Write a haiku about the sea."]
MAX_TOKENS = 10
ADAPTERS = {
    "ada": dict(rank=8, scale=20.0, num_layers=16, seed=1),
    "bob": dict(rank=4, scale=40.0, num_layers=12, keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],
                seed=2),
}


@pytest.fixture(scope="module")
def adapters(mlx_f32) -> dict[str, Path]:
    """ada, bob: good; other: trained for another base; broken: its weights file damaged."""
    base = Path(mlx_f32)
    out = {n: write_random_adapter(base, n, **spec) for n, spec in ADAPTERS.items()}
    out["other"] = write_random_adapter(base, "other", **ADAPTERS["ada"], base="SomeOrg--OtherModel/f32",
                                        base_hash="f" * 64)
    broken = layout.adapter_dir(base, "broken")
    shutil.copytree(out["ada"], broken, dirs_exist_ok=True)
    w = broken / layout.WEIGHTS
    w.write_bytes(w.read_bytes()[:-1000])  # truncated
    man = json.loads((broken / layout.MANIFEST).read_text())
    (broken / layout.MANIFEST).write_text(json.dumps({**man, "name": "broken", "files": {}}))
    out["broken"] = broken
    yield out
    shutil.rmtree(layout.adapters_root(base), ignore_errors=True)


@pytest.fixture(scope="module")
def lora_engine(mlx_f32, adapters):
    engine = start_engine(mlx_f32, max_num_seqs=8, max_queue=16, kv_budget_bytes=128 << 20,
                          prefix_cache_bytes=16 << 20, max_model_len=1024, warmup=False)
    yield engine
    run_async(engine.shutdown())


def chat(engine, q):
    return engine.encode_chat([{"role": "user", "content": q}])


def generate(engine, rid, ids, adapter=None, **kw):
    req = make_request(rid, ids, max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)
    req.adapter = adapter
    return run_async(collect(engine, req))


def test_greedy_with_adapter_equals_mlx_lm_with_the_same_adapter(lora_engine, adapters, mlx_f32):
    from mlx_lm import stream_generate
    from mlx_lm.utils import load

    ids = chat(lora_engine, PROMPTS[0])
    base = generate(lora_engine, "base", ids)[0]
    for name in ("ada", "bob"):
        model, tokenizer = load(str(mlx_f32), adapter_path=str(adapters[name]))
        want = [r.token for r in stream_generate(model, tokenizer, prompt=ids, max_tokens=MAX_TOKENS)]
        got, _, _, _, fin = generate(lora_engine, f"one-{name}", ids, adapter=name)
        assert fin.error is None
        assert got == want, name
        assert got != base, name  # the adapter changes the answer
    assert lora_engine.stats()["lora_loaded"] == ["ada", "bob"]


# rows: (prompt index, adapter); the first one (long, ignore_eos) paces the others' joins
ROWS = [(2, "ada"), (0, None), (1, "bob"), (0, "ada"), (1, None), (2, "bob")]


def row_request(engine, k, rid):
    p, adapter = ROWS[k]
    req = make_request(rid, chat(engine, PROMPTS[p]), max_tokens=16 if k == 0 else MAX_TOKENS, ignore_eos=k == 0)
    req.adapter = adapter
    return req


@pytest.fixture(scope="module")
def alone(lora_engine) -> list[list[int]]:
    """Each row's tokens when it runs alone."""
    out = []
    for k in range(len(ROWS)):
        got, _, _, _, fin = run_async(collect(lora_engine, row_request(lora_engine, k, f"alone-{k}")))
        assert fin.error is None
        out.append(got)
    return out


def test_mixed_batch_of_two_adapters_and_the_base_joining_at_different_times(lora_engine, alone):
    from mlx_ray.engine.protocol import TokenEvent

    async def main():
        progress = [asyncio.Event() for _ in ROWS]
        joined = {}

        async def first():
            out = []
            async for ev in lora_engine.generate(row_request(lora_engine, 0, "mix-0")):
                if isinstance(ev, TokenEvent):
                    out += ev.token_ids
                    for k in range(1, min(len(out), len(ROWS) - 1) + 1):
                        progress[k].set()
                else:
                    return out, ev

        async def later(k):
            await progress[k].wait()
            joined[k] = lora_engine.stats()["steps"]
            got, _, _, _, fin = await collect(lora_engine, row_request(lora_engine, k, f"mix-{k}"))
            return got, fin

        return await asyncio.gather(first(), *(later(k) for k in range(1, len(ROWS)))), joined

    results, joined = run_async(main())
    assert len(set(joined.values())) > 1  # they joined at different steps
    for k, (got, fin) in enumerate(results):
        assert fin.error is None, (k, fin.error)
        assert got == alone[k], f"row {k} {ROWS[k]} differs from itself alone"
    assert len({tuple(a) for a in alone}) == len(ROWS)  # every row its own answer


def test_max_loras_1_evicts_under_load_and_never_fails(mlx_f32, adapters, alone):
    engine = start_engine(mlx_f32, max_num_seqs=4, max_queue=16, kv_budget_bytes=64 << 20, prefix_cache_bytes=0,
                          max_model_len=1024, warmup=False, max_loras=1)
    try:
        async def main():
            return await asyncio.gather(*(collect(engine, row_request(engine, k, f"l1-{k}-{i}"))
                                          for i in range(2) for k in range(len(ROWS))))

        results = run_async(main())
        for j, (got, _, _, _, fin) in enumerate(results):
            k = j % len(ROWS)
            assert fin.error is None, (ROWS[k], fin.error)
            assert got == alone[k], ROWS[k]
        stats = engine.stats()
        assert stats["lora_evictions_total"] >= 1 and stats["lora_slots"] == 1
    finally:
        run_async(engine.shutdown())


# ------------------------------------------------------------------ over HTTP (the app, no Serve)
@pytest.fixture(scope="module")
def client(lora_engine):
    from fastapi.testclient import TestClient

    from mlx_ray.serve.config import ServeConfig
    from mlx_ray.serve.ingress import OpenAIIngress, create_app
    from mlx_ray.serve.local import LocalHandle
    from mlx_ray.serve.server import LLMServer

    cfg = ServeConfig.from_args({"models": [{"model": str(lora_engine.model_id), "name": "smol",
                                             "lora_modules": {"poet": "ada"}}]})
    server = LLMServer(cfg.models[0], engine=lora_engine)
    with TestClient(create_app(OpenAIIngress({"smol": LocalHandle(server)}, cfg))) as c:
        yield c


def complete(client, model, prompt="The capital of France is", max_tokens=6):
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                "temperature": 0})


def test_adapter_errors_unknown_404_other_base_400_corrupt_fails_alone(client):
    import concurrent.futures

    r = complete(client, "smol:nope")
    assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]
    r = complete(client, "nope:ada")
    assert r.status_code == 404  # no such base
    r = complete(client, "smol:other")
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "SomeOrg--OtherModel/f32" in msg and "SmolLM2-135M-Instruct/f32" in msg, msg
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        broken = pool.submit(complete, client, "smol:broken")
        base = pool.submit(complete, client, "smol", max_tokens=12)
        broken, base = broken.result(), base.result()
    assert broken.status_code == 500, broken.text
    assert "broken" in broken.json()["error"]["message"] or "adapters.safetensors" in broken.json()["error"]["message"]
    assert base.status_code == 200 and base.json()["choices"][0]["text"]
    # the alias is the adapter, the response names the model as asked
    by_alias, by_name, plain = (complete(client, m).json() for m in ("poet", "smol:ada", "smol"))
    assert by_alias["choices"][0]["text"] == by_name["choices"][0]["text"] != plain["choices"][0]["text"]
    assert by_alias["model"] == "poet" and by_name["model"] == "smol:ada"


def test_models_lists_adapters_with_their_parent(client):
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["smol"].get("parent") is None
    for name in ("smol:ada", "smol:bob", "poet"):
        assert cards[name]["parent"] == "smol", cards[name]
    assert "smol:broken" not in cards  # unreadable: not offered
