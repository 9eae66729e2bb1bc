"""Per-token grammar-mask cost of llguidance, xgrammar and outlines-core on CPU (issue 14).

For each vocabulary size and library: compile a JSON schema (and "any JSON
object"), then walk a valid answer token by token, computing the full
next-token mask before every token (the work a constrained decode step adds)
and checking the answer's own token is allowed. Prints one table: compile time,
and mask time per token (median, p90, max).

Vocabularies: the fixture's own tokenizer (SmolLM2, 49,152 tokens) and one of
Qwen2.5's size (151,936), built offline from the fixture's byte-level BPE by
adding 102,784 merges of existing token pairs (no hub here). Every library is
given the same HF tokenizer.

    python bench/grammar_mask.py [--libs llguidance,xgrammar,outlines_core] [--repeats 3]

The figures are wall-clock on whatever machine runs it; on a shared machine they
are upper bounds (say so when quoting them).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

QWEN_VOCAB = 151_936

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines", "poetry"],
          "address": {"city": "London", "zip": "W1"}}
ANY_OBJECT = {"type": "object"}
ANSWER_ANY = {"result": [1, 2.5, True, None], "note": "free-form JSON of any shape", "nested": {"k": "v"}}


def fixture_tokenizer():
    from transformers import AutoTokenizer

    from mlx_ray.fixtures import smollm2_hf_dir

    return AutoTokenizer.from_pretrained(str(smollm2_hf_dir()))


def widened_tokenizer(base, size: int, seed: int = 0):
    """``base`` (byte-level BPE) grown to ``size`` tokens by merges of random existing token pairs."""
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(base.backend_tokenizer.to_str())
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    n_added = len(spec.get("added_tokens", []))
    special = {t["content"] for t in spec.get("added_tokens", [])}
    pool = [t for t in vocab if t not in special and len(t) > 1]
    rng = random.Random(seed)
    next_id = max(vocab.values()) + 1
    target = size - max(0, n_added - sum(1 for t in special if t in vocab))
    while len(vocab) < target:
        a, b = rng.choice(pool), rng.choice(pool)
        if a + b in vocab:
            continue
        vocab[a + b] = next_id
        next_id += 1
        merges.append([a, b] if merges and isinstance(merges[0], list) else f"{a} {b}")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokenizer.json"
        path.write_text(json.dumps(spec))
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=base.eos_token)
    return tok


# ---- one adapter per library: compile(schema) -> matcher; matcher.mask() -> allowed(token) -------


class LLG:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance.hf

        self.t = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
        self.n = len(tok)

    def compile(self, schema):
        import llguidance
        import llguidance.numpy as lnp

        m = llguidance.LLMatcher(self.t, llguidance.LLMatcher.grammar_from_json_schema(schema))
        assert not m.is_error(), m.get_error()
        bm = lnp.allocate_token_bitmask(1, self.n)

        def mask():
            lnp.fill_next_token_bitmask(m, bm, 0)
            return lambda t: bool((int(bm[0, t // 32]) >> (t % 32)) & 1)

        def consume(t):
            assert m.consume_token(t), m.get_error()

        return mask, consume


class XGR:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar as xgr

        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.n = len(tok)

    def compile(self, schema):
        import xgrammar as xgr

        m = xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema)))
        bm = xgr.allocate_token_bitmask(1, self.n)

        def mask():
            m.fill_next_token_bitmask(bm)
            return lambda t: bool((int(bm[0, t // 32]) >> (t % 32)) & 1)

        def consume(t):
            assert m.accept_token(t)

        return mask, consume


class OC:
    name = "outlines_core"

    def __init__(self, tok):
        from outlines_core import Vocabulary

        self.n = len(tok)
        eos = tok.eos_token_id
        toks: dict[str, list[int]] = {}
        for i in range(len(tok)):
            if i == eos:
                continue
            s = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)])
            toks.setdefault(s, []).append(i)
        self.vocab = Vocabulary(eos, toks)

    def compile(self, schema):
        import numpy as np
        from outlines_core import Guide, Index
        from outlines_core.json_schema import build_regex_from_schema

        g = Guide(Index(build_regex_from_schema(json.dumps(schema)), self.vocab))
        bm = np.zeros(((self.n + 31) // 32,), dtype=np.int32)

        def mask():
            g.write_mask_into(bm.ctypes.data, bm.size, 4)
            return lambda t: bool((int(bm[t // 32]) >> (t % 32)) & 1)

        def consume(t):
            g.advance(t)

        return mask, consume


LIBS = {c.name: c for c in (LLG, XGR, OC)}


def run(lib, tok, schema, answer) -> dict:
    ids = tok.encode(json.dumps(answer, separators=(",", ":")), add_special_tokens=False)
    t0 = time.perf_counter()
    mask, consume = lib.compile(schema)
    compile_s = time.perf_counter() - t0
    times = []
    for t in ids:
        t1 = time.perf_counter()
        allowed = mask()
        times.append(time.perf_counter() - t1)
        assert allowed(t), f"{lib.name}: the answer's token {t} ({tok.decode([t])!r}) is masked out"
        consume(t)
    return {"compile_s": compile_s, "mask_us": [x * 1e6 for x in times], "tokens": len(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = fixture_tokenizer()
    vocabs = [("SmolLM2", base), ("Qwen2.5-size", widened_tokenizer(base, QWEN_VOCAB))]
    rows = []
    for vname, tok in vocabs:
        for lname in args.libs.split(","):
            t0 = time.perf_counter()
            lib = LIBS[lname](tok)
            setup_s = time.perf_counter() - t0
            for gname, schema, answer in (("schema", SCHEMA, ANSWER), ("json_object", ANY_OBJECT, ANSWER_ANY)):
                res = [run(lib, tok, schema, answer) for _ in range(args.repeats)]
                us = sorted(x for r in res for x in r["mask_us"])
                rows.append((vname, len(tok), lname, gname, setup_s, statistics.median(r["compile_s"] for r in res),
                             res[0]["tokens"], statistics.median(us), us[int(0.9 * (len(us) - 1))], us[-1]))
    head = ("vocab", "size", "library", "grammar", "tokenizer s", "compile ms", "tokens", "mask p50 us",
            "p90 us", "max us")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join([r[0], f"{r[1]:,}", r[2], r[3], f"{r[4]:.2f}", f"{r[5] * 1e3:.1f}", str(r[6]),
                          f"{r[7]:.0f}", f"{r[8]:.0f}", f"{r[9]:.0f}"]))


if __name__ == "__main__":
    main()
