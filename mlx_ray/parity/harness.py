"""Run one parity comparison and return its report dict (every number).

Order of work, chosen so that only one model is in memory at a time (a Mac
rarely holds a float32 torch copy and the MLX copy of a large model at once):

1. refuse early when the tokenizers or vocabularies differ (cheap: no weights);
2. torch: greedy continuation of every prompt (timed), teacher-forced
   log-probs of prompt + continuation, log-probs of the reference text;
3. MLX: the same on the same token ids;
4. compare, apply the thresholds of the level, write the verdict.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from tqdm import tqdm

from .. import blas, errors
from ..errors import BadRequest, EngineFault, MlxRayError
from . import backends, metrics, thresholds
from .prompts import Prompt, data_path, has_chat_template, load_prompts
from .runners import PagedRunner, runner_for

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


class KVUnsupported(MlxRayError):
    """``--kv-bits`` on a model the paged KV cache cannot take (exit 1: the question has no answer here)."""

    kind = "kv_unsupported_error"


def _mlx_vocab_size(config: dict) -> int | None:
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def check_tokenizers(torch_tok, mlx_tok, prompts: list[Prompt], ref_text: str) -> list[list[int]]:
    """Token ids of every prompt, after making sure both tokenizers agree; else BadRequest."""
    tv, mv = torch_tok.get_vocab(), mlx_tok.get_vocab()
    if tv != mv:
        diff = sorted(set(tv.items()) ^ set(mv.items()), key=lambda kv: kv[1])
        example = diff[0][0] if diff else "?"
        raise BadRequest(f"tokenizer mismatch: torch vocabulary has {len(tv)} entries, MLX {len(mv)}, "
                         f"{len({k for k, _ in diff})} differ (e.g. {example!r}); --hf and --mlx must be the same model")
    ids = []
    for p in prompts:
        a, b = p.token_ids(torch_tok), p.token_ids(mlx_tok)
        if a != b:
            raise BadRequest(f"tokenizer mismatch: prompt {p.name!r} encodes differently on torch and MLX "
                             "(normalizer or chat template differ); --hf and --mlx must be the same model")
        ids.append(a)
    if torch_tok.encode(ref_text[:2000]) != mlx_tok.encode(ref_text[:2000]):
        raise BadRequest("tokenizer mismatch: the reference text encodes differently on torch and MLX; "
                         "--hf and --mlx must be the same model")
    return ids


def check_vocab_sizes(torch_vocab: int | None, mlx_vocab: int | None, n_tokens: int) -> int:
    """Logit width to compare; refuse when the embeddings do not cover the same tokens."""
    if torch_vocab and mlx_vocab and torch_vocab != mlx_vocab and min(torch_vocab, mlx_vocab) < n_tokens:
        raise BadRequest(f"vocabulary size mismatch: torch model has {torch_vocab} logits, MLX {mlx_vocab}, "
                         f"tokenizer {n_tokens}; --hf and --mlx must be the same model")
    return min(v for v in (torch_vocab, mlx_vocab) if v) if (torch_vocab or mlx_vocab) else n_tokens


def _run_side(side, prompt_ids, ref_ids, max_new, eos, conts=None, desc="", run=None):
    """Greedy + log-probs + reference log-probs on one backend (``run``: a runner other than the side's own).
    ``conts``: teacher-force these continuations."""
    run = run or runner_for(side)
    run.greedy(prompt_ids[0][:8], 2, eos)  # warm-up: first-call compilation, allocator growth
    run.reset_peak()
    gens, logps = [], []
    for i, ids in enumerate(tqdm(prompt_ids, desc=desc, unit="prompt", leave=False)):
        gens.append(run.greedy(ids, max_new, eos))
        cont = (conts[i] if conts is not None else gens[-1].tokens)
        seq = ids + [t for t in cont if t not in eos]
        logps.append(run.logprobs(seq)[: len(seq)])
    ref_lp = run.logprobs(ref_ids)
    peak, peak_kind = run.peak()
    return gens, logps, ref_lp, {"peak_bytes": peak, "peak_kind": peak_kind}


def _latency(gens, prompt_ids, mem) -> dict:
    decs = [g.decode_tok_s for g in gens if g.decode_tok_s]
    return {"ttft_s": median(g.ttft_s for g in gens),
            "prefill_tok_s": median(len(ids) / g.ttft_s for g, ids in zip(gens, prompt_ids)),
            "decode_tok_s": median(decs) if decs else None, **mem}


def check_pageable(mlx_path: Path, bits: int) -> None:
    """Refuse ``--kv-bits`` on a model the paged cache cannot take (sliding windows, state caches), from its
    structure alone (lazy load: no weights read)."""
    from mlx_lm.utils import load_model

    from ..engine import paged

    model, _ = load_model(Path(mlx_path), lazy=True, strict=False)
    why = paged.unsupported(model)
    del model
    if why:
        raise KVUnsupported(f"--kv-bits {bits} needs the paged KV cache, which this model cannot use: {why}")


def _kv_side(m_side, bits, group_size, longest, prompt_ids, ref_ids, max_new, eos, conts) -> dict:
    """The MLX model again, through the paged cache quantized to ``bits``: greedy, log-probs, reference."""
    from ..engine import paged
    from ..engine.kv_pool import bytes_per_slot

    shapes, dtype = paged.layer_shapes(m_side.model)
    dims = sorted({s.head_dim for s in shapes})
    if any(d % group_size for d in dims):
        raise KVUnsupported(f"--kv-group-size {group_size} does not divide this model's head dim "
                            f"({', '.join(map(str, dims))}); use a smaller group")
    why = paged.check(m_side.model, shapes, dtype, None, group_size)  # the paged path itself, float: exact
    if why:
        raise KVUnsupported(f"--kv-bits {bits}: the paged KV cache fails its float probe on this model: {why}")
    # The engine's load-time probe at these bits (5% of the logit span): what serving with kv_bits would do
    refusal = paged.check(m_side.model, shapes, dtype, bits, group_size)
    run = PagedRunner(m_side, bits, group_size, longest)
    try:
        gens, lps, ref_lp, mem = _run_side(m_side, prompt_ids, ref_ids, max_new, eos, conts=conts,
                                           desc=f"mlx kv{bits}", run=run)
    finally:
        info = {"bits": bits, "group_size": group_size, "block_size": run.block_size, "dtype": str(dtype).replace(
            "mlx.core.", ""), "bytes_per_token": run.bytes_per_token, "pool_bytes": run.pool_bytes,
                "engine_refuses": refusal,
                "float_bytes_per_token": sum(bytes_per_slot(s, dtype, None, group_size) for s in shapes)}
        run.close()
    return {"info": info, "gens": gens, "lps": lps, "ref": ref_lp, "mem": mem}


def _greedy_block(pairs: list[dict]) -> dict:
    """Pool greedy comparisons: prompts identical, mean identical-prefix fraction, token match rate."""
    return {"prompts": len(pairs), "identical": sum(g["identical"] for g in pairs),
            "prefix_frac_mean": sum(g["prefix_frac"] for g in pairs) / len(pairs),
            "token_match_rate": sum(g["prefix_len"] for g in pairs)
            / max(1, sum(max(g["ref_len"], g["test_len"]) for g in pairs))}


def _kv_report(kv: dict, plist, t_gens, m_gens, t_lps, m_lps, t_ref, m_ref, ref_ids, width, tok) -> dict:
    """The quantized-KV MLX side against torch and against the float-KV MLX side (its ``ref`` there)."""
    vs_t, vs_f, g_t, g_f, prompts = [], [], [], [], []
    for p, tg, mg, kg, tl, ml, kl in zip(plist, t_gens, m_gens, kv["gens"], t_lps, m_lps, kv["lps"]):
        vs_t.append(metrics.position_stats(tl[:, :width], kl[:, :width]))
        vs_f.append(metrics.position_stats(ml[:, :width], kl[:, :width]))
        g_t.append(metrics.greedy_compare(tg.tokens, kg.tokens))
        g_f.append(metrics.greedy_compare(mg.tokens, kg.tokens))
        prompts.append({"name": p.name, "vs_torch": {"greedy": g_t[-1], "top1_agreement":
                                                     float(vs_t[-1]["top1"].mean())},
                        "vs_float": {"greedy": g_f[-1], "top1_agreement": float(vs_f[-1]["top1"].mean())},
                        "kv_text": tok.decode(kg.tokens)})
    ppl_t, ppl_f, ppl_k = (metrics.perplexity(x, ref_ids) for x in (t_ref, m_ref, kv["ref"]))
    return {**kv["info"],
            "vs_torch": {"logits": metrics.aggregate(vs_t), "greedy": _greedy_block(g_t),
                         "perplexity": {"torch": ppl_t, "kv": ppl_k, "ratio": ppl_k / ppl_t}},
            "vs_float": {"logits": {**metrics.aggregate(vs_f), **metrics.decisive_top1(vs_f)},
                         "greedy": _greedy_block(g_f),
                         "perplexity": {"float": ppl_f, "kv": ppl_k, "ratio": ppl_k / ppl_f}},
            "prompts": prompts}


_REFERENCE_MEMO: dict = {}  # one torch reference per process: comparing several MLX variants reuses it


def _torch_reference(hf, device, dtype, prompt_ids, ref_ids, max_new, eos):
    """The torch side's results; memoised in-process on everything that determines them."""
    key = (str(Path(hf).resolve()) if Path(hf).exists() else hf, device, dtype,
           tuple(map(tuple, prompt_ids)), tuple(ref_ids), max_new, tuple(sorted(eos)))
    if key in _REFERENCE_MEMO:
        info, *rest = _REFERENCE_MEMO[key]
        return ({**info, "reused": True}, *rest)
    args = (hf, device, dtype, prompt_ids, ref_ids, max_new, eos)
    result = _torch_in_child(args) if blas.preloaded_by_env() else torch_in_process(*args)
    _REFERENCE_MEMO.clear()
    _REFERENCE_MEMO[key] = result
    return result


def torch_in_process(hf, device, dtype, prompt_ids, ref_ids, max_new, eos):
    side = backends.load_torch(hf, device, dtype)
    info = dict(side.info)
    result = (info, *_run_side(side, prompt_ids, ref_ids, max_new, eos, desc="torch"))
    backends.free(side)
    return result


def _torch_in_child(args: tuple):
    """The torch side in a child process without MLX's OpenBLAS LD_PRELOAD (``torch_child.py``).

    Interposed into torch's process, that OpenBLAS slowed torch's CPU decode 5.8x
    here, which would make the latency section's torch figures a lie (the
    log-probs were unaffected). Results come back pickled: token ids, timings
    and float32 log-prob arrays, all plain data."""
    with tempfile.TemporaryDirectory(prefix="mlx-ray-parity-") as tmp:
        inp, out = Path(tmp) / "args.pkl", Path(tmp) / "result.pkl"
        inp.write_bytes(pickle.dumps(args))
        proc = subprocess.run([sys.executable, "-m", "mlx_ray.parity.torch_child", str(inp), str(out)],
                              env=blas.env_without_fast_blas(), stdout=subprocess.DEVNULL)
        if proc.returncode != 0 or not out.exists():
            raise EngineFault(f"the torch side failed in its own process (exit {proc.returncode}); "
                              "its messages are above")
        kind, value = pickle.loads(out.read_bytes())
    if kind == "error":  # the child's MlxRayError, as the same class
        name, message = value
        raise getattr(errors, name, EngineFault)(message)
    return value


def run_parity(hf: str, mlx: str, prompts: str | None = None, device: str | None = None,
               torch_dtype: str = "float32", max_new_tokens: int = 32, ppl_tokens: int = 512,
               thresholds_file: str | None = None, kv_bits: int | None = None, kv_group_size: int = 32) -> dict:
    """``kv_bits`` (4 or 8): also run the MLX model through the paged KV cache quantized to that many bits
    (per-group affine, ``kv_group_size``) and report it against torch and against the float-KV MLX side."""
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoConfig, AutoTokenizer

    if max_new_tokens < 1 or ppl_tokens < 2:
        raise BadRequest("--max-new-tokens must be >= 1 and --ppl-tokens >= 2")
    if kv_bits is not None and (kv_bits not in KV_BITS or kv_group_size not in KV_GROUP_SIZES):
        raise BadRequest(f"--kv-bits must be 4 or 8 and --kv-group-size 32, 64 or 128 "
                         f"(got {kv_bits}, {kv_group_size})")
    overrides = thresholds.load_overrides(thresholds_file)
    plist = load_prompts(prompts)
    mlx_path = backends.resolve_mlx_path(mlx)
    if kv_bits:
        check_pageable(mlx_path, kv_bits)  # before anything spends its minutes
    ref_text = data_path("reference.txt").read_text()
    try:
        torch_tok = AutoTokenizer.from_pretrained(hf)
        torch_vocab = AutoConfig.from_pretrained(hf).get_text_config().vocab_size
    except OSError as e:
        raise BadRequest(f"transformers cannot load {hf!r}: {str(e).splitlines()[0]}") from None
    try:
        mlx_tok = load_tokenizer(mlx_path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on a bad tokenizer.json
        raise BadRequest(f"cannot load the MLX model's tokenizer from {mlx_path}: {str(e).splitlines()[0]}") from None
    raw_chat = any(p.messages is not None for p in plist) and not (
        has_chat_template(torch_tok) and has_chat_template(mlx_tok))
    if raw_chat:  # a base model: its chat prompts as raw text (applying a missing template would raise)
        plist = [p.as_raw() for p in plist]
    prompt_ids = check_tokenizers(torch_tok, mlx_tok, plist, ref_text)
    mlx_config = json.loads((mlx_path / "config.json").read_text())
    width = check_vocab_sizes(torch_vocab, _mlx_vocab_size(mlx_config), len(torch_tok.get_vocab()))
    ref_ids = torch_tok.encode(ref_text)[:ppl_tokens]
    eos = set(mlx_tok.eos_token_ids or []) | ({torch_tok.eos_token_id} if torch_tok.eos_token_id is not None else set())

    t_info, t_gens, t_lps, t_ref, t_mem = _torch_reference(hf, device, torch_dtype, prompt_ids, ref_ids,
                                                           max_new_tokens, eos)

    m_side = backends.load_mlx(str(mlx_path))
    m_info = dict(m_side.info)
    m_gens, m_lps, m_ref, m_mem = _run_side(m_side, prompt_ids, ref_ids, max_new_tokens, eos,
                                            conts=[g.tokens for g in t_gens], desc="mlx")
    kv_side = None
    if kv_bits:
        longest = max([len(ids) + max_new_tokens for ids in prompt_ids] + [len(ref_ids)])
        kv_side = _kv_side(m_side, kv_bits, kv_group_size, longest, prompt_ids, ref_ids, max_new_tokens, eos,
                           [g.tokens for g in t_gens])
    backends.free(m_side)

    per_prompt, stats = [], []
    for p, ids, tg, mg, tl, ml in zip(plist, prompt_ids, t_gens, m_gens, t_lps, m_lps):
        st = metrics.position_stats(tl[:, :width], ml[:, :width])
        stats.append(st)
        g = metrics.greedy_compare(tg.tokens, mg.tokens)
        entry = {"name": p.name, "prompt_tokens": len(ids), "logits": metrics.aggregate([st]), "greedy": g,
                 "torch_text": torch_tok.decode(tg.tokens), "mlx_text": torch_tok.decode(mg.tokens)}
        if g["divergence_at"] is not None:
            at = g["divergence_at"]
            entry["divergence"] = {
                "torch": metrics.around(torch_tok, tg.tokens, at), "mlx": metrics.around(torch_tok, mg.tokens, at),
                "torch_top2_gap": tg.margins[at] if at < len(tg.margins) else None,
                "mlx_top2_gap": mg.margins[at] if at < len(mg.margins) else None}
        per_prompt.append(entry)
    ppl_t, ppl_m = metrics.perplexity(t_ref, ref_ids), metrics.perplexity(m_ref, ref_ids)
    report = {
        "kind": "parity", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": backends.environment(), "torch": t_info, "mlx": m_info,
        "settings": {"hf": hf, "mlx": mlx, "prompts": prompts or "built-in", "max_new_tokens": max_new_tokens,
                     "ppl_tokens": len(ref_ids), "thresholds_file": thresholds_file,
                     "chat_prompts": "raw text (no chat template)" if raw_chat else "chat template"},
        "logits": metrics.aggregate(stats),
        "greedy": {"prompts": len(plist), "identical": sum(e["greedy"]["identical"] for e in per_prompt),
                   "prefix_frac_mean": sum(e["greedy"]["prefix_frac"] for e in per_prompt) / len(per_prompt)},
        "perplexity": {"tokens": len(ref_ids), "torch": ppl_t, "mlx": ppl_m, "ratio": ppl_m / ppl_t},
        "latency": {"torch": _latency(t_gens, prompt_ids, t_mem), "mlx": _latency(m_gens, prompt_ids, m_mem)},
        "prompts": per_prompt,
    }
    if kv_side:
        report["settings"].update(kv_bits=kv_bits, kv_group_size=kv_group_size)
        report["greedy"]["token_match_rate"] = _greedy_block([e["greedy"] for e in per_prompt])["token_match_rate"]
        report["kv"] = _kv_report(kv_side, plist, t_gens, m_gens, t_lps, m_lps, t_ref, m_ref, ref_ids, width,
                                  torch_tok)
        report["latency"]["mlx_kv"] = _latency(kv_side["gens"], prompt_ids, kv_side["mem"])
    level = thresholds.level_of(m_info, torch_dtype)
    limits = thresholds.thresholds_for(level, overrides)
    checks = thresholds.evaluate(report, limits)
    failed = [c["name"] for c in checks if not c["passed"]]
    report.update(level=level, thresholds=limits, checks=checks, passed=not failed,
                  verdict=(f"PASS: MLX {m_info['quantization']} matches torch {torch_dtype} within the {level} bounds"
                           if not failed else
                           f"FAIL: {', '.join(failed)} outside the {level} bounds (MLX {m_info['quantization']} "
                           f"vs torch {torch_dtype})"))
    return report


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1, ensure_ascii=False))
