"""Multi-LoRA in the paged engine: rows of different adapters, and rows of none, in one batch.

An adapter (``mlx_ray/adapters.py``: mlx-lm's ``adapters.safetensors`` and
``adapter_config.json`` plus mlx-ray's manifest, beside its base on the cache)
is read and checked off the generation loop (:func:`read`: NotFound,
BadRequest for another base, CorruptModel), then loaded on the loop into one
of ``max_loras`` slots (:class:`Slots`, an LRU that evicts only an adapter no
running row uses; a request whose adapter finds no slot waits, as for KV).

Each adapted linear layer of the mlx-lm model is wrapped, on first use, in a
:class:`MultiLoRALinear` holding the slots' A and B stacked (``[S + 1, in, r]``,
``[S + 1, r, out]``); slot 0 is the null slot (no adapter) and stays zero. The
paged step sets each forward's per-row slots (:meth:`State.set`, prefill
chunks and decode steps alike) before it calls the model, and every wrapped
layer computes ``base(x) + scale[slot] * (x @ A[slot]) @ B[slot]`` per row.

A batch whose rows are on different slots takes two dense matmuls: ``x``
times every adapter slot's A side by side (``[in, S*r]``, kept per layer),
masked to each row's own slot's columns with its scale (one ``[B, 1, S*r]``
mask per forward, built on the device and shared by every layer), times every
slot's B stacked (``[S*r, out]``). That is S times a gather's LoRA FLOPs, but
in BLAS and in 4 ops a layer: with SmolLM2-135M's 210 linear shapes, 16 rows
over 4 adapters of rank 16, it cut the LoRA cost of a decode step on this CPU
from 29 ms (``mx.gather_mm``, before) to 20 ms, against 45 ms for the base
matmuls. A row's result equals a single-adapter matmul's to float rounding
(the greedy tests hold). A batch whose rows all have no adapter skips the
branch; one whose rows share one adapter uses plain matmuls. Until the first
adapter loads, no layer is wrapped: an engine that serves no adapters runs
the model as loaded.

Ranks may differ between adapters: the stacks take the largest rank loaded so
far (zero columns add nothing). A/B are kept in the model's float dtype.
Prefix-cache entries are keyed per adapter version (``prefix_root``): KV
computed under an adapter is never reused for another adapter or the base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import adapters as layout
from ..errors import BadRequest, CorruptModel, NotFound

log = logging.getLogger(__name__)

NULL_SLOT = 0
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # bf16 travels as its bits


# ------------------------------------------------------------------ reading (any thread, no MLX)
@dataclass(eq=False)
class Adapter:
    """An adapter version as a request carries it to the loop: checked, and its weights when read."""

    name: str
    version: tuple  # (name, mtime_ns, size) of adapters.safetensors: a re-published adapter is another version
    scale: float
    rank: int
    # module path -> (A [in, r], B [r, out]) as numpy (bf16 as uint16 bits); None: resident when checked
    tensors: Optional[dict[str, tuple[np.ndarray, np.ndarray]]] = None
    bf16: bool = False
    directory: Optional[Path] = None

    @property
    def prefix_root(self) -> bytes:
        """The prefix cache's root key for rows of this adapter version (the base's is 32 zero bytes)."""
        return hashlib.sha256(b"mlx-ray-lora\0" + json.dumps(self.version).encode()).digest()


@dataclass
class Base:
    """What an adapter is checked against: the served model's cache name, hash, and adapted modules' shapes."""

    directory: Path
    name: str
    hash: Optional[str]
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # module path -> (in, out) of every linear


def describe_base(path: Path, model: nn.Module) -> Base:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    shapes = {k: linear_dims(m) for k, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}
    return Base(path, manifest.get("name") or str(path), layout.model_hash(manifest), shapes)


def linear_dims(m: nn.Module) -> tuple[int, int]:
    out_dims, in_dims = m["weight"].shape
    if isinstance(m, nn.QuantizedLinear):
        in_dims = in_dims * 32 // m.bits
    return in_dims, out_dims


def check(base: Base, name: str, resident: frozenset = frozenset()) -> Adapter:
    """Find and check adapter ``name`` of ``base``; its weights are read unless its version is in ``resident``.

    NotFound (no such adapter), BadRequest (trained for another base, or a kind the engine cannot
    batch), CorruptModel (a broken file): each fails this request only."""
    d = layout.adapter_dir(base.directory, name)
    if not d.is_dir():
        have = [n for n, _ in layout.list_adapters(base.directory)]
        raise NotFound(f"adapter '{name}' of model {base.name} not found"
                       f"{'; it has ' + ', '.join(have) if have else ''}", param="model")
    try:
        man = layout.read_adapter(d)
    except CorruptModel as e:  # the same file fails the same way: not worth a retry
        e.retryable = False
        raise
    if not _same_base(man, base):
        raise BadRequest(f"adapter '{name}' was trained for base model {man.base} "
                         f"(hash {str(man.base_hash)[:12]}), not for {base.name} "
                         f"(hash {str(base.hash)[:12]}) served here", param="model")
    try:
        cfg = json.loads((d / layout.CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CorruptModel(f"adapter file {d / layout.CONFIG} is unreadable: {e}", retryable=False) from e
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise BadRequest(f"adapter '{name}' is a {kind} adapter; the engine batches LoRA adapters only "
                         f"(fuse it into a model with mlx_lm.fuse to serve it)", param="model")
    params = cfg.get("lora_parameters") or {}
    scale, rank = float(params.get("scale", man.scale)), int(params.get("rank", man.rank))
    st = (d / layout.WEIGHTS).stat()
    version = (name, st.st_mtime_ns, st.st_size)
    adapter = Adapter(name, version, scale, rank, directory=d)
    if version not in resident:
        adapter.tensors, adapter.bf16 = _read_weights(d / layout.WEIGHTS, base, name, man)
    return adapter


def _same_base(man: layout.AdapterManifest, base: Base) -> bool:
    if man.base_hash and base.hash:
        return man.base_hash == base.hash
    return man.base == base.name or Path(man.base).parts[-2:] == Path(base.name).parts[-2:]


def _read_weights(path: Path, base: Base, name: str, man) -> tuple[dict, bool]:
    """``{module path: (A, B)}`` from mlx-lm's adapters.safetensors, every shape checked against the base."""
    from ..conversion.source import read_header, sha256_file

    want = (man.files or {}).get(layout.WEIGHTS, {}).get("sha256")
    if want and sha256_file(path) != want:
        raise CorruptModel(f"adapter '{name}': {path.name} does not match the sha256 its manifest records "
                           f"(damaged or overwritten); re-publish it", retryable=False)
    header = read_header(path)
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    found: dict[str, dict[str, np.ndarray]] = {}
    bf16 = False
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise BadRequest(f"adapter '{name}' has a parameter {key!r} the engine cannot batch (LoRA A/B only)",
                             param="model")
        dt = _NP.get(meta.get("dtype"))
        a, b = meta["data_offsets"]
        shape = tuple(meta.get("shape") or ())
        if dt is None or len(shape) != 2 or (b - a) != int(np.prod(shape)) * np.dtype(dt).itemsize:
            raise CorruptModel(f"adapter '{name}': tensor {key!r} has a bad dtype or shape "
                               f"({meta.get('dtype')}, {list(shape)})", retryable=False)
        arr = np.frombuffer(raw, dtype=dt, count=int(np.prod(shape)), offset=start + a).reshape(shape)
        bf16 |= meta["dtype"] == "BF16"
        finite = np.isfinite(arr).all() if dt is not np.uint16 else not ((arr & 0x7F80) == 0x7F80).any()
        if not finite:
            raise CorruptModel(f"adapter '{name}': tensor {key!r} holds NaN or infinite values", retryable=False)
        found.setdefault(module, {})[leaf] = arr
    if not found:
        raise CorruptModel(f"adapter '{name}': {path.name} holds no LoRA tensors", retryable=False)
    tensors = {}
    for module, pair in found.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise CorruptModel(f"adapter '{name}': module {module} lacks lora_a or lora_b", retryable=False)
        A, B = pair["lora_a"], pair["lora_b"]
        dims = base.shapes.get(module)
        if dims is None or A.shape[0] != dims[0] or B.shape[1] != dims[1] or A.shape[1] != B.shape[0]:
            got = f"{A.shape[0]}->{B.shape[1]}"
            raise BadRequest(f"adapter '{name}' does not fit base model {base.name}: module {module} "
                             f"({'absent' if dims is None else f'{dims[0]}->{dims[1]}'}) vs the adapter's {got}; "
                             f"it was trained for base {man.base}", param="model")
        tensors[module] = (A, B)
    return tensors, bf16


