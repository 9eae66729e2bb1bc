"""The parity report as Markdown: what ran where, the checks, greedy, latency, verdict."""

from __future__ import annotations

from ..bench.table import fmt, markdown_table

CHECK_LABELS = {
    "top1_min": "top-1 agreement", "top5_min": "top-5 overlap", "kl_mean_max": "KL mean (nats)",
    "kl_p99_max": "KL p99 (nats)", "max_abs_diff_max": "max abs logprob diff", "ppl_ratio_max": "perplexity ratio",
    "greedy_prefix_min": "greedy identical-prefix fraction",
}


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def header(r: dict) -> list[str]:
    env, t, m = r["environment"], r["torch"], r["mlx"]
    v = env["versions"]
    return [
        f"- torch: `{t['path']}` on **{t['device']}**, {t['dtype']} (torch {v['torch']}, transformers "
        f"{v['transformers']}{', %d threads' % t['threads'] if t.get('threads') else ''}"
        f"{'; reference reused from an earlier run in this process' if t.get('reused') else ''})",
        f"- MLX: `{m['path']}` on **{m['device']}**, {m['quantization']} ({m['dtype']} activations; mlx {v['mlx']}, "
        f"mlx-lm {v['mlx-lm']}; BLAS: {env['mlx_blas']}"
        f"{'; CPU quantized-matmul kernel' if m.get('cpu_kernel') else ''})",
        f"- machine: {env['platform']}, Python {env['python']}",
    ]


def _cmp_row(label: str, lg: dict, greedy: dict, ppl_ratio: float) -> list:
    return [label, fmt(lg["top1_agreement"], 4), f"{lg['top1_disagreements']}/{lg['positions']}",
            fmt(lg["top5_overlap"], 4), fmt(lg["kl_mean"]), fmt(lg["max_abs_diff"]), fmt(lg["mean_abs_diff"]),
            f"{greedy['identical']}/{greedy['prompts']}", fmt(greedy["token_match_rate"], 3), fmt(ppl_ratio, 4)]


def kv_section(r: dict) -> list[str]:
    """The quantized KV cache: both MLX sides against torch, and quantized against float KV directly."""
    kv, lg, gr = r["kv"], r["logits"], r["greedy"]
    vf = kv["vs_float"]["logits"]
    q = f"{kv['bits']}-bit KV"
    rows = [_cmp_row("MLX float KV vs torch", lg, gr, r["perplexity"]["ratio"]),
            _cmp_row(f"MLX {q} vs torch", kv["vs_torch"]["logits"], kv["vs_torch"]["greedy"],
                     kv["vs_torch"]["perplexity"]["ratio"]),
            _cmp_row(f"MLX {q} vs MLX float KV", kv["vs_float"]["logits"], kv["vs_float"]["greedy"],
                     kv["vs_float"]["perplexity"]["ratio"])]
    lines = [f"## Quantized KV cache ({kv['bits']}-bit affine, group {kv['group_size']})", "",
             markdown_table(["comparison", "top-1", "top-1 misses", "top-5 overlap", "KL mean",
                             "max abs logprob diff", "mean abs logprob diff", "greedy identical",
                             "greedy token match", "ppl ratio"], rows), ""]
    lines += [f"Float KV is mlx-lm's cache (the served path without `kv_bits`); the {q} side runs the engine's "
              f"paged cache (blocks of {kv['block_size']}): teacher-forced positions attend to K/V as stored, "
              f"greedy decodes through it. Greedy token match: identical-prefix tokens / continuation tokens. "
              f"KV bytes per token: {kv['bytes_per_token']:.0f} ({q}) vs {kv['float_bytes_per_token']:.0f} "
              f"({kv['dtype']}), {kv['float_bytes_per_token'] / kv['bytes_per_token']:.2f}x smaller. "
              f"Against float KV, {vf['top1_disagreements_near_tie']} of the {vf['top1_disagreements']} top-1 misses "
              f"are near-ties (float top-1/top-2 gap < {fmt(vf['near_tie_nats'])} nats, {vf['near_tie_positions']} "
              f"positions); top-1 elsewhere {fmt(vf['top1_agreement_decisive'], 4)}.", ""]
    if kv.get("engine_refuses"):
        lines += [f"**The engine refuses `kv_bits={kv['bits']}` (group {kv['group_size']}) for this model** at load: "
                  f"its probe finds {kv['engine_refuses']}.", ""]
    for c in kv.get("checks", []):
        lines.append(f"- {CHECK_LABELS.get(c['name'], c['name'])}: {fmt(c['value'], 4)} "
                     f"({'≤' if c['name'].endswith('_max') else '≥'} {fmt(c['limit'], 4)}) "
                     f"{'pass' if c['passed'] else '**FAIL**'}")
    if kv.get("checks"):
        lines.append("")
    return lines


