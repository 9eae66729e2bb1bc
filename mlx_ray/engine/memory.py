"""The memory plan: how one model, its KV cache and its activations share one device.

One function, :func:`make_plan`, is used by the engine at start and printed by
``mlx-ray plan`` and ``mlx-ray doctor``, so what a user is shown is what the
engine does. It counts, once each:

- the weights, as mapped (the safetensors data, or the loaded arrays);
- an activation reserve for the largest step the engine runs (a padded prefill
  chunk: hidden states, the MLP, attention scores, the gathered context of the
  prefill rows, the logits; the decode rows' logits and sampling buffers; and a
  fixed slack for MLX's allocator and Metal's command buffers): an estimate,
  stated as one;
- the KV pool: ``max_num_seqs`` sequences of ``max_model_len`` tokens in whole
  blocks, plus the paged cache's one trash block. The prefix cache keeps up to
  a quarter of the pool's blocks while no sequence holds them.

Against the device's working set (Metal's recommended working set on a Mac,
RAM less a quarter elsewhere; ``device.py``). When the model's dtype KV does
not fit the requested concurrency and context and ``kv_bits`` is left to the
plan, it takes 8-bit KV (group 32: top-1 agreement >= 0.99 with float KV);
when that does not fit either, it keeps as many full-length sequences as fit,
and refuses in one line (:class:`PlanError`) only when not one sequence of
``max_model_len`` tokens fits. The plan also says what would buy more: raising
``iogpu.wired_limit_mb`` (macOS), or quantizing the embeddings at conversion.

mlx-lm's batch cache (``batching.RectBatch``, for models the paged cache cannot
take) is rectangular and grows in steps of 256 tokens: ``batch_kv_bound``
bounds it, and its admission uses exactly that bound.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import BadRequest
from .device import GiB, Device

log = logging.getLogger(__name__)

KV_STEP = 256  # BatchKVCache / KVCache growth step (mlx_lm.models.cache)
PREFIX_SHARE = 0.25  # the prefix cache's default share of the KV pool
OS_MIN_BYTES = 4 * GiB  # never plan a Mac past this little left for macOS
ALLOCATOR_SLACK = 256 << 20  # MLX's buffer cache and Metal's command buffers
PREFILL_PAD = 1.5  # paged.py: a padded prefill chunk stays within 1.5x its token budget
PREFILL_ROWS = 8  # paged.MAX_PREFILL_ROWS
AUTO_KV_BITS = (None, 8)  # what the plan tries, in order, when kv_bits is left to it
KV_BLOCK = 32  # paged.BLOCK_SIZE (the default kv_block_size)


class PlanError(BadRequest):
    """The model cannot run at the requested context on this device (one line: what to change)."""


def mlx_memory() -> int:
    """The bytes MLX holds in this process: arrays alive (``mx.get_active_memory``) plus its buffer cache
    (``mx.get_cache_memory``), what a sleeping engine gives back."""
    import mlx.core as mx

    return int(mx.get_active_memory()) + int(mx.get_cache_memory())


def round_up(n: int, step: int = KV_STEP) -> int:
    return -(-n // step) * step


def batch_kv_bound(lengths: list[int], bytes_per_token: int) -> int:
    """Upper bound of the KV bytes of a rectangular batch whose rows grow to ``lengths`` tokens."""
    if not lengths:
        return 0
    return len(lengths) * round_up(max(lengths)) * bytes_per_token


# ------------------------------------------------------------------ the model's side
@dataclass
class Footprint:
    """What the plan needs to know of a model (from its directory, or measured by the loader)."""

    weights_bytes: int  # as mapped
    embed_bytes: int  # of which: float embedding and output layers (what quantizing them would shrink)
    kv_bytes_per_token: int  # K and V of one token over all layers, in the model's dtype
    dtype_bytes: int  # the activations' (and the float KV's) element size
    hidden: int
    intermediate: int
    n_heads: int
    vocab: int
    max_model_len: int  # the model's own context
    layers: int
    estimated: bool = False  # weights from the config's arithmetic, not from files
    quantized: bool = False  # the config has a quantization section (then float embeddings can be quantized too)

    def kv_bytes(self, bits: Optional[int], group_size: int = 32) -> int:
        """Bytes of one token's KV at ``bits`` (None: the model's dtype), as ``kv_pool.bytes_per_slot`` lays it out."""
        if bits is None:
            return self.kv_bytes_per_token
        elems = self.kv_bytes_per_token // self.dtype_bytes  # K and V elements over all layers
        return elems * bits // 8 + 2 * (elems // group_size) * self.dtype_bytes


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2}


def _text_config(config: dict) -> dict:
    return {**config, **(config.get("text_config") or {})}


def _dtype_bytes(config: dict) -> int:
    return _DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "float16"), 2)


def _context_length(config: dict) -> int:
    from .loader import _context_length as ctx

    return ctx(config)


def mapped_bytes(path: Path) -> tuple[int, int]:
    """(all tensor bytes, float embedding/output-layer bytes) from the safetensors headers; no data is read."""
    total = embed = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            size = t["data_offsets"][1] - t["data_offsets"][0]
            total += size
            parts = name.split(".")
            if t["dtype"] in _DTYPE_BYTES and parts[-1] == "weight" and parts[-2] in ("embed_tokens", "lm_head", "wte"):
                embed += size
    return total, embed


def estimate_weights(config: dict) -> tuple[int, int]:
    """(weights bytes, float embedding bytes) of a llama-family model (q/k/v/o, a gated MLP), from its config alone.

    For planning a model that is not on this machine (``mlx-ray plan CONFIG.json``). It counts
    MLX's affine layout where the config has a ``quantization`` section: ``bits / 8`` bytes a weight
    plus a scale and a bias per group in the model's dtype; modules the section switches off stay float.
    """
    c = _text_config(config)
    d = _dtype_bytes(c)
    h, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    nh = c["num_attention_heads"]
    kvh = c.get("num_key_value_heads") or nh
    hd = c.get("head_dim") or h // nh
    inter = c["intermediate_size"]
    q = c.get("quantization") or c.get("quantization_config") or {}
    bits, gs = q.get("bits"), q.get("group_size", 64)
    if q.get("quant_method") == "awq":  # an AutoAWQ checkpoint: its embedding and output layers are float
        q = {**q, "model.embed_tokens": False, "lm_head": False}

    def linear(out: int, inp: int, name: str = "") -> int:
        over = q.get(name) if name else None
        if over is False or not bits:
            return out * inp * d
        b, g = (over["bits"], over["group_size"]) if isinstance(over, dict) else (bits, gs)
        return out * inp * b // 8 + 2 * out * (inp // g) * d

    attn = linear(nh * hd, h) + 2 * linear(kvh * hd, h) + linear(h, nh * hd)
    if c.get("attention_bias") or c.get("model_type") == "qwen2":
        attn += (nh * hd + 2 * kvh * hd) * d
    per_layer = attn + 2 * linear(inter, h) + linear(h, inter) + 2 * h * d
    embed = linear(V, h, "model.embed_tokens")
    head = 0 if c.get("tie_word_embeddings") else linear(V, h, "lm_head")
    floats = (embed if embed == V * h * d else 0) + (head if head == V * h * d else 0)
    return L * per_layer + embed + head + h * d, floats


def footprint(path: Path, *, weights_bytes: Optional[int] = None, kv_bytes_per_token: Optional[int] = None,
              vocab: Optional[int] = None) -> Footprint:
    """The footprint of the model at ``path`` (a directory, or a config.json alone: then the weights are estimated).

    The engine passes what it measured on the loaded model (``weights_bytes``,
    ``kv_bytes_per_token``, ``vocab``); ``mlx-ray plan`` reads them from the files.
    """
    path = Path(path)
    cfg_file = path if path.is_file() else path / "config.json"
    config = json.loads(cfg_file.read_text())
    c = _text_config(config)
    d = _dtype_bytes(c)
    hidden = c.get("hidden_size") or c.get("n_embd") or c.get("d_model") or 0
    nh = c.get("num_attention_heads") or c.get("n_head") or 1
    kvh = c.get("num_key_value_heads") or nh
    hd = c.get("head_dim") or hidden // nh
    L = c.get("num_hidden_layers") or c.get("n_layer") or 1
    if not (kv_bytes_per_token or hidden * kvh * hd):
        raise PlanError(f"{cfg_file} names no attention shapes (hidden_size, num_attention_heads, head_dim); "
                        f"the memory plan needs them", param="model")
    mapped, embed = mapped_bytes(cfg_file.parent) if path.is_dir() else (0, 0)
    estimated = False
    if weights_bytes is None:
        if not mapped:
            mapped, embed = estimate_weights(config)
            estimated = True
        weights_bytes = mapped
    return Footprint(
        weights_bytes=int(weights_bytes), embed_bytes=int(embed),
        kv_bytes_per_token=int(kv_bytes_per_token or 2 * L * kvh * hd * d), dtype_bytes=d,
        hidden=hidden, intermediate=c.get("intermediate_size") or 4 * hidden, n_heads=nh,
        vocab=vocab or c.get("vocab_size") or 0, max_model_len=_context_length(config), layers=L, estimated=estimated,
        quantized=bool(c.get("quantization") or c.get("quantization_config")))


# ------------------------------------------------------------------ the plan
@dataclass
class MemoryPlan:
    device: dict
    model: dict
    max_model_len: int
    max_num_seqs: int  # requested
    kv_bits: Optional[int]  # chosen (None: the model's dtype)
    kv_bytes_per_token: int
    block_size: int
    kv_blocks: int  # in the pool, the trash block included
    kv_pool_bytes: int
    prefix_cache_bytes: int
    activation_bytes: int
    planned_bytes: int  # weights + activations + KV pool
    working_set_bytes: int
    left_for_os_bytes: int  # device memory less what is planned
    full_length_seqs: int  # sequences of max_model_len tokens the pool holds at once
    wired_limit_bytes: int  # what the engine sets MLX's wired limit to (a Mac)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def activation_bytes(fp: Footprint, max_model_len: int, max_num_seqs: int, prefill_chunk: int) -> int:
    """An upper estimate of the largest step's temporaries (see the module docstring)."""
    t = int(prefill_chunk * PREFILL_PAD)
    f32 = 4
    hidden = t * (4 * fp.hidden + 3 * fp.intermediate) * fp.dtype_bytes
    scores = t * fp.n_heads * max_model_len * f32
    context = PREFILL_ROWS * max_model_len * fp.kv_bytes_per_token // max(1, fp.layers)
    logits = (t + max_num_seqs) * fp.vocab * f32 + 4 * max_num_seqs * fp.vocab * f32
    return hidden + scores + context + logits + ALLOCATOR_SLACK