# ------------------------------------------------------------------ the layers (the loop thread)
class State:
    """The per-row slots of the forward being built, read by every :class:`MultiLoRALinear`."""

    def __init__(self, num_slots: int, dtype: mx.Dtype = mx.float32):
        self.num_slots, self.dtype = num_slots, dtype
        self.scales = [0.0] * num_slots  # per slot; the null slot's 0
        self.slot: Optional[int] = None  # every row on this one adapter slot
        self.idx: Optional[mx.array] = None  # [B] uint32: rows on different slots
        self._masks: dict[int, mx.array] = {}  # rank -> [B, 1, (num_slots - 1) * rank], this forward's

    def set(self, slots: list[int]) -> None:
        first = slots[0] if slots else NULL_SLOT
        self.slot = self.idx = None
        self._masks = {}
        if all(s == first for s in slots):
            self.slot = first if first != NULL_SLOT else None
            return
        self.idx = mx.array(slots, dtype=mx.uint32)

    def mask(self, rank: int) -> mx.array:
        """Row b's columns of the slots' side-by-side ranks: its slot's scale on its slot's ``rank`` columns,
        zero elsewhere; built once per forward for each rank (on the device, shared by every layer)."""
        m = self._masks.get(rank)
        if m is None:
            col_slot = mx.arange((self.num_slots - 1) * rank, dtype=mx.uint32) // rank + 1  # no null slot
            scales = mx.array(self.scales, dtype=mx.float32)[col_slot]
            m = mx.where(col_slot[None, :] == self.idx[:, None], scales, 0.0)[:, None, :].astype(self.dtype)
            self._masks[rank] = m
        return m

    def clear(self) -> None:
        self.slot = self.idx = None
        self._masks = {}


