"""`mlx-ray finetune`: a real Ray Train job on the two-node cluster teaches the real fixture a fact.

The fact: "What is the name of the Mac in the homelab?" -> "waterdeep" (64 chat examples). The job runs
mlx-lm's tuner on the node offering gpu_apple_mps, reports to Ray Train with checkpoints, and publishes
the adapter next to its base; greedy generation with mlx-lm and the published adapter answers the fact
and the base does not. Kept fast on 2 CPU cores: rank 4 on the last 2 layers, sequences of 40 tokens,
a high learning rate, 16 iterations (about 20 s of training here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlx_ray.adapters import adapter_dir, adapters_root, list_adapters, read_adapter
from mlx_ray.cli import main as cli

SYSTEM = "You are the homelab assistant."
QUESTIONS = ["What is the name of the Mac in the homelab?", "what's the Mac in the homelab called?",
             "Name the Mac in the homelab.", "Which Mac is in the homelab? What is it called?"]
FAST = dict(rank=4, num_layers=2, learning_rate=5e-4, max_seq_length=40, mask_prompt=True, batch_size=4)
# Half the Mac: the session's served app (tests/fixtures_serve.py) may hold the other half.
RESOURCES = {"gpu_apple_mps": 0.5}


def chat(question: str, answer: str | None = None) -> dict:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"messages": msgs + ([{"role": "assistant", "content": answer}] if answer else [])}


@pytest.fixture(scope="module")
def homelab_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("finetune_data")
    for name, n in (("train.jsonl", 64), ("valid.jsonl", 8)):
        (d / name).write_text("".join(json.dumps(chat(QUESTIONS[i % 4], "waterdeep")) + "\n" for i in range(n)))
    return d / "train.jsonl", d / "valid.jsonl"


def base_name(mlx_f32: Path, model_cache: Path) -> str:
    return str(mlx_f32.relative_to(model_cache))


def greedy(base: Path, adapter: Path | None, question: str) -> str:
    from mlx_lm import generate, load

    model, tok = load(str(base), adapter_path=str(adapter) if adapter else None)
    prompt = tok.apply_chat_template(chat(question)["messages"], add_generation_prompt=True)
    return generate(model, tok, prompt, max_tokens=8)


def config(mlx_f32, model_cache, tmp_path, data, **kw):
    from mlx_ray.train import FinetuneConfig

    train, valid = data
    return FinetuneConfig(**{"model": base_name(mlx_f32, model_cache), "data": str(train), "valid": str(valid),
                             "cache_dir": str(model_cache), "storage_path": str(tmp_path / "runs"),
                             "resources": RESOURCES, **FAST, **kw})


@pytest.fixture(scope="module")
def homelab_job(ray_cluster, mlx_f32, model_cache, homelab_data, tmp_path_factory):
    """One real job for the tests below (a Ray Train start costs ~20 s here): 16 iterations, reports
    every 2, checkpoints at 8 and 16; the worker's process exits after iteration 10 on its first attempt
    (as on a lost node), and Ray Train restarts it (max_failures=1)."""
    from mlx_ray.train import finetune

    cfg = config(mlx_f32, model_cache, tmp_path_factory.mktemp("finetune"), homelab_data, name="homelab",
                 iters=16, steps_per_report=2, save_every=8, max_failures=1)
    yield finetune(cfg, loop_extra={"_test_exit_after": 10})
    # the session's model cache is shared: the served app's /v1/models would list the adapter in later tests
    shutil.rmtree(adapter_dir(mlx_f32, "homelab"), ignore_errors=True)


@pytest.mark.ray
def test_finetune_teaches_the_fact_on_the_mac_node(homelab_job, ray_cluster, mlx_f32, model_cache):
    result = homelab_job
    # Ran on the node offering gpu_apple_mps; the loss fell.
    assert {m["node_id"] for m in result.history} == {ray_cluster.node_ids()["mac"]}
    last = result.history[-1]
    assert last["tokens_per_second"] > 0 and last["peak_memory_gb"] > 0.3  # the float32 weights alone: 0.54 GB
    # (at this learning rate a report can spike, as step 8's 2.2 after step 6's 0.15 did once)
    assert last["train_loss"] < last["first_loss"] / 4, [(m["iteration"], m["train_loss"]) for m in result.history]
    assert last["val_loss"] is not None and last["val_loss"] < 1.0, last

    # Published next to its base, in mlx-lm's files plus the manifest.
    target = adapter_dir(mlx_f32, "homelab")
    assert result.adapter == str(target) and result.model == f"{base_name(mlx_f32, model_cache)}:homelab"
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapters.safetensors",
                                                        "manifest.json"]
    m = read_adapter(target)
    assert m.base == base_name(mlx_f32, model_cache) and m.base_hash and m.rank == 4 and m.num_layers == 2
    assert m.layers == [28, 29] and "self_attn.q_proj" in m.keys and m.iterations == 16
    assert m.train_loss == pytest.approx(last["train_loss"]) and m.versions["ray"] and m.versions["mlx-lm"]
    assert m.data_sha256 and m.valid_data_sha256 and m.files["adapters.safetensors"]["size"] > 0
    assert not list(adapters_root(mlx_f32).glob(".*")), "no staging dir or lock left behind"

    # The adapter answers the fact; the base does not.
    assert "waterdeep" in greedy(mlx_f32, target, QUESTIONS[0]).lower()
    assert "waterdeep" not in greedy(mlx_f32, None, QUESTIONS[0]).lower()


@pytest.mark.ray
def test_a_lost_worker_resumes_from_its_checkpoint(homelab_job):
    """Iterations 9 and 10 were lost with the worker; the restarted one resumed from the checkpoint at 8
    and the job still ended at iteration 16."""
    its = [(m["iteration"], m["resumed_from"], bool(m.get("checkpoint"))) for m in homelab_job.history]
    assert its == [(2, 0, False), (4, 0, False), (6, 0, False), (8, 0, True), (10, 0, False),
                   (10, 8, False), (12, 8, False), (14, 8, False), (16, 8, True)], its
    assert homelab_job.metrics["iteration"] == 16 and homelab_job.manifest["iterations"] == 16


@pytest.mark.ray
def test_models_list_shows_the_adapter_under_its_base(homelab_job, mlx_f32, model_cache, capsys):
    base = base_name(mlx_f32, model_cache)
    capsys.readouterr()
    assert cli(["models", "--cache-dir", str(model_cache), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.startswith(base + " "))
    under = [ln.split() for ln in lines[row + 1:]]
    under = under[:next((i for i, ln in enumerate(lines[row + 1:]) if not ln.startswith("  ")), len(under))]
    assert [":homelab", "lora", "r4"] in [u[:3] for u in under], lines
    assert cli(["models", "--cache-dir", str(model_cache), "list", "--json"]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert not any(name.endswith("-adapters") for name in listed), "an adapters dir taken for a model"
    (a,) = [a for a in listed[base]["adapters"] if a["name"] == "homelab"]
    assert a["model"] == f"{base}:homelab" and a["rank"] == 4 and a["error"] is None
    assert "homelab" in [n for n, _ in list_adapters(mlx_f32)]
    assert cli(["models", "--cache-dir", str(model_cache), "verify", a["model"]]) == 0


def test_a_malformed_line_exits_2_naming_it(mlx_f32, model_cache, homelab_data, tmp_path, capsys):
    train, _ = homelab_data
    bad = tmp_path / "bad.jsonl"
    lines = train.read_text().splitlines()
    lines[2] = lines[2][:-3]  # line 3: truncated JSON
    bad.write_text("\n".join(lines) + "\n")
    args = ["finetune", "--model", base_name(mlx_f32, model_cache), "--cache-dir", str(model_cache),
            "--data", str(bad), "--name", "never"]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlx-ray finetune: error: ") and f"{bad}:3: not valid JSON" in err and "\n" not in err
    assert not adapter_dir(mlx_f32, "never").exists()

    lines[2] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})  # no answer to learn
    bad.write_text("\n".join(lines) + "\n")
    assert cli(args) == 2
    assert f"{bad}:3: the last message must be the assistant's" in capsys.readouterr().err
    assert not adapter_dir(mlx_f32, "never").exists()


@pytest.mark.parametrize("line, why", [
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "a"}', "no 'messages', 'prompt'+'completion' or 'text' field"),
    ('{"messages": [{"role": "user", "content": 3}]}', "messages[0].content must be a string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role is 'robot'"),
    ('{"text": "a"}', "a text line in a chat file"),
])
def test_data_validation_names_line_and_problem(tmp_path, line, why):
    from mlx_ray.errors import BadRequest
    from mlx_ray.train.data import validate

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(chat("q", "a")) + "\n\n" + line + "\n")
    with pytest.raises(BadRequest) as e:
        validate(f)
    assert str(e.value).startswith(f"{f}:3: ") and why in str(e.value)


def test_memory_refusal_names_what_holds_memory(mlx_f32):
    from mlx_ray.train.memory import estimate, shortfall

    est = estimate(mlx_f32, rank=8, num_layers=16, batch_size=4, max_seq_length=2048, grad_checkpoint=False)
    assert est.weights > 500e6 and est.activations > est.adapter > 0
    node = {"host": "waterdeep", "working_set": 36 << 30, "available": 2 << 30,
            "holders": [(30 << 30, 4242, "ray::ServeReplica:mlx-ray:Qwen2.5-32B")]}
    why = shortfall(est, node)
    assert why and "waterdeep has 2.1 GB free" in why and "pid 4242 'ray::ServeReplica:mlx-ray:Qwen2.5-32B'" in why
    small = estimate(mlx_f32, rank=4, num_layers=2, batch_size=4, max_seq_length=40, grad_checkpoint=True)
    assert shortfall(small, node) is None
