"""Peak memory of `mlx-ray convert` against the largest source shard.

Writes a synthetic random llama (bf16, >= 1 GB by default, split into shards of
``--shard-mb``), converts it in a child process (`mlx-ray convert`, q4-g64 by
default) and reports the child's peak RSS (``ru_maxrss``) next to the largest
shard and the model size. A baseline child that only imports the same modules
gives the fixed cost of the interpreter, MLX, mlx-lm and transformers.
``--compare-mlx-lm`` also runs ``mlx_lm.convert`` on the same model.

    python bench/convert_memory.py                  # ~1.5 GB model, 256 MB shards
    python bench/convert_memory.py --layers 24      # ~2.7 GB
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_model(out: Path, layers: int, hidden: int, inter: int, vocab: int, shard_mb: int) -> tuple[int, int]:
    """Random llama in bf16 shards; returns (total bytes, largest shard bytes)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    heads = hidden // 64
    shapes = [("model.embed_tokens.weight", (vocab, hidden)), ("model.norm.weight", (hidden,)),
              ("lm_head.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (hidden, hidden)),
                   (p + "self_attn.v_proj.weight", (hidden, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    groups, cur, size = [], [], 0
    for name, shape in shapes:
        n = 2 * int(torch.tensor(shape).prod())
        if cur and size + n > shard_mb << 20:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    groups.append(cur)
    weight_map, largest, total = {}, 0, 0
    gen = torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.randn(shape, generator=gen) * (shape[-1] ** -0.5)).to(torch.bfloat16)
                   if len(shape) == 2 else torch.ones(shape, dtype=torch.bfloat16) for name, shape in group}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        sz = (out / fname).stat().st_size
        largest, total = max(largest, sz), total + sz
        weight_map.update({name: fname for name, _ in group})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
           "intermediate_size": inter, "vocab_size": vocab, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "max_position_embeddings": 4096, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
           "dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(cfg))
    # mlx_lm.convert insists on a tokenizer; borrow the fixture's (the vocab size does not matter here).
    from mlx_ray.fixtures import smollm2_hf_dir

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_hf_dir() / f, out / f)
    return total, largest


def peak_rss_of(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of a child process, via a wrapper that reports its own child's ru_maxrss."""
    wrapper = ("import resource, subprocess, sys, time; t = time.time(); "
               "rc = subprocess.call(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t, rc)")
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    kb, secs, rc = r.stdout.split()[-3:]
    if rc != "0":
        raise SystemExit(f"child failed ({rc}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return int(kb) * 1024, float(secs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--quant", default="--q-bits 4 --q-group-size 64", help="extra convert flags")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed afterwards)")
    ap.add_argument("--compare-mlx-lm", action="store_true", help="also measure mlx_lm.convert")
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="mlx-ray-convmem-"))
    try:
        src = work / "SyntheticLlama"
        t = time.time()
        total, largest = write_model(src, args.layers, args.hidden, args.intermediate, args.vocab, args.shard_mb)
        n_shards = len(list(src.glob("*.safetensors")))
        print(f"synthetic model: {total / 1e9:.2f} GB bf16 in {n_shards} shards, largest {largest / 1e6:.0f} MB "
              f"(written in {time.time() - t:.0f} s)")
        env_note = "LD_PRELOAD=" + os.environ.get("LD_PRELOAD", "")
        base, _ = peak_rss_of([sys.executable, "-c", "import mlx.core, mlx_lm.utils, mlx_ray.conversion.convert"])
        conv, secs = peak_rss_of([sys.executable, "-m", "mlx_ray.cli", "convert", str(src), "--cache-dir",
                                  str(work / "cache"), "--quiet", *args.quant.split()])
        out_size = sum(p.stat().st_size for p in (work / "cache").rglob("*.safetensors"))
        print(f"baseline (imports only):   peak RSS {base / 1e6:7.0f} MB")
        print(f"mlx-ray convert:           peak RSS {conv / 1e6:7.0f} MB in {secs:.0f} s "
              f"(output {out_size / 1e6:.0f} MB)")
        print(f"  above baseline:          {(conv - base) / 1e6:7.0f} MB = {(conv - base) / largest:.2f} x largest "
              f"shard, {(conv - base) / total:.2f} x model")
        if args.compare_mlx_lm:
            ref, rsecs = peak_rss_of([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src),
                                      "--mlx-path", str(work / "mlx_lm_out"), "-q"])
            print(f"mlx_lm.convert (for ref.): peak RSS {ref / 1e6:7.0f} MB in {rsecs:.0f} s = "
                  f"{(ref - base) / largest:.2f} x largest shard above baseline")
        print(f"({env_note or 'no LD_PRELOAD'}; ru_maxrss of the child; machine shared, so times are noisy)")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
