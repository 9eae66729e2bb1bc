"""``mlx-ray plan MODEL``: the memory plan the engine would start with, printed before anything loads.

MODEL is a cache name, a model directory, or a config.json alone (then the
weights are estimated from the config's shapes). ``--device`` plans for
another machine (a profile such as ``m4-pro-48gb``; ``--device list`` names
them). The plan is ``engine/memory.py``'s, the same function the engine runs
at start, so what it prints is what the engine does. Exit 2 when the model
does not fit, with one line that says what to change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _kv_bits(v: str):
    if v == "auto":
        return "auto"
    if v in ("none", "model"):
        return None
    if v in ("4", "8"):
        return int(v)
    raise argparse.ArgumentTypeError("choose auto, model (the model's dtype), 8 or 4")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a cache name, a model directory, or a config.json")
    p.add_argument("--device", default=None, help="a device profile (`--device list`), or local (default: this machine)")
    p.add_argument("--max-model-len", type=int, help="context per sequence (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--kv-bits", type=_kv_bits, default="auto", help="auto (default), model, 8 or 4")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill step (default 512)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def plan(model: str, device: str | None = None, max_model_len: int | None = None, max_num_seqs: int = 16,
         kv_bits="auto", prefill_chunk: int = 512):
    from .engine import device as devices
    from .engine import memory
    from .engine.loader import resolve_path

    path = Path(model).expanduser()
    if not (path.is_file() and path.suffix == ".json"):
        path = resolve_path(model)
    fp = memory.footprint(path)
    return memory.make_plan(fp, devices.resolve(device), max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                            kv_bits=kv_bits, prefill_chunk=prefill_chunk)


def main(args) -> int:
    from .engine import device as devices
    from .errors import BadRequest

    if args.device == "list":
        rows = [devices.local(), *devices.PROFILES.values()]
        if args.json:
            print(json.dumps([d.as_dict() for d in rows], indent=2))
        else:
            for d in rows:
                print(f"{'local' if d.source != 'profile' else d.name:<16} {d.memory_bytes / 2**30:6.0f} GiB  "
                      f"working set {d.working_set_bytes / 2**30:5.1f} GiB  {d.source}")
        return 0
    if not args.model:
        raise BadRequest("name a model (a cache name, a directory or a config.json), or pass --device list")
    got = plan(args.model, args.device, args.max_model_len, args.max_num_seqs, args.kv_bits, args.prefill_chunk)
    if args.json:
        print(json.dumps(got.as_dict(), indent=2))
    else:
        from .engine.memory import describe

        print(describe(got))
    return 0


DOCTOR_CONTEXT = 4096  # the context the doctor plans the largest cached model at (the seed's)


def doctor_check(cache_dir: str | None):
    """``mlx-ray doctor``'s memory-plan line: the largest cached model at 4k x 16 on this device, and what to raise."""
    import subprocess
    import sys

    from .conversion.cache import list_models
    from .engine import device as devices
    from .engine import memory
    from .worker.checks import FAIL, PASS, SKIP, WARN, Check

    models = list_models(cache_dir=cache_dir)
    if not models:
        return Check("memory-plan", SKIP, "no cached model to plan")
    big = max(models, key=lambda m: m.size)
    dev = devices.local()
    wired = ""
    if sys.platform == "darwin":
        got = subprocess.run(["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True, text=True, timeout=10)
        wired = f"; iogpu.wired_limit_mb={got.stdout.strip() or '?'} (0: macOS's default)"
    try:
        fp = memory.footprint(big.path)
    except memory.PlanError as e:
        return Check("memory-plan", SKIP, f"{big.name}: {e}")
    try:
        p = memory.make_plan(fp, dev, max_model_len=DOCTOR_CONTEXT)
    except memory.PlanError as e:
        return Check("memory-plan", FAIL, f"{big.name}: {e}", "use a smaller or more quantized model here")
    kv = "model-dtype" if p.kv_bits is None else f"{p.kv_bits}-bit"
    msg = (f"{big.name} at {p.max_model_len} x {p.max_num_seqs}: {p.full_length_seqs} full-length sequences, "
           f"{kv} KV, {p.left_for_os_bytes / 1e9:.1f} GB left for the OS; working set "
           f"{dev.working_set_bytes / 2**30:.1f} GiB ({dev.source}){wired}")
    raise_it = next((n for n in p.notes if "iogpu.wired_limit_mb=" in n), None)
    if raise_it:
        return Check("memory-plan", WARN, msg, raise_it.replace("`", ""))
    return Check("memory-plan", PASS, msg)
