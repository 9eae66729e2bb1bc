"""Time one shape (prompt length L × batch B × G generated tokens) on one backend.

Both backends run the same thing: one batched prefill forward of ``B × L``
tokens into a fresh KV cache, then ``G - 1`` greedy decode steps of ``B``
tokens each, synchronising after every step (``mx.eval`` / ``.item()``-style
host copies) so that the clock sees finished work. Plain forward passes rather
than each library's ``generate``: it is the only way to run exactly the same
batched work on both sides and to split prefill from decode.

* prefill tok/s = B × L ÷ prefill time; TTFT = prefill + first token on host;
* decode tok/s = B × (G - 1) ÷ decode time (aggregate over the batch);
* peak memory: MLX's allocator peak; torch's CUDA peak, MPS driver
  allocation, or the process RSS sampled at the end of prefill and decode.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import numpy as np

from ..parity.backends import Side


@dataclass
class ShapeTiming:
    prefill_s: float
    ttft_s: float
    decode_s: float
    peak_bytes: int
    peak_kind: str


def batch_tokens(base: list[int], length: int, batch: int) -> np.ndarray:
    """``[batch, length]`` token ids cut from ``base`` (tiled), each row at another offset."""
    reps = (length + 7 * batch) // max(len(base), 1) + 1
    tiled = np.array((base * reps)[: length + 7 * batch], dtype=np.int32)
    return np.stack([tiled[7 * b: 7 * b + length] for b in range(batch)])


class MlxShape:
    def __init__(self, side: Side):
        import mlx.core as mx

        self.mx, self.model = mx, side.model

    def run(self, tokens: np.ndarray, gen: int) -> ShapeTiming:
        mx = self.mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        mx.clear_cache()
        mx.reset_peak_memory()
        x = mx.array(tokens)
        t0 = time.perf_counter()
        logits = self.model(x, cache=cache)
        mx.eval(logits)
        t1 = time.perf_counter()
        y = mx.argmax(logits[:, -1, :], axis=-1)
        y.tolist()
        t2 = time.perf_counter()
        for _ in range(gen - 1):
            y = mx.argmax(self.model(y[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.eval(y)
        y.tolist()
        t3 = time.perf_counter()
        return ShapeTiming(t1 - t0, t2 - t0, t3 - t2, int(mx.get_peak_memory()), "mlx peak memory")


class TorchShape:
    def __init__(self, side: Side):
        import torch

        self.torch, self.model, self.device = torch, side.model, side.info["device"]
        # transformers >= 5.2x renamed past_key_values to cache (the old name warns, then goes away)
        self.cache_kw = "cache" if "cache" in inspect.signature(side.model.forward).parameters else "past_key_values"

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()
        elif self.device == "mps":
            self.torch.mps.synchronize()

    def _peak(self) -> tuple[int, str]:
        torch = self.torch
        if self.device.startswith("cuda"):
            return int(torch.cuda.max_memory_allocated()), "torch cuda max allocated"
        if self.device == "mps":
            return int(torch.mps.driver_allocated_memory()), "torch mps driver allocated"
        import psutil

        return int(psutil.Process().memory_info().rss), "process RSS"

    def run(self, tokens: np.ndarray, gen: int) -> ShapeTiming:
        torch = self.torch
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        x = torch.from_numpy(tokens.astype(np.int64)).to(self.device)
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            out = self.model(input_ids=x, use_cache=True)
            self._sync()
            t1 = time.perf_counter()
            y = out.logits[:, -1, :].argmax(-1)
            y.tolist()
            t2 = time.perf_counter()
            peak = self._peak()
            kv = getattr(out, self.cache_kw)
            del out
            for _ in range(gen - 1):
                out = self.model(input_ids=y[:, None], use_cache=True, **{self.cache_kw: kv})
                kv = getattr(out, self.cache_kw)
                y = out.logits[:, -1, :].argmax(-1)
                self._sync()
            y.tolist()
            t3 = time.perf_counter()
        p2 = self._peak()
        best = max(peak, p2)
        return ShapeTiming(t1 - t0, t2 - t0, t3 - t2, best[0], best[1])


def shape_runner(side: Side):
    return MlxShape(side) if side.backend == "mlx" else TorchShape(side)


def memory_bandwidth_gbs(gib: float = 1.0, repeats: int = 3) -> float:
    """Read bandwidth in GB/s: best of ``repeats`` NumPy sums over ``gib`` GiB of float32."""
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    a.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9
