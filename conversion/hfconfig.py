"""config.json handling: architecture lookup and the RoPE normalization.

transformers 5 writes RoPE settings as a nested ``rope_parameters`` object and
no top-level ``rope_theta``. mlx-lm 0.32 reads only the top-level keys for most
architectures and silently falls back to theta 10000 (logits off by up to 10 on
SmolLM2, see FACTS.md). :func:`normalize_config` copies the nested values to the
top level, where every mlx-lm architecture looks for them, and keeps the nested
object for the few architectures that read it.
"""

from __future__ import annotations

import copy
import pkgutil

from mlx_ray.errors import BadRequest

# transformers 5 may also nest these in rope_parameters.
_LIFTED = ("partial_rotary_factor",)


def _lift_rope(cfg: dict) -> None:
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict) or not rp:
        return
    if all(isinstance(v, dict) for v in rp.values()):
        # Per layer type (Gemma 3 style): {"full_attention": {...}, "sliding_attention": {...}}.
        full = rp.get("full_attention") or rp.get("default") or next(iter(rp.values()))
        sliding = rp.get("sliding_attention")
        if sliding and "rope_theta" in sliding:
            cfg.setdefault("rope_local_base_freq", sliding["rope_theta"])
        rp = full
    if "rope_theta" in rp:
        cfg.setdefault("rope_theta", rp["rope_theta"])
    for key in _LIFTED:
        if key in rp:
            cfg.setdefault(key, rp[key])
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in (None, "default") and not cfg.get("rope_scaling"):
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        scaling.setdefault("type", rope_type)
        scaling.setdefault("rope_type", rope_type)
        cfg["rope_scaling"] = scaling


def normalize_config(config: dict) -> dict:
    """A copy of ``config`` that mlx-lm reads the same way transformers does."""
    cfg = copy.deepcopy(config)
    _lift_rope(cfg)
    if isinstance(cfg.get("text_config"), dict):
        _lift_rope(cfg["text_config"])
    # transformers 5 renamed torch_dtype to dtype; mlx-lm's convert reads torch_dtype.
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    return cfg


def supported_architectures() -> list[str]:
    """model_type values mlx-lm can load (its model modules plus its remapping table)."""
    import mlx_lm.models as models
    from mlx_lm import utils

    names = {m.name for m in pkgutil.iter_modules(models.__path__)
             if not m.name.startswith("_") and m.name not in ("base", "cache", "rope_utils", "switch_layers",
                                                               "activations", "bitlinear_layers", "pipeline")}
    names |= set(getattr(utils, "MODEL_REMAPPING", {}))
    return sorted(names)


def model_classes(config: dict):
    """(Model, ModelArgs) from mlx-lm, or BadRequest naming the architecture and the supported ones."""
    # mlx-lm's own lookup (model_type -> module, with its remapping table); private
    # but it is exactly what mlx_lm.load will do with the output.
    from mlx_lm.utils import _get_classes

    model_type = config.get("model_type")
    arch = (config.get("architectures") or ["?"])[0]
    if not model_type:
        raise BadRequest(f"config.json has no model_type (architecture {arch}); not a transformers LM checkpoint")
    try:
        return _get_classes(config)
    except (ValueError, ImportError) as e:
        sup = supported_architectures()
        common = [s for s in ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3") if s in sup]
        raise BadRequest(f"unsupported architecture {arch} (model_type {model_type!r}): mlx-lm "
                         f"supports {len(sup)} model types, e.g. {', '.join(common)}; "
                         f"full list: {', '.join(sup)}") from e


def build_model(config: dict):
    """Instantiate the mlx-lm model skeleton without materializing any weight.

    MLX is lazy: the random initial parameters are never evaluated, so this
    costs no memory even for a 32B model. We use it for ``sanitize``, module
    lookup and quantization predicates only.
    """
    model_cls, args_cls = model_classes(config)
    try:
        return model_cls(args_cls.from_dict(config))
    except Exception as e:  # noqa: BLE001 - mlx-lm raises anything from bad configs
        raise BadRequest(f"config.json does not fit mlx-lm's {config.get('model_type')} model: {e}") from e

