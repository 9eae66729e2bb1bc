"""The training function each Ray Train worker runs: mlx-lm's tuner, with checkpoints and reports to Ray Train.

The loop is mlx-lm's own (``mlx_lm.tuner.train``); this module sets it up as ``mlx_lm.lora`` does (load,
freeze, ``linear_to_lora_layers``, Adam, the datasets) and plugs a :class:`RayReportCallback` into it. The
callback reports loss, validation loss, tokens/s and peak memory with ``ray.train.report`` and, every
``save_every`` iterations and at the end, a checkpoint: the adapter weights, the optimizer state (Adam's
moments and its step) and the iteration. A restarted worker finds it with ``ray.train.get_checkpoint()``
and trains the remaining iterations only, so a job whose worker was lost ends at the same iteration count.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import types
from pathlib import Path

from mlx_ray.adapters import CONFIG, WEIGHTS

OPTIMIZER = "optimizer.safetensors"
STATE = "train_state.json"
# Test hook: exit the worker's process (as a lost node would) after this iteration, on a first attempt only.
CRASH_ENV = "MLX_RAY_TEST_FINETUNE_EXIT_AFTER"


def adapter_config(cfg: dict) -> dict:
    """``adapter_config.json`` as ``mlx_lm.lora`` writes it (its argument namespace), so mlx-lm loads it."""
    import mlx_lm.lora

    out = dict(mlx_lm.lora.CONFIG_DEFAULTS)
    out.update({k: cfg[k] for k in out if k in cfg})
    out.update(model=cfg["base_path"], data=cfg["data"], train=True, adapter_path=".",
               lora_parameters=cfg["lora_parameters"], val_batches=cfg["val_batches"])
    return out


def save_checkpoint(directory: Path, model, optimizer, cfg: dict, state: dict) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.lora import save_config

    mx.save_safetensors(str(directory / WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
    mx.save_safetensors(str(directory / OPTIMIZER), dict(tree_flatten(optimizer.state)))
    save_config(adapter_config(cfg), directory / CONFIG)
    (directory / STATE).write_text(json.dumps(state, indent=2) + "\n")


def restore_checkpoint(directory: Path, model, optimizer) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model.load_weights(str(directory / WEIGHTS), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(directory / OPTIMIZER)).items()))
    optimizer.init(model.trainable_parameters())  # fills nothing that was saved; marks it initialized
    return json.loads((directory / STATE).read_text())


class RayReportCallback:
    """mlx-lm's ``TrainingCallback``: each loss report goes to ``ray.train.report``, with a checkpoint
    every ``save_every`` iterations and at the last one; progress also goes to the driver's queue."""

    def __init__(self, model, optimizer, cfg: dict, start: int, state: dict):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.start = start
        self.state = dict(state)  # iteration, trained_tokens, train_loss, val_loss, first_loss
        self.resumed = bool(start)
        self.queue = cfg.get("progress_queue")
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()

    def on_val_loss_report(self, info: dict) -> None:
        self.state["val_loss"] = float(info["val_loss"])

    def on_train_loss_report(self, info: dict) -> None:
        import ray.train

        it = self.start + int(info["iteration"])
        loss = float(info["train_loss"])
        self.state.update(iteration=it, train_loss=loss)
        self.state.setdefault("first_loss", loss)
        self.state["trained_tokens"] = self.state.get("tokens_before", 0) + int(info["trained_tokens"])
        metrics = {
            "iteration": it, "iters": self.cfg["iters"], "train_loss": loss, "val_loss": self.state.get("val_loss"),
            "first_loss": self.state["first_loss"], "learning_rate": float(info["learning_rate"]),
            "tokens_per_second": float(info["tokens_per_second"]), "trained_tokens": self.state["trained_tokens"],
            "peak_memory_gb": float(info["peak_memory"]), "resumed_from": self.cfg.get("_resumed_from", 0),
            "node_id": self.node_id, "reported_at": time.time(),
        }
        if it % self.cfg["save_every"] == 0 or it == self.cfg["iters"]:
            with tempfile.TemporaryDirectory(prefix="mlx-ray-ckpt-") as tmp:
                save_checkpoint(Path(tmp), self.model, self.optimizer, self.cfg,
                                {k: v for k, v in self.state.items() if k != "tokens_before"})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            metrics["checkpoint"] = True
        else:
            ray.train.report(metrics)
        if self.queue is not None:
            try:
                self.queue.put_nowait(metrics)
            except Exception:  # noqa: BLE001 - progress lines are best effort; the job is not
                pass
        crash = self.cfg.get("_test_exit_after") or int(os.environ.get(CRASH_ENV, "0") or 0)
        if crash and it >= crash and not self.resumed:
            # Ray Train's controller collects reports when it polls the workers (every 2 s): a report the
            # process dies with is lost, so the hook waits out one poll and the job resumes where it says.
            time.sleep(3.0)
            os._exit(17)