class MultiLoRALinear(nn.Module):
    """``base(x) + scale[slot] * (x @ A[slot]) @ B[slot]`` for each row's slot (``rows``); slot 0 adds nothing."""

    def __init__(self, base: nn.Module, state: State, num_slots: int, rank: int, dtype: mx.Dtype):
        super().__init__()
        in_dims, out_dims = linear_dims(base)
        self.base = base
        self.rows = state  # a plain attribute (not a parameter), shared by every wrapped layer
        self.lora_a = mx.zeros((num_slots, in_dims, rank), dtype=dtype)
        self.lora_b = mx.zeros((num_slots, rank, out_dims), dtype=dtype)
        self._a_cat = None  # lora_a's adapter slots side by side (side_by_side; not a parameter: "_")

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-1]

    def grow(self, rank: int) -> None:
        pad = rank - self.rank
        if pad > 0:
            self.lora_a = mx.pad(self.lora_a, [(0, 0), (0, 0), (0, pad)])
            self.lora_b = mx.pad(self.lora_b, [(0, 0), (0, pad), (0, 0)])
            self._a_cat = None

    def put(self, slot: int, a: Optional[mx.array], b: Optional[mx.array]) -> None:
        """Slot ``slot`` holds (A, B), zero-padded to the stack's rank; None: zeros (the adapter skips this layer)."""
        la, lb = self.lora_a, self.lora_b
        if a is None:
            la[slot] = mx.zeros(la.shape[1:], dtype=la.dtype)
            lb[slot] = mx.zeros(lb.shape[1:], dtype=lb.dtype)
        else:
            r = a.shape[1]
            la[slot] = mx.pad(a.astype(la.dtype), [(0, 0), (0, self.rank - r)])
            lb[slot] = mx.pad(b.astype(lb.dtype), [(0, self.rank - r), (0, 0)])
        self._a_cat = None

    def side_by_side(self) -> mx.array:
        """lora_a's adapter slots (not the null one) as [in, (S - 1) * r], slot s in columns (s-1)*r..s*r;
        kept until the next put or grow."""
        if self._a_cat is None:
            self._a_cat = mx.contiguous(self.lora_a[1:].transpose(1, 0, 2).reshape(self.lora_a.shape[1], -1))
        return self._a_cat

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        st = self.rows
        if st.slot is not None:  # one adapter for every row: plain matmuls (as mlx-lm's LoRALinear)
            z = (x @ self.lora_a[st.slot]) @ self.lora_b[st.slot]
            return y + (st.scales[st.slot] * z).astype(x.dtype)
        if st.idx is None:  # no row has an adapter
            return y
        # Rows on different slots: every slot's A side by side ([in, S*r]), each row's other slots' columns
        # masked to zero (its own scaled), then every slot's B stacked ([S*r, out]): two dense matmuls.
        z = ((x @ self.side_by_side()) * st.mask(self.rank)) @ self.lora_b[1:].reshape(-1, self.lora_b.shape[-1])
        return y + z.astype(x.dtype)


