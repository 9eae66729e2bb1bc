"""``MLXTrainer``: Ray Train's ``DataParallelTrainer`` with an MLX backend, as ``JaxTrainer`` is built.

    from ray.train import RunConfig, ScalingConfig, FailureConfig
    from mlx_ray.train import MLXTrainer, lora_train_loop

    trainer = MLXTrainer(lora_train_loop, train_loop_config=cfg,
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"gpu_apple_mps": 1}),
                         run_config=RunConfig(failure_config=FailureConfig(max_failures=3)))
    result = trainer.fit()

The backend sets MLX up on each worker before the training function runs: it imports MLX (the OpenBLAS
preload for MLX's CPU backend on Linux comes with the workers' ``runtime_env``), picks the GPU when Metal is
there, and reports the device back, so a worker without a working MLX fails at start, not in the loop.
One worker: MLX's own data parallelism across Macs (``mx.distributed``) is not wired up here yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer


def _setup_mlx_worker(use_gpu: bool | None) -> dict:
    import mlx.core as mx

    metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    if use_gpu is None:
        use_gpu = metal
    if use_gpu and not metal:
        raise RuntimeError("MLXConfig(use_gpu=True) but this worker has no Metal device; leave use_gpu unset "
                           "to use the CPU backend there")
    mx.set_default_device(mx.gpu if use_gpu else mx.cpu)
    import socket

    return {"host": socket.gethostname(), "device": "gpu" if use_gpu else "cpu", "mlx": mx.__version__}


@dataclass
class MLXConfig(BackendConfig):
    """MLX on each worker. ``use_gpu``: None picks Metal where it exists, else MLX's CPU backend."""

    use_gpu: bool | None = None

    @property
    def backend_cls(self):
        return _MLXBackend

    def to_dict(self) -> dict[str, Any]:
        return {"use_gpu": self.use_gpu}


class _MLXBackend(Backend):
    def on_start(self, worker_group, backend_config: MLXConfig):
        if len(worker_group) > 1:
            raise ValueError(f"MLXTrainer runs one worker (asked for {len(worker_group)}): MLX data "
                             f"parallelism across workers (mx.distributed) is not set up by this backend yet")
        worker_group.execute(_setup_mlx_worker, backend_config.use_gpu)


class MLXTrainer(DataParallelTrainer):
    """A Trainer for MLX training functions (mlx-lm's tuner, in :func:`mlx_ray.train.lora_train_loop`).

    Arguments as ``JaxTrainer``'s: ``train_loop_per_worker(train_loop_config)`` runs on each worker, and
    calls ``ray.train.report`` / ``ray.train.get_checkpoint``; ``mlx_config`` replaces ``jax_config``."""

    def __init__(self, train_loop_per_worker: Callable, *, train_loop_config: dict | None = None,
                 mlx_config: MLXConfig | None = None, scaling_config=None, run_config=None,
                 dataset_config=None, datasets=None):
        super().__init__(train_loop_per_worker=train_loop_per_worker, train_loop_config=train_loop_config,
                         backend_config=mlx_config or MLXConfig(), scaling_config=scaling_config,
                         run_config=run_config, dataset_config=dataset_config, datasets=datasets)
