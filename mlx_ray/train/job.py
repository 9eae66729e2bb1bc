"""The driver of a fine-tune: check, run the Ray Train job, publish the adapter next to its base.

1. Resolve the base on the cache, refuse an existing adapter name (without ``force``) and a cache this
   process cannot write, and validate the data files line by line: all before Ray is touched.
2. Probe the worker's node (a task with the job's resources): it exists, and the job's estimated memory
   fits what it has free (``memory.py``), or the refusal names the served models holding it. With
   ``sleep_serving`` the mlx-ray replicas on that node sleep for steps 2-3 and wake after, however the
   job ends (``serving.py``).
3. Run :class:`MLXTrainer` with :func:`lora_train_loop`, resuming from its last checkpoint after a lost
   worker (``FailureConfig(max_failures)``); progress comes back through a Ray queue as the job reports.
4. Publish the final checkpoint's adapter under the adapter's lock (and the base's, so the base cannot be
   replaced or removed meanwhile): staged, fsynced, renamed; ``manifest.json`` beside mlx-lm's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlx_ray.adapters import (
    CONFIG,
    MANIFEST,
    WEIGHTS,
    AdapterManifest,
    adapter_dir,
    adapters_root,
    model_hash,
)
from mlx_ray.errors import BadRequest, Conflict, EngineFault

from . import data as data_mod
from .config import FinetuneConfig

PROBE_TIMEOUT_S = 120.0


@dataclass
class FinetuneResult:
    adapter: str  # the adapter's directory
    model: str  # what a request names: "<base cache name>:<adapter name>"
    manifest: dict
    metrics: dict  # the last report
    history: list  # every report, in order

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Prepared:
    base_dir: Path
    base_name: str
    base_hash: str | None
    quantized: bool
    target: Path
    train: data_mod.DataFile
    valid: data_mod.DataFile | None


def _base_name(base_dir: Path, cache_dir) -> str:
    from mlx_ray.conversion.cache import cache_root

    root = cache_root(cache_dir).resolve()
    try:
        return str(base_dir.resolve().relative_to(root))
    except ValueError:
        return str(base_dir.resolve())


def prepare(cfg: FinetuneConfig) -> Prepared:
    """Everything that can fail before training: base, target, writability, data."""
    from mlx_ray.conversion.cache import read_manifest, resolve_model
    from mlx_ray.conversion.publish import writable_error

    base_dir = resolve_model(cfg.model, cfg.cache_dir)
    target = adapter_dir(base_dir, cfg.name)
    if target.exists() and not cfg.force:
        raise Conflict(f"adapter {target} already exists; pass --force to replace it, or pick another --name",
                       param="name")
    train = data_mod.validate(cfg.data, min_rows=cfg.batch_size, mask_prompt=cfg.mask_prompt, param="data")
    valid = (data_mod.validate(cfg.valid, min_rows=cfg.batch_size, mask_prompt=cfg.mask_prompt, param="valid")
             if cfg.valid else None)
    if valid and valid.format != train.format:
        raise BadRequest(f"{cfg.valid} is {valid.format} data but {cfg.data} is {train.format}", param="valid")
    try:  # the adapter is published here at the end: a read-only cache fails now, not after the training
        adapters_root(base_dir).mkdir(exist_ok=True)
    except OSError as e:
        raise writable_error(adapters_root(base_dir), e) from e
    config = json.loads((base_dir / "config.json").read_text())
    return Prepared(base_dir=base_dir, base_name=_base_name(base_dir, cfg.cache_dir),
                    base_hash=model_hash(read_manifest(base_dir)),
                    quantized=bool(config.get("quantization") or config.get("quantization_config")),
                    target=target, train=train, valid=valid)


def loop_config(cfg: FinetuneConfig, prep: Prepared) -> dict:
    """The worker's ``train_loop_config``: the config's fields plus the base's path and the data's hashes."""
    report, save = cfg.steps()
    return {**cfg.model_dump(), "base_path": str(prep.base_dir), "data": prep.train.path,
            "valid": prep.valid.path if prep.valid else None, "data_sha256": prep.train.sha256,
            "valid_sha256": prep.valid.sha256 if prep.valid else None, "lora_parameters": cfg.lora_parameters(),
            "steps_per_report": report, "save_every": save}


def check_node(cfg: FinetuneConfig, prep: Prepared, memory: bool | None = None) -> dict:
    """Probe the node a worker would run on; refuse (one line) when none offers the resources or (with
    ``memory``, default ``cfg.check_memory``) the job does not fit its free memory. Returns the probe's facts."""
    import ray

    from .memory import probe_node

    have = ray.cluster_resources()
    missing = {k: v for k, v in cfg.resources.items() if have.get(k, 0) < v}
    if missing:
        raise BadRequest(f"no node of the Ray cluster offers {json.dumps(missing)} (it has "
                         f"{json.dumps({k: have[k] for k in sorted(have) if not k.startswith('node:')})}); "
                         f"join the Mac with `mlx-ray worker start`, or pass --resources", param="resources")
    probe = ray.remote(probe_node).options(num_cpus=0, resources=cfg.resources)
    ref = probe.remote()
    try:
        node = ray.get(ref, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise Conflict(f"no node had {json.dumps(cfg.resources)} free for {PROBE_TIMEOUT_S:.0f} s (a served "
                       f"model's replica may hold it); free it, or pass --resources") from None
    if cfg.check_memory if memory is None else memory:
        check_memory(cfg, prep, node)
    return node


def check_memory(cfg: FinetuneConfig, prep: Prepared, node: dict) -> None:
    """Refuse (BadRequest, one line) when the job's estimate does not fit what ``node`` has free, naming the
    served mlx-ray replicas there (``serving.replicas_on``) or else the biggest processes."""
    from .memory import estimate, shortfall
    from .serving import replicas_on

    est = estimate(prep.base_dir, rank=cfg.rank, num_layers=cfg.num_layers, batch_size=cfg.batch_size,
                   max_seq_length=cfg.max_seq_length, grad_checkpoint=cfg.grad_checkpoint,
                   dora=cfg.fine_tune_type == "dora")
    why = shortfall(est, node)
    if why:
        raise BadRequest(shortfall(est, node, replicas_on(node["node_id"])), param="memory")
    node["estimate"] = est.as_dict()


def _run_config(cfg: FinetuneConfig, run_name: str):
    import ray.train

    from mlx_ray.blas import runtime_env_vars

    kw = dict(name=run_name, storage_path=cfg.storage_path,
              failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
              checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    env = runtime_env_vars()
    if env and "worker_runtime_env" in {f.name for f in dataclasses.fields(ray.train.RunConfig)}:
        kw["worker_runtime_env"] = {"env_vars": env}
    return ray.train.RunConfig(**kw)


def train(cfg: FinetuneConfig, prep: Prepared, progress: Callable[[dict], None] | None = None,
          loop_extra: dict | None = None):
    """Run the Ray Train job; returns (result, reports). Ray must be initialised."""
    import ray.train
    from ray.util.queue import Empty, Queue

    from .loop import lora_train_loop
    from .trainer import MLXTrainer

    queue = Queue(maxsize=10000, actor_options={"num_cpus": 0})
    config = {**loop_config(cfg, prep), "progress_queue": queue, **(loop_extra or {})}
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    trainer = MLXTrainer(
        lora_train_loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=False,
                                               resources_per_worker={"CPU": cfg.num_cpus, **cfg.resources}),
        run_config=_run_config(cfg, f"mlx-ray-finetune-{cfg.name}-{stamp}"))
    out: dict = {}

    def fit():
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = e

    thread = threading.Thread(target=fit, name="mlx-ray-finetune-fit", daemon=True)
    thread.start()
    reports: list[dict] = []

    def drain(block: bool):
        while True:
            try:
                m = queue.get(block=block, timeout=0.5) if block else queue.get_nowait()
            except Empty:
                return
            reports.append(m)
            if progress:
                progress(m)
            block = False

    while thread.is_alive():
        drain(block=True)
    drain(block=False)
    with contextlib.suppress(Exception):
        ray.kill(queue.actor)
    if "error" in out:
        e = out["error"]
        raise EngineFault(f"the training job failed: {type(e).__name__}: {_first_line(e)}") from e
    return out["result"], reports


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray's errors carry a traceback; the cause's last line says what went wrong.
    return (lines[-1] if lines else type(e).__name__)[:500]


def publish_adapter(cfg: FinetuneConfig, prep: Prepared, checkpoint_dir: Path, metrics: dict) -> AdapterManifest:
    """Copy the final checkpoint's adapter into the cache, atomically, under the adapter's and the base's
    locks; the base must still be the one trained on."""
    from mlx_ray.conversion.manifest import file_entries, read_manifest, versions
    from mlx_ray.conversion.publish import (
        TargetLock,
        publish,
        remove_leftovers,
        staging_dir,
        writable_error,
    )

    state = json.loads((checkpoint_dir / "train_state.json").read_text())
    if int(state.get("iteration", 0)) != cfg.iters:
        raise EngineFault(f"the job's last checkpoint is at iteration {state.get('iteration')} of {cfg.iters}; "
                          f"nothing was published")
    target = prep.target
    with TargetLock(prep.base_dir, wait=300), TargetLock(target, wait=60) as lock:
        if model_hash(read_manifest(prep.base_dir)) != prep.base_hash:
            raise Conflict(f"the base {prep.base_dir} was re-converted while training; nothing was published: "
                           f"train again")
        if target.exists() and not cfg.force:
            raise Conflict(f"adapter {target} appeared while training; pass --force to replace it")
        remove_leftovers(target)
        stage = staging_dir(target)
        try:
            stage.mkdir()
            for f in (WEIGHTS, CONFIG):
                shutil.copyfile(checkpoint_dir / f, stage / f)
            import ray

            from mlx_ray.adapters import keys_adapted

            layers, keys = keys_adapted(stage / WEIGHTS)
            manifest = AdapterManifest(
                name=cfg.name, base=prep.base_name, base_hash=prep.base_hash, fine_tune_type=cfg.fine_tune_type,
                rank=cfg.rank, scale=cfg.scale, dropout=cfg.dropout, keys=keys, layers=layers,
                num_layers=cfg.num_layers, base_quantized=prep.quantized, data_sha256=prep.train.sha256,
                valid_data_sha256=prep.valid.sha256 if prep.valid else None,
                train_loss=state.get("train_loss"), val_loss=state.get("val_loss"), iterations=cfg.iters,
                tokens=state.get("trained_tokens"),
                versions={**versions(), "ray": ray.__version__},
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                files=file_entries(stage, [WEIGHTS, CONFIG]),
                training={k: getattr(cfg, k) for k in ("batch_size", "learning_rate", "max_seq_length",
                                                       "mask_prompt", "grad_checkpoint", "seed")},
            )
            (stage / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
            publish(stage, target, replace=cfg.force, lock=lock)
        except OSError as e:
            raise writable_error(target, e) from e
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return manifest


def connect(address: str | None, resources: dict) -> None:
    import ray

    if ray.is_initialized():
        return
    from mlx_ray.serve.cli import connect_ray_plain

    connect_ray_plain(address, None if address else resources)


def finetune(cfg: FinetuneConfig, *, address: str | None = None,
             progress: Callable[[dict], None] | None = None, loop_extra: dict | None = None,
             say: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` as a Ray Train job and publish the adapter; Ray is joined at
    ``address`` (or an embedded one is started declaring ``cfg.resources``) unless already initialised.
    With ``cfg.sleep_serving`` the mlx-ray replicas on the job's node sleep while it runs (``say``: where
    that is reported, default stderr)."""
    from .serving import asleep

    prep = prepare(cfg)
    connect(address, cfg.resources)
    node = check_node(cfg, prep, memory=cfg.check_memory and not cfg.sleep_serving)
    with asleep(node["node_id"], say=say or _stderr) if cfg.sleep_serving else contextlib.nullcontext():
        if cfg.sleep_serving and cfg.check_memory:
            check_memory(cfg, prep, check_node(cfg, prep, memory=False))  # what is free with them asleep
        result, reports = train(cfg, prep, progress, loop_extra)
    if result.checkpoint is None:
        raise EngineFault("the training job reported no checkpoint; nothing was published")
    with result.checkpoint.as_directory() as d:
        manifest = publish_adapter(cfg, prep, Path(d), result.metrics or {})
    _remove_run(result)
    return FinetuneResult(adapter=str(prep.target), model=f"{prep.base_name}:{cfg.name}",
                          manifest=manifest.model_dump(), metrics=dict(result.metrics or {}), history=reports)


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def _remove_run(result) -> None:
    """The run's checkpoints are in the published adapter now: remove them when they are on a local path."""
    path = getattr(result, "path", None)
    fs = getattr(result, "filesystem", None)
    if path and (fs is None or getattr(fs, "type_name", "local") == "local") and Path(path).is_dir():
        shutil.rmtree(path, ignore_errors=True)