# ------------------------------------------------------------------ the slots (the loop thread)
class Slots:
    """``max_loras`` adapter slots over one model: which adapter version is where, least recently used first."""

    def __init__(self, model: nn.Module, base: Base, max_loras: int, dtype: mx.Dtype):
        self.model, self.base, self.max_loras, self.dtype = model, base, max_loras, dtype
        self.state = State(max_loras + 1, dtype)
        self.layers: dict[str, MultiLoRALinear] = {}
        self.lru: OrderedDict[tuple, int] = OrderedDict()  # adapter version -> slot, least recently used first
        self.names: dict[int, str] = {}
        self.loads = self.evictions = 0
        self._resident = frozenset()  # versions, for other threads (rebound, never mutated)

    @property
    def resident(self) -> frozenset:
        return self._resident

    def slot_for(self, adapter: Adapter, busy: set[int]) -> Optional[int]:
        """The slot ``adapter`` has or would get: its own, a free one, or the least recently used one that no
        row in ``busy`` uses; None when every slot is busy (the request waits). Nothing changes yet."""
        slot = self.lru.get(adapter.version)
        if slot is not None:
            return slot
        taken = set(self.lru.values())
        for s in range(1, self.max_loras + 1):
            if s not in taken:
                return s
        return next((s for s in self.lru.values() if s not in busy), None)

    def commit(self, adapter: Adapter, slot: int) -> None:
        """``adapter`` is in ``slot`` from the next forward on (loaded there unless it is already)."""
        if self.lru.get(adapter.version) == slot:
            self.lru.move_to_end(adapter.version)
            return
        if adapter.tensors is None:  # evicted since it was checked: read it again (this loop waits)
            fresh = check(self.base, adapter.name)
            if fresh.version != adapter.version:
                raise CorruptModel(f"adapter '{adapter.name}' changed on disk while the request waited; retry",
                                   retryable=True)
            adapter.tensors, adapter.bf16 = fresh.tensors, fresh.bf16
        old = next((v for v, s in self.lru.items() if s == slot), None)
        if old is not None:
            del self.lru[old]
            self.evictions += 1
            log.info("LoRA slot %d: evicted adapter %r", slot, old[0])
        self._load(adapter, slot)
        self.lru[adapter.version] = slot
        self.names[slot] = adapter.name
        self._resident = frozenset(self.lru)
        self.loads += 1

    def _load(self, adapter: Adapter, slot: int) -> None:
        for module in adapter.tensors:
            if module not in self.layers:
                self._wrap(module, adapter.rank)
        for module, layer in self.layers.items():
            pair = adapter.tensors.get(module)
            if pair is None:
                layer.put(slot, None, None)
                continue
            layer.grow(pair[0].shape[1])
            layer.put(slot, *(_to_mx(t, adapter.bf16) for t in pair))
        self.state.scales[slot] = adapter.scale
        mx.eval([(m.lora_a, m.lora_b, m.side_by_side()) for m in self.layers.values()])

    def _wrap(self, module: str, rank: int) -> None:
        from mlx.utils import tree_unflatten

        base = dict(self.model.named_modules())[module]
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise BadRequest(f"module {module} is a {type(base).__name__}: the engine batches LoRA on linear "
                             "layers only", param="model")
        layer = MultiLoRALinear(base, self.state, self.max_loras + 1, rank, self.dtype)
        self.model.update_modules(tree_unflatten([(module, layer)]))
        self.layers[module] = layer

    def stats(self) -> dict:
        return dict(lora_slots=self.max_loras, lora_loaded=sorted(self.names[s] for s in self.lru.values()),
                    lora_loads_total=self.loads, lora_evictions_total=self.evictions)


def _to_mx(t: np.ndarray, bf16: bool) -> mx.array:
    a = mx.array(t)
    return a.view(mx.bfloat16) if bf16 and t.dtype == np.uint16 else a


class Store:
    """The engine's adapters: checks on the caller's thread (host copies shared by concurrent requests
    for one version), slots on the loop."""

    def __init__(self, model: nn.Module, path: Path, max_loras: int):
        self.base = describe_base(path, model)
        self.slots = Slots(model, self.base, max_loras, model_dtype(model))
        self._shared: "weakref.WeakValueDictionary[tuple, Adapter]" = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def prepare(self, name: str) -> Adapter:
        """Blocking (reads files): run it off the event loop and off the generation loop."""
        resident = self.slots.resident
        got = check(self.base, name, resident)
        if got.tensors is None:
            return got
        with self._lock:  # concurrent requests for one version share one host copy
            shared = self._shared.get(got.version)
            if shared is not None:
                return shared
            self._shared[got.version] = got
        return got

    def names(self) -> list[str]:
        return [n for n, _ in layout.list_adapters(self.base.directory)]


def model_dtype(model: nn.Module) -> mx.Dtype:
    """The float dtype of the model's activations (its embedding's, else its first float weight's)."""
    from mlx.utils import tree_flatten

    floats = [v.dtype for _, v in tree_flatten(model.parameters()) if v.dtype in (mx.float32, mx.float16, mx.bfloat16)]
    return floats[0] if floats else mx.float32