def _datasets(cfg: dict, tokenizer):
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    from mlx_ray.conversion.source import sha256_file

    from .data import load_rows

    opts = types.SimpleNamespace(mask_prompt=cfg["mask_prompt"])
    out = []
    for key in ("data", "valid"):
        path = cfg.get(key)
        if not path:
            out.append(None)
            continue
        if cfg.get(f"{key}_sha256") and sha256_file(Path(path)) != cfg[f"{key}_sha256"]:
            raise RuntimeError(f"{path} changed after it was validated; start the job again")
        out.append(CacheDataset(create_dataset(load_rows(path), tokenizer, opts)))
    return out


def lora_train_loop(cfg: dict) -> None:
    """``train_loop_per_worker`` of :class:`~mlx_ray.train.MLXTrainer` for a LoRA/DoRA (QLoRA) fine-tune.

    ``cfg``: :meth:`FinetuneConfig` fields plus ``base_path`` and the data's sha256 (see ``job.loop_config``)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    import ray.train
    from mlx_lm.tuner import TrainingArgs, linear_to_lora_layers, train
    from mlx_lm.utils import load

    from mlx_ray.blas import set_threads

    # Ray sets OMP_NUM_THREADS to the worker's num_cpus (1 by default), and OpenBLAS sizes its pool from it:
    # training would run its matmuls on one core where `mlx_lm.lora` uses them all (mlx_ray/blas.py).
    set_threads()
    model, tokenizer = load(cfg["base_path"])
    model.freeze()
    linear_to_lora_layers(model, cfg["num_layers"], cfg["lora_parameters"], use_dora=cfg["fine_tune_type"] == "dora")
    optimizer = optim.Adam(learning_rate=cfg["learning_rate"])
    start, state = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = restore_checkpoint(Path(d), model, optimizer)
        start = int(state["iteration"])
        state["tokens_before"] = int(state.get("trained_tokens", 0))
        print(f"[mlx-ray] resuming at iteration {start} of {cfg['iters']} from {checkpoint.path}", flush=True)
    cfg = {**cfg, "_resumed_from": start}
    train_set, valid_set = _datasets(cfg, tokenizer)
    # Reproducible, and a resumed job does not replay the batch order of the start.
    mx.random.seed(cfg["seed"] + start)
    np.random.seed(cfg["seed"] + start)
    callback = RayReportCallback(model, optimizer, cfg, start, state)
    remaining = cfg["iters"] - start
    if remaining <= 0:  # the last checkpoint was the end: report it again so the result carries it
        callback.on_train_loss_report({"iteration": 0, "train_loss": state.get("train_loss", float("nan")),
                                       "learning_rate": cfg["learning_rate"], "tokens_per_second": 0.0,
                                       "trained_tokens": 0, "peak_memory": 0.0})
        return
    with tempfile.TemporaryDirectory(prefix="mlx-ray-train-") as tmp:
        args = TrainingArgs(
            batch_size=cfg["batch_size"], iters=remaining, val_batches=cfg["val_batches"],
            steps_per_report=cfg["steps_per_report"], steps_per_eval=cfg["steps_per_eval"],
            steps_per_save=remaining + 1,  # our checkpoints are the callback's; mlx-lm's own go nowhere
            max_seq_length=cfg["max_seq_length"], adapter_file=str(Path(tmp) / WEIGHTS),
            grad_checkpoint=cfg["grad_checkpoint"], grad_accumulation_steps=cfg["grad_accumulation_steps"])
        train(model=model, optimizer=optimizer, train_dataset=train_set, val_dataset=valid_set, args=args,
              training_callback=callback)
