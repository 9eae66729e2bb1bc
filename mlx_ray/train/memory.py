"""Will the fine-tune fit? An estimate of the job's memory against what the worker's machine has free.

The estimate (stated as one) counts, once each:

- the base weights, as mapped (``engine.memory.footprint``: the safetensors bytes);
- the LoRA/DoRA parameters with their gradients and Adam's two moments (float32);
- the activations kept for the backward pass over the adapted layers (all of them under
  ``--grad-checkpoint`` keep one hidden state a layer), one layer's transient working set, and the
  logits with their softmax and gradient (float32), for ``batch_size x max_seq_length`` tokens;
- a fixed slack for MLX's allocator.

It is compared on the worker's node (a probe task with the job's resources) with the smaller of the
device's working set (Metal's recommended working set on a Mac) and the memory free there now. Short of
it, the refusal names what holds the memory there: the served mlx-ray models' replicas on that node
(``serving.py``, with ``--sleep-serving`` as the way out), else the processes that hold the most.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

SLACK = 256 << 20


@dataclass
class TrainEstimate:
    weights: int
    adapter: int  # parameters + gradients + Adam moments
    activations: int
    total: int

    def as_dict(self) -> dict:
        return asdict(self)


def estimate(base_dir: Path, *, rank: int, num_layers: int, batch_size: int, max_seq_length: int,
             grad_checkpoint: bool, dora: bool = False) -> TrainEstimate:
    from mlx_ray.engine.memory import footprint

    fp = footprint(Path(base_dir))
    layers = fp.layers if num_layers < 0 else min(num_layers, fp.layers)
    h, inter, d = fp.hidden, fp.intermediate, fp.dtype_bytes
    kv = fp.kv_bytes_per_token // max(1, 2 * fp.layers * d)  # kv heads x head dim
    # Adapted linears of one layer: q, k, v, o and the gated MLP's three; r*(in+out) each (+ out for DoRA).
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    per_layer = sum(rank * (i + o) + (o if dora else 0) for i, o in shapes)
    adapter = layers * per_layer * 4 * 4  # fp32 parameter, gradient, Adam's m and v
    tokens = batch_size * max_seq_length
    kept_per_token = h * d if grad_checkpoint else (6 * h + 3 * inter) * d
    attn_scores = batch_size * fp.n_heads * max_seq_length * max_seq_length * 4
    one_layer = tokens * (4 * h + 3 * inter) * d + 2 * attn_scores
    logits = tokens * fp.vocab * 4 * 3
    activations = layers * tokens * kept_per_token + one_layer + logits
    total = fp.weights_bytes + adapter + activations + SLACK
    return TrainEstimate(fp.weights_bytes, adapter, activations, total)


def probe_node() -> dict:
    """Runs on the worker's node: the device's working set, free memory, and the top memory holders."""
    import os
    import socket

    import psutil

    from mlx_ray.engine.device import local

    dev = local()
    holders = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
        try:
            rss = p.info["memory_info"].rss
            cmd = " ".join(p.info["cmdline"] or [])[:80] or p.info["name"]
        except (psutil.Error, AttributeError, TypeError):
            continue
        if p.info["pid"] != os.getpid():
            holders.append((rss, p.info["pid"], cmd))
    holders.sort(reverse=True)
    import ray

    return {"host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(), "device": dev.name, "working_set": dev.working_set_bytes,
            "available": int(psutil.virtual_memory().available), "holders": holders[:3]}


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def shortfall(est: TrainEstimate, node: dict, served: list | None = None) -> str | None:
    """The one-line refusal when the estimate does not fit the node, else None. ``served``: the mlx-ray
    replicas on the node (``serving.Replica``), named first, with ``--sleep-serving`` as the way out."""
    room = min(node["working_set"], node["available"])
    if est.total <= room:
        return None
    need = (f"the fine-tune needs about {gb(est.total)} (weights {gb(est.weights)}, activations "
            f"{gb(est.activations)}, adapter + optimizer {gb(est.adapter)}) but {node['host']} has {gb(room)} "
            f"free of its {gb(node['working_set'])} working set")
    awake = [r for r in served or () if not r.sleeping]
    if awake:
        held = "; ".join(r.describe() for r in awake)
        return f"{need}; {held}; stop {'it' if len(awake) == 1 else 'them'} or pass --sleep-serving"
    who = ", ".join(f"pid {pid} {cmd!r} {gb(rss)}" for rss, pid, cmd in node["holders"]) or "nothing found"
    return (f"{need}; the most memory is held by: {who}. Lower --batch-size / --max-seq-length, add "
            f"--grad-checkpoint, stop what holds the memory, or pass --no-memory-check")
