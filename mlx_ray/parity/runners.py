"""The same three operations on each backend, timed the same way.

* ``logprobs(ids)``: teacher-forced log-softmax over the vocabulary at every
  position, float32 numpy ``[T, V]``;
* ``greedy(ids, max_new, eos)``: greedy tokens, time to first token, decode
  tok/s, and the top-1/top-2 log-prob gap at each step (to tell a near-tie
  from a real divergence);
* ``reset_peak()`` / ``peak()``: peak memory and what kind of figure it is.

MLX generates through ``mlx_lm.generate.generate_step`` and torch through
``transformers``' ``generate`` with an explicit greedy ``GenerationConfig``
(the model's own generation_config could add penalties), so each side runs
its library's real generation path. Timestamps are taken when a token is
available on the host (``.item()`` on MLX; the streamer's ``.cpu()`` on torch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backends import Side, process_peak_rss


@dataclass
class Generation:
    tokens: list[int]
    ttft_s: float
    decode_tok_s: float | None  # None with fewer than 2 tokens
    margins: list[float] = field(default_factory=list)  # top1 - top2 log-prob per step
    total_s: float = 0.0


def _timing(t0: float, stamps: list[float]) -> tuple[float, float | None, float]:
    ttft = stamps[0] - t0 if stamps else float("nan")
    dec = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
    return ttft, dec, (stamps[-1] - t0 if stamps else 0.0)


def _top2_gap(logp: np.ndarray) -> float:
    two = np.partition(logp, -2)[-2:]
    return float(two[1] - two[0])


class MlxRunner:
    def __init__(self, side: Side):
        import mlx.core as mx

        self.mx = mx
        self.side = side

    def logprobs(self, ids: list[int]) -> np.ndarray:
        mx = self.mx
        logits = self.side.model(mx.array([ids]))[0].astype(mx.float32)
        out = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return np.array(out)

    def greedy(self, ids: list[int], max_new: int, eos: set[int]) -> Generation:
        mx = self.mx
        from mlx_lm.generate import generate_step

        tokens, stamps, logps = [], [], []
        t0 = time.perf_counter()
        for tok, logp in generate_step(mx.array(ids), self.side.model, max_tokens=max_new):
            tokens.append(int(tok.item() if hasattr(tok, "item") else tok))
            stamps.append(time.perf_counter())
            logps.append(logp)
            if tokens[-1] in eos:
                break
        ttft, dec, total = _timing(t0, stamps)
        margins = [_top2_gap(np.array(lp.astype(mx.float32))) for lp in logps]
        return Generation(tokens, ttft, dec, margins, total)

    def reset_peak(self) -> None:
        self.mx.reset_peak_memory()

    def peak(self) -> tuple[int, str]:
        return int(self.mx.get_peak_memory()), "mlx peak memory"


class _Stamps:
    """A transformers streamer that only records when each new token arrives."""

    def __init__(self):
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        value.cpu()  # synchronise the device before stamping
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class TorchRunner:
    def __init__(self, side: Side):
        import torch

        self.torch = torch
        self.side = side
        self.device = side.info["device"]

    def logprobs(self, ids: list[int]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            logits = self.side.model(input_ids=x).logits[0].float()
            return torch.log_softmax(logits, dim=-1).cpu().numpy()

    def greedy(self, ids: list[int], max_new: int, eos: set[int]) -> Generation:
        torch = self.torch
        from transformers import GenerationConfig

        gc = GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=0,
                              eos_token_id=sorted(eos) or None, pad_token_id=min(eos) if eos else 0,
                              output_scores=True, return_dict_in_generate=True)
        streamer = _Stamps()
        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.side.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc,
                                           streamer=streamer)
        tokens = out.sequences[0, len(ids):].tolist()
        ttft, dec, total = _timing(t0, streamer.stamps)
        margins = [_top2_gap(torch.log_softmax(s[0].float(), -1).cpu().numpy()) for s in out.scores]
        return Generation(tokens, ttft, dec, margins, total)

    def reset_peak(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> tuple[int, str]:
        torch = self.torch
        if self.device.startswith("cuda"):
            return int(torch.cuda.max_memory_allocated()), "torch cuda max allocated"
        if self.device == "mps":  # MPS has no peak counter: the driver's current allocation after the run
            return int(torch.mps.driver_allocated_memory()), "torch mps driver allocated"
        return process_peak_rss(), "process peak RSS"


class PagedRunner:
    """The MLX model through the engine's paged KV cache (``engine/paged.py``), float or ``bits``-quantized.

    ``logprobs``: one teacher-forced chunk through the pool (``PagedBatch.score``), so every position
    attends to K/V as stored; ``greedy``: the engine's prefill then one decode step a token, each
    reading the cache back. One row at a time; the pool holds ``max_tokens`` tokens (+ a block)."""

    def __init__(self, side: Side, bits: int | None, group_size: int, max_tokens: int, block_size: int = 32):
        import mlx.core as mx

        from ..engine import paged
        from ..engine.kv_pool import KVPool

        self.mx, self.side = mx, side
        shapes, dtype = paged.layer_shapes(side.model)
        block_bytes = KVPool(shapes, dtype, 1, block_size, bits, group_size).block_bytes
        blocks = -(-(max_tokens + 1) // block_size) + 2  # + one spare, + the batch's trash block (if any)
        self.batch = paged.build(side.model, shapes, dtype, kv_budget=blocks * block_bytes, block_size=block_size,
                                 bits=bits, group_size=group_size, prefix_bytes=0, prefill_chunk=512, max_rows=1)
        self.bits, self.group_size, self.block_size = bits, group_size, block_size
        self.pool_bytes = self.batch.pool.num_blocks * self.batch.pool.block_bytes
        self.bytes_per_token = block_bytes / block_size

    def logprobs(self, ids: list[int]) -> np.ndarray:
        mx = self.mx
        logits = self.batch.score(ids).astype(mx.float32)
        return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    def greedy(self, ids: list[int], max_new: int, eos: set[int]) -> Generation:
        mx, b = self.mx, self.batch
        tokens, stamps, margins = [], [], []
        t0 = time.perf_counter()
        row = b.insert_row(list(ids), max_new, None, [])
        if row is None:
            raise ValueError(f"{len(ids)} + {max_new} tokens do not fit in the pool")
        try:
            while row.prefilling:
                b._prefill()
            for _ in range(max_new):
                logits = b._decode_logits([row])[0].astype(mx.float32)
                tok = mx.argmax(logits)
                mx.eval(tok, logits, b.pool.arrays())
                tokens.append(int(tok.item()))
                stamps.append(time.perf_counter())
                lp = np.array(logits - mx.logsumexp(logits))
                margins.append(_top2_gap(lp))
                row.n_kv += 1
                row.tokens.append(tokens[-1])
                if tokens[-1] in eos:
                    break
        finally:
            b.remove([row.uid])
        ttft, dec, total = _timing(t0, stamps)
        return Generation(tokens, ttft, dec, margins, total)

    def reset_peak(self) -> None:
        self.mx.reset_peak_memory()

    def peak(self) -> tuple[int, str]:
        return int(self.mx.get_peak_memory()), "mlx peak memory"

    def close(self) -> None:
        self.batch.close()
        self.batch = None


def runner_for(side: Side):
    return MlxRunner(side) if side.backend == "mlx" else TorchRunner(side)
