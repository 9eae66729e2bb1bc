"""Quantization settings: validation, cache tags and the per-layer decision.

The numerics are MLX's own (``mx.quantize``); the mixed-precision recipes are
mlx-lm's (``mlx_lm.convert.mixed_quant_predicate_builder``). What lives here is
the validation of a (mode, bits, group size) combination, done up front with a
one-line error instead of failing halfway through a 64 GB model, and the
per-layer decision used by the shard-streaming converter, which never builds
the whole model in memory and so cannot call ``nn.quantize`` on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from mlx_ray.errors import BadRequest

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
# Each floating-point mode admits exactly one (bits, group size) pair.
FP_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
MODES = ("affine", *FP_MODES)
DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "half": "float16",
                 "bf16": "bfloat16"}


def normalize_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    d = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if d not in DTYPES:
        raise BadRequest(f"unsupported --dtype {dtype!r}; choose one of {', '.join(DTYPES)}", param="dtype")
    return d


def _recipes() -> dict[str, tuple[int, int]]:
    """mlx-lm's mixed recipes as {name: (low bits, high bits)}."""
    try:
        from mlx_lm.convert import QUANT_RECIPES
    except ImportError:  # pragma: no cover - older mlx-lm
        QUANT_RECIPES = ["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]
    out = {}
    for r in QUANT_RECIPES:
        _, lo, hi = r.split("_")
        out[r] = (int(lo), int(hi))
    return out


@dataclass(frozen=True)
class QuantSpec:
    """What to do with the weights: ``bits is None`` means no quantization."""

    mode: str = "affine"
    bits: int | None = 4
    group_size: int | None = 64
    recipe: str | None = None
    dtype: str | None = None  # dtype of the non-quantized tensors (and affine scales/biases)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def tag(self) -> str:
        """The cache sub-directory name, e.g. ``q4-g64``, ``mxfp4``, ``mixed_4_6-g64``, ``bf16``."""
        if not self.quantized:
            return DTYPES[self.dtype or "bfloat16"] if self.dtype else "orig"
        if self.recipe:
            base = f"{self.recipe}-g{self.group_size}"
        elif self.mode == "affine":
            base = f"q{self.bits}-g{self.group_size}"
        else:
            base = self.mode
        return base + (f"-{DTYPES[self.dtype]}" if self.dtype else "")

    def params(self) -> dict:
        """The ``quantization`` block mlx-lm reads from config.json."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def as_dict(self) -> dict:
        return asdict(self)


def make_spec(*, quantize: bool = True, q_bits: int | None = None, q_group_size: int | None = None,
              q_mode: str = "affine", quant_recipe: str | None = None, dtype: str | None = None) -> QuantSpec:
    """Validate a combination and return its spec (raises BadRequest, one line).

    ``None`` bits / group size mean the mode's default: affine 4 bits, group 64;
    mxfp4 (4, 32), nvfp4 (4, 16), mxfp8 (8, 32).
    """
    dtype = normalize_dtype(dtype)
    if not quantize:
        if quant_recipe:
            raise BadRequest("--quant-recipe needs quantization; drop --no-quantize", param="quant_recipe")
        return QuantSpec(mode="affine", bits=None, group_size=None, dtype=dtype)
    mode = (q_mode or "affine").lower()
    if mode not in MODES:
        raise BadRequest(f"unknown --q-mode {q_mode!r}; choose one of {', '.join(MODES)}", param="q_mode")
    if mode in FP_MODES:
        want_bits, want_group = FP_MODES[mode]
        bits = want_bits if q_bits is None else q_bits
        group = want_group if q_group_size is None else q_group_size
        if (bits, group) != (want_bits, want_group):
            raise BadRequest(f"--q-mode {mode} needs --q-bits {want_bits} --q-group-size {want_group} "
                             f"(got bits={bits}, group={group})", param="q_mode")
        if quant_recipe:
            raise BadRequest(f"--quant-recipe works with --q-mode affine only, not {mode}", param="quant_recipe")
        return QuantSpec(mode=mode, bits=bits, group_size=group, dtype=dtype)
    group = q_group_size or 64
    if group not in AFFINE_GROUPS:
        raise BadRequest(f"invalid --q-group-size {group} for affine; choose one of "
                         f"{', '.join(map(str, AFFINE_GROUPS))}", param="q_group_size")
    if quant_recipe:
        recipes = _recipes()
        if quant_recipe not in recipes:
            raise BadRequest(f"unknown --quant-recipe {quant_recipe!r}; choose one of {', '.join(recipes)}",
                             param="quant_recipe")
        return QuantSpec(mode="affine", bits=recipes[quant_recipe][0], group_size=group, recipe=quant_recipe,
                         dtype=dtype)
    bits = q_bits or 4
    if bits not in AFFINE_BITS:
        raise BadRequest(f"invalid --q-bits {bits} for affine; choose one of {', '.join(map(str, AFFINE_BITS))}",
                         param="q_bits")
    return QuantSpec(mode="affine", bits=bits, group_size=group, dtype=dtype)


def layer_decider(spec: QuantSpec, model) -> Callable[[str, object, tuple], dict | None]:
    """Return ``decide(path, module, weight_shape) -> params | None`` for one layer.

    Mirrors ``mlx_lm.utils.quantize_model``: only modules with ``to_quantized``
    whose input dim divides the group size are quantized; the model's own
    ``quant_predicate`` (e.g. 8-bit MoE gates) and the mixed recipe apply on top.
    """
    base = spec.params()
    recipe_pred = None
    if spec.recipe:
        from mlx_lm.convert import mixed_quant_predicate_builder

        try:
            recipe_pred = mixed_quant_predicate_builder(spec.recipe, model, spec.group_size)
        except ValueError as e:
            raise BadRequest(f"--quant-recipe {spec.recipe}: {e}", param="quant_recipe") from e
    model_pred = getattr(model, "quant_predicate", None)

    def decide(path: str, module, shape: tuple) -> dict | None:
        if not hasattr(module, "to_quantized"):
            return None
        group = base["group_size"]
        if len(shape) < 2 or shape[-1] % group != 0:
            return None
        params = dict(base)
        for pred in (model_pred, recipe_pred):
            if pred is None:
                continue
            r = pred(path, module)
            if r is False:
                return None
            if isinstance(r, dict):
                params = {**params, **r}
        if shape[-1] % params["group_size"] != 0:
            return None
        return params

    return decide