def _pool_blocks(seqs: int, max_model_len: int, block: int) -> int:
    return seqs * -(-max_model_len // block) + 1  # + the trash block (paged.py)


def make_plan(fp: Footprint, device: Device, *, max_model_len: Optional[int] = None, max_num_seqs: int = 16,
              kv_bits: Optional[int] | str = "auto", kv_group_size: int = 32, block_size: int = KV_BLOCK,
              prefill_chunk: int = 512, kv_budget_bytes: Optional[int] = None,
              prefix_cache_bytes: Optional[int] = None) -> MemoryPlan:
    """The plan for ``fp`` on ``device`` at this context and concurrency, or :class:`PlanError`.

    ``kv_bits="auto"`` lets the plan choose (the model's dtype, else 8); None or 8 or 4 insist.
    An explicit ``kv_budget_bytes`` is used as given (the plan still checks one sequence fits).
    """
    ctx = min(max_model_len or fp.max_model_len, fp.max_model_len)
    act = activation_bytes(fp, ctx, max_num_seqs, prefill_chunk)
    ceiling = min(device.working_set_bytes, device.memory_bytes - OS_MIN_BYTES) if device.metal \
        else device.working_set_bytes
    room = ceiling - fp.weights_bytes - act
    per_seq_tokens = -(-ctx // block_size) * block_size
    candidates = AUTO_KV_BITS if kv_bits == "auto" else (kv_bits,)
    notes: list[str] = []

    def need(bits, seqs):
        return _pool_blocks(seqs, ctx, block_size) * block_size * fp.kv_bytes(bits, kv_group_size)

    # The first precision that holds the full concurrency; when none does, the last (it holds the most sequences).
    fitting = [b for b in candidates if kv_budget_bytes is not None or need(b, max_num_seqs) <= room]
    chosen = fitting[0] if fitting else candidates[-1]
    bpt = fp.kv_bytes(chosen, kv_group_size)
    block_bytes = block_size * bpt
    if kv_budget_bytes is not None:
        pool = kv_budget_bytes
    else:
        # No room of its own for the prefix cache: it keeps blocks no running sequence holds, and gives
        # them back when admission needs them (block_prefix.py), so a full pool still serves prefixes.
        pool = min(max(room, 0), need(chosen, max_num_seqs))
    blocks = pool // block_bytes
    seqs = max(0, (blocks - 1) // (per_seq_tokens // block_size))
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    if seqs < 1 and kv_budget_bytes is not None:  # the operator's own budget: requests longer than it get a 400
        notes.append(f"kv_budget_bytes={kv_budget_bytes} holds {max(0, blocks - 1) * block_size} tokens, less than "
                     f"one sequence of {ctx}: longer requests are refused")
    elif seqs < 1:
        most_ctx = max(0, (max(room, 0) // bpt - block_size) // block_size * block_size)
        where = (f"{gb(fp.weights_bytes)} of weights and {gb(act)} of activations leave {gb(max(room, 0))} of the "
                 f"{gb(ceiling)} {device.name} can give")
        fix = (f"set max_model_len to {most_ctx} or less, or use" if most_ctx >= 256 else "use") + \
            " a smaller or more quantized model"
        raise PlanError(f"one sequence of {ctx} tokens needs {gb(need(chosen, 1))} of KV cache"
                        f"{'' if chosen is None else f' at {chosen} bits'}; {where}: {fix}", param="max_model_len")
    if 0 < seqs < max_num_seqs:
        notes.append(f"only {seqs} of max_num_seqs={max_num_seqs} sequences fit at {ctx} tokens each; more can run "
                     f"when they are shorter (admission counts the blocks each request reserves)")
    if chosen is not None and kv_bits == "auto":
        notes.append(f"{chosen}-bit KV: the model's dtype KV ({gb(need(None, max_num_seqs))} for {max_num_seqs} "
                     f"x {ctx} tokens) does not fit the {gb(max(room, 0))} left")
    planned = fp.weights_bytes + act + pool
    if device.metal and kv_budget_bytes is None and chosen != candidates[0]:
        # What raising the GPU's wired limit would buy: the first precision tried, with macOS's floor kept.
        want = fp.weights_bytes + act + need(candidates[0], max_num_seqs)
        if want <= device.memory_bytes - OS_MIN_BYTES:
            notes.append(f"`sudo sysctl iogpu.wired_limit_mb={-(-want // (1 << 20))}` would fit "
                         f"{'the model dtype' if candidates[0] is None else candidates[0]} KV for all "
                         f"{max_num_seqs} sequences (leaving {gb(device.memory_bytes - want)} for macOS)")
    if fp.embed_bytes and fp.quantized:
        saved = fp.embed_bytes - fp.embed_bytes * (4 / 8 + 2 * fp.dtype_bytes / 64) // fp.dtype_bytes
        notes.append(f"converting with --quantize-embeddings would free {gb(saved)} "
                     f"({int(saved // (per_seq_tokens * bpt))} more sequences of {ctx} tokens, or prefix cache)")
    prefix = prefix_cache_bytes if prefix_cache_bytes is not None else int(PREFIX_SHARE * pool)
    return MemoryPlan(
        device=device.as_dict(), model=asdict(fp), max_model_len=ctx, max_num_seqs=max_num_seqs, kv_bits=chosen,
        kv_bytes_per_token=bpt, block_size=block_size, kv_blocks=int(blocks), kv_pool_bytes=int(pool),
        prefix_cache_bytes=int(prefix), activation_bytes=int(act), planned_bytes=int(planned),
        working_set_bytes=int(ceiling), left_for_os_bytes=int(device.memory_bytes - planned),
        # MLX refuses a wired limit above Metal's recommended working set (it raises), so the limit is that, as
        # mlx-lm's wired_limit sets it: the plan keeps within it unless an explicit kv budget says otherwise.
        full_length_seqs=int(seqs), wired_limit_bytes=int(device.working_set_bytes), notes=notes)


def apply_wired_limit(plan: MemoryPlan) -> Optional[int]:
    """On a Mac: keep the planned bytes resident (``mx.set_wired_limit``, as mlx-lm's ``wired_limit`` does while it
    generates; a server generates for its whole life). Returns the previous limit, or None off Metal."""
    import mlx.core as mx

    if not plan.device.get("metal") or plan.device.get("source") == "profile" or not mx.metal.is_available():
        return None
    try:
        return mx.set_wired_limit(plan.wired_limit_bytes)
    except (RuntimeError, ValueError) as e:  # an MLX that refuses it: serve unwired rather than not at all
        log.warning("MLX's wired limit not set (%s); the model's pages may be swapped out under pressure", e)
        return None


def describe(plan: MemoryPlan) -> str:
    """The plan as a table a person reads."""
    gb = lambda n: f"{n / 1e9:6.2f} GB"  # noqa: E731
    dev, fp = plan.device, plan.model
    kv = "model dtype" if plan.kv_bits is None else f"{plan.kv_bits}-bit"
    rows = [
        ("device", f"{dev['name']} ({dev['source']}): {dev['memory_bytes'] / GiB:.0f} GiB, "
                   f"working set {dev['working_set_bytes'] / GiB:.1f} GiB"),
        ("weights", f"{gb(fp['weights_bytes'])}{' (estimated from config)' if fp['estimated'] else ''}"
                    + (f", of which float embeddings {gb(fp['embed_bytes']).strip()}" if fp['embed_bytes'] else "")),
        ("activations", f"{gb(plan.activation_bytes)} (estimate: largest prefill step, logits, sampling)"),
        ("KV pool", f"{gb(plan.kv_pool_bytes)}: {plan.kv_blocks} blocks of {plan.block_size} tokens, {kv}, "
                    f"{plan.kv_bytes_per_token / 1024:.0f} KiB a token"),
        ("prefix cache", f"{gb(plan.prefix_cache_bytes)} of the pool at most"),
        ("context", f"{plan.max_model_len} tokens x {plan.max_num_seqs} sequences requested; "
                    f"{plan.full_length_seqs} fit at full length"),
        ("planned", f"{gb(plan.planned_bytes)} of {gb(plan.working_set_bytes).strip()} usable"),
        ("left for OS", gb(plan.left_for_os_bytes)),
        ("wired limit", gb(plan.wired_limit_bytes) if dev["metal"] else "- (no Metal)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)

