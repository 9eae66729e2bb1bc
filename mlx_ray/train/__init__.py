"""Fine-tuning on the Mac as a Ray Train job: mlx-lm's tuner inside an ``MLXTrainer``.

``mlx-ray finetune`` (``cli.py``) and :func:`finetune` check the data and the memory, run the job
(``job.py``) and publish the adapter next to its base on the model cache (``mlx_ray/adapters.py``).
:class:`MLXTrainer` with :func:`lora_train_loop` is the same job for a caller who builds the Ray Train
configs themselves. Imported lazily: ``import mlx_ray.train`` loads neither Ray Train nor MLX.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FinetuneConfig": "config", "finetune": "job", "FinetuneResult": "job", "publish_adapter": "job",
    "MLXTrainer": "trainer", "MLXConfig": "trainer", "lora_train_loop": "loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
