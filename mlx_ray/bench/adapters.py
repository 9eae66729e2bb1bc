"""Random LoRA adapters of a cached model, for the multi-LoRA tests and benchmark.

Written by mlx-lm's own code (``linear_to_lora_layers``) and saved as ``mlx_lm.lora`` saves them
(``adapters.safetensors`` of the trainable parameters, ``adapter_config.json``), with mlx-ray's
manifest, where the engine finds them (``mlx_ray/adapters.py``). ``lora_b`` is drawn small but
non-zero (a trained adapter's, not a fresh one's), so an adapter changes the model's answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mlx_ray import adapters as layout


def write_random_adapter(base_dir: str | Path, name: str, rank: int = 8, scale: float = 20.0, num_layers: int = 16,
                         keys: Optional[list[str]] = None, seed: int = 0, b_std: float = 0.05, **manifest) -> Path:
    """Adapter ``name`` of the model in ``base_dir`` (a cache directory); ``manifest`` overrides its fields."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from mlx_ray.conversion.source import sha256_file

    base_dir = Path(base_dir)
    model, _ = load_model(base_dir, lazy=True)  # shapes only: no weight is read
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0, **({"keys": keys} if keys else {})}
    mx.random.seed(seed)
    linear_to_lora_layers(model, num_layers, params)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = b_std * mx.random.normal(m.lora_b.shape)
    d = layout.adapter_dir(base_dir, name)
    d.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(d / layout.WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
    (d / layout.CONFIG).write_text(json.dumps({"fine_tune_type": "lora", "num_layers": num_layers,
                                               "lora_parameters": params}))
    base = json.loads((base_dir / "manifest.json").read_text())
    weights = d / layout.WEIGHTS
    fields = dict(name=name, base=base["name"], base_hash=layout.model_hash(base), fine_tune_type="lora", rank=rank,
                  scale=scale, keys=keys, num_layers=num_layers, data_sha256="0" * 64, iterations=0,
                  files={layout.WEIGHTS: {"size": weights.stat().st_size, "sha256": sha256_file(weights)}})
    fields.update(manifest)
    (d / layout.MANIFEST).write_text(json.dumps(layout.AdapterManifest(**fields).model_dump()))
    return d