def markdown(r: dict) -> str:
    lines = ["# mlx-ray parity report", ""] + header(r)
    s = r["settings"]
    lines += [f"- prompts: {s['prompts']} ({len(r['prompts'])}), greedy up to {s['max_new_tokens']} new tokens, "
              f"perplexity on {s['ppl_tokens']} reference tokens; level **{r['level']}**", ""]
    lg = r["logits"]
    rows = [[CHECK_LABELS[c["name"]], fmt(c["value"], 4), ("≤ " if c["name"].endswith("_max") else "≥ ")
             + fmt(c["limit"], 4), "pass" if c["passed"] else "**FAIL**"] for c in r["checks"]]
    lines += ["## Checks", "", markdown_table(["metric", "value", "threshold", "result"], rows), "",
              f"Teacher-forced over {lg['positions']} positions: mean abs logprob diff {fmt(lg['mean_abs_diff'])}, "
              f"max {fmt(lg['max_abs_diff'])}; KL max {fmt(lg['kl_max'])}; {lg['top1_disagreements']} top-1 "
              f"disagreements. Perplexity: torch {fmt(r['perplexity']['torch'], 4)}, MLX "
              f"{fmt(r['perplexity']['mlx'], 4)}.", ""]
    if r.get("kv"):
        lines += kv_section(r)
    rows = []
    for p in r["prompts"]:
        g = p["greedy"]
        where = "identical" if g["identical"] else f"token {g['divergence_at']}"
        rows.append([p["name"], p["prompt_tokens"], f"{g['prefix_len']}/{max(g['ref_len'], g['test_len'])}", where,
                     fmt(p["logits"]["top1_agreement"], 4), fmt(p["logits"]["kl_mean"])])
    lines += ["## Greedy generation", "",
              markdown_table(["prompt", "prompt tokens", "identical prefix", "first divergence", "top-1", "KL mean"],
                             rows), ""]
    for p in r["prompts"]:
        d = p.get("divergence")
        if d:
            lines.append(f"- `{p['name']}` diverges after {d['torch']['before']!r}: torch {d['torch']['after']!r} "
                         f"vs MLX {d['mlx']['after']!r} (top-1/top-2 gap there: torch {fmt(d['torch_top2_gap'])}, "
                         f"MLX {fmt(d['mlx_top2_gap'])} nats)")
    lt, lm = r["latency"]["torch"], r["latency"]["mlx"]

    def ratio(a, b):
        return fmt(a / b) if a and b else "-"

    rows = [["time to first token (median)", f"{fmt(lt['ttft_s'] * 1000)} ms", f"{fmt(lm['ttft_s'] * 1000)} ms",
             ratio(lt["ttft_s"], lm["ttft_s"])],
            ["decode tok/s (median)", fmt(lt["decode_tok_s"]), fmt(lm["decode_tok_s"]),
             ratio(lm["decode_tok_s"], lt["decode_tok_s"])],
            ["peak memory", f"{_mib(lt['peak_bytes'])} ({lt['peak_kind']})", f"{_mib(lm['peak_bytes'])} "
             f"({lm['peak_kind']})", "-"]]
    head = ["", "torch", "MLX", "MLX speed-up"]
    lk = r["latency"].get("mlx_kv")
    if lk:  # the paged step is the engine's, not mlx-lm's generate loop: a different path, shown beside it
        head.append(f"MLX {r['kv']['bits']}-bit KV")
        rows[0].append(f"{fmt(lk['ttft_s'] * 1000)} ms")
        rows[1].append(fmt(lk["decode_tok_s"]))
        rows[2].append(f"{_mib(lk['peak_bytes'])} ({lk['peak_kind']})")
    lines += ["", "## Latency", "", markdown_table(head, rows), "",
              f"**Verdict: {r['verdict']}**", ""]
    return "\n".join(lines)
