"""config.json handling: architecture lookup and normalization for mlx-lm.

transformers 5 writes some settings where mlx-lm 0.32 does not look, and mlx-lm
then falls back to a default without a word (FACTS.md). :func:`normalize_config`
returns a copy that mlx-lm reads the way transformers does, in three steps:

1. **RoPE:** the nested ``rope_parameters`` object is lifted to the top-level
   keys every mlx-lm architecture reads (``rope_theta``, ``rope_scaling``, ...),
   and kept for the few that read it (theta 10000 otherwise: logits off by up
   to 10 on SmolLM2).
2. **Renamed fields:** each transformers config class has an ``attribute_map``
   ``{alias: canonical}`` (qwen3_moe: ``num_experts`` -> ``num_local_experts``).
   For every field of mlx-lm's ``ModelArgs`` that config.json lacks, the value
   is taken from the name it is an alias of, or from an alias of it. No rename
   is listed here: transformers' own classes are the table. ``head_dim``, when
   mlx-lm needs it and transformers left it implicit, is ``hidden_size //
   num_attention_heads``, as transformers' modeling code computes it.
3. **Layer types:** transformers describes mixed layouts as a ``layer_types``
   list; some mlx-lm models take an integer period instead, every P-th layer
   full attention: ``sliding_window_pattern`` (gemma3, default 6; the others
   sliding) and ``full_attention_interval`` (qwen3_next, default 4; the others
   linear). P is derived from ``layer_types`` when that list has such a
   period, and refused otherwise.

Existing top-level values always win. Without transformers installed (an
optional dependency, in the parity and dev extras) step 2 is skipped: only
names config.json itself spells the mlx-lm way are read.
"""

from __future__ import annotations

import copy
import dataclasses
import pkgutil

from mlx_ray.errors import BadRequest

# transformers 5 may also nest these in rope_parameters.
_LIFTED = ("partial_rotary_factor",)
# mlx-lm fields "every P-th layer is full attention, the others X", which transformers
# writes as a layer_types list instead (gemma3, cohere2: sliding; qwen3_next: linear).
_PERIODS = {"sliding_window_pattern": "sliding_attention", "full_attention_interval": "linear_attention"}


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


def _aliases(model_type: str) -> dict[str, str]:
    """transformers' ``attribute_map`` {alias: canonical} for ``model_type``; {} when unknown."""
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:  # transformers is optional: fall back to the names as written
        return {}
    try:
        return dict(CONFIG_MAPPING[model_type].attribute_map or {})
    except (KeyError, ValueError, AttributeError):
        return {}


def _args_fields(cfg: dict) -> dict[str, dataclasses.Field]:
    """mlx-lm's ModelArgs fields for ``cfg``; {} when mlx-lm has no such model (model_classes says why)."""
    try:
        from mlx_lm.utils import _get_classes

        return {f.name: f for f in dataclasses.fields(_get_classes(cfg)[1])}
    except Exception:  # noqa: BLE001 - unknown model type or not a dataclass: nothing to fill
        return {}


def _layer_period(layer_types: list, other: str, n_layers: int | None, model_type: str) -> int:
    """P such that layer i is full attention exactly when (i + 1) % P == 0 (the others ``other``), or BadRequest."""
    kinds = {"full_attention", other}
    if not set(layer_types) <= kinds:
        raise BadRequest(f"layer_types of {model_type} has {sorted(set(layer_types) - kinds)}; mlx-lm's "
                         f"{model_type} model has only {other} and full_attention layers")
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    period = full[0] + 1 if full else len(layer_types) + 1
    if any((t == "full_attention") != ((i + 1) % period == 0) for i, t in enumerate(layer_types)) or \
            (n_layers is not None and len(layer_types) != n_layers):
        raise BadRequest(f"layer_types of {model_type} is not 'every P-th layer full_attention' ({layer_types}); "
                         f"mlx-lm's {model_type} model only takes that layout")
    return period


def _fill_fields(cfg: dict) -> None:
    """Steps 2 and 3 of the module docstring, on one (sub)config in place."""
    model_type = cfg.get("model_type")
    fields = _args_fields(cfg) if model_type else {}
    aliases = _aliases(model_type) if fields else {}
    for name in fields:
        if name in cfg:
            continue
        sources = [aliases.get(name)] + [a for a, c in aliases.items() if c == name]
        src = next((s for s in sources if s and s in cfg), None)
        if src is not None:
            cfg[name] = cfg[src]
    head = fields.get("head_dim")
    if head is not None and "head_dim" not in cfg and head.default is dataclasses.MISSING \
            and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    for name, other in _PERIODS.items():
        f = fields.get(name)
        if f is not None and f.type in (int, "int") and name not in cfg and isinstance(cfg.get("layer_types"), list):
            cfg[name] = _layer_period(cfg["layer_types"], other, cfg.get("num_hidden_layers"), model_type)


def normalize_config(config: dict) -> dict:
    """A copy of ``config`` that mlx-lm reads the same way transformers does (module docstring)."""
    cfg = copy.deepcopy(config)
    for sub in (cfg, cfg.get("text_config")):
        if isinstance(sub, dict):
            _lift_rope(sub)
            _fill_fields(sub)
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

