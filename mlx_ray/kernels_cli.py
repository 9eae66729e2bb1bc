"""``mlx-ray kernels selftest | check``: prove the kernels on this machine.

``selftest`` runs every kernel against its twin on this device, across its
"device" cases, and prints kernel ms / twin ms / speed-up / max error per
case: each Metal kernel on a Metal device (this also refreshes its cached
verdict, mlx_ray/kernels/gate.py), each kernel's C++ CPU path, and the CPU matmul
kernels (``qmm_cpu`` against ``mx.quantized_matmul``, ``dense_cpu`` against
``x @ w.T``) and ``paged_attention_cpu`` against its twin (gather + sdpa). Without Metal it says so and tests what it can. Exit 1 when a
kernel does not match its twin.

``check`` type-checks every Metal kernel's generated source and runs it under
the CPU emulator against its twin on the "emulate" cases
(``kernels.metal_emu.check_all``). Exit 1 on any failure.

``add_kernels_flag`` / ``apply_kernels_flag``: ``--kernels on|off`` for
``mlx-ray bench`` and ``mlx-ray parity``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

NO_METAL_NOTE = "no Metal device: ran the twins and the CPU kernels; Metal kernels not tested here"
CPU_WARMUP, CPU_REPS = 1, 3


# ------------------------------------------------------------ --kernels on|off

def add_kernels_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", choices=["on", "off"],
                        help="off: every mlx-ray kernel off for this run (MLX_RAY_KERNELS=0: MLX's own ops); "
                             "on: kernels where their gates allow, even if MLX_RAY_KERNELS=0 is set "
                             "(default: as the environment says)")


def apply_kernels_flag(value: str | None) -> None:
    """Set the switch for this process and its children, before any kernel is used (and re-read it if one was)."""
    if value is None:
        return
    os.environ["MLX_RAY_KERNELS"] = "0" if value == "off" else "1"
    for module in ("mlx_ray.kernels.qmm", "mlx_ray.kernels.dense", "mlx_ray.kernels.gate"):
        mod = sys.modules.get(module)
        if mod is not None:
            mod.reset()


# ------------------------------------------------------------------ CPU specs

def cpu_specs() -> list:
    """The CPU matmul kernels as specs (their twins are MLX's ops), or (name, reason) when not active."""
    import mlx.core as mx

    from .kernels import dense, qmm, skinny_qmm
    from .kernels._common import Case, KernelSpec

    out = []
    q = qmm.status()
    if q["active"]:
        def qmm_cpu(x, w, scales, biases, group_size=64, bits=4):
            with qmm.force("kernel"):
                return qmm.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)

        def qmm_twin(x, w, scales, biases, group_size=64, bits=4):
            return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)

        def qmm_cases(kind):
            shapes = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]
            return [skinny_qmm.make_case(m, n, k, bits, gs, mx.float32)
                    for n, k in shapes for bits, gs in ((4, 64), (8, 32), (4, 128)) for m in (1, 4, 16)
                    if k % gs == 0 and not (n == 4096 and (m > 4 or bits != 4))]

        out.append(KernelSpec("qmm_cpu", [], qmm_cpu, qmm_twin, qmm_cpu, qmm_cases, skinny_qmm.TOLERANCE,
                              skinny_qmm.check))
    else:
        out.append(("qmm_cpu", q["reason"]))
    d = dense.status()
    if d["active"]:
        def dense_cpu(x, w):
            with dense.force("kernel"):
                return dense.matmul_t(x, w)

        def dense_cases(kind):
            cases = []
            for n, k in ((576, 576), (1536, 576), (4096, 4096)):
                for wdt in (mx.float32, mx.bfloat16):
                    w = (mx.random.normal((n, k), key=mx.random.key(n + k)) * 0.05).astype(wdt)
                    for m in (1, 4, 16, 32):
                        x = mx.random.normal((m, k), key=mx.random.key(m))
                        cases.append(Case(f"M={m} {n}x{k} w {str(wdt).removeprefix('mlx.core.')}", (x, w)))
            return cases

        out.append(KernelSpec("dense_cpu", [], dense_cpu, lambda x, w: x @ w.T, dense_cpu, dense_cases,
                              skinny_qmm.TOLERANCE, skinny_qmm.check))
    else:
        out.append(("dense_cpu", d["reason"]))
    out.append(_paged_spec())
    return out


def _paged_spec():
    """paged_attention_cpu against its twin (gather + sdpa), or (name, reason) when not active."""
    import mlx.core as mx

    from .kernels import paged_attention as pa
    from .kernels._common import Case, KernelSpec

    st = pa.status()
    if not st["active"]:
        return pa.CPU_NAME, st["reason"]

    def cpu(q, k, v, bt, cl, scale, bits):
        return pa.paged_attention(q, k, v, bt, cl, scale=scale, block_size=32, bits=bits, impl="cpu")

    def twin(q, k, v, bt, cl, scale, bits):
        return pa.twin(q, k, v, bt, cl, scale=scale, block_size=32, bits=bits)

    def cases(kind):
        out = []
        for (hq, hkv, d), B, L, ctx, bits in (((9, 3, 64), 1, 1, 1000, None), ((9, 3, 64), 16, 1, 1000, None),
                                             ((9, 3, 64), 16, 1, 1000, 8), ((40, 8, 128), 4, 1, 2000, 8),
                                             ((9, 3, 64), 1, 128, 1000, None)):
            mb = -(-ctx // 32)
            keys = mx.random.split(mx.random.key(B + L + d), 3)
            k = mx.random.normal((B * mb * 32, hkv, d), key=keys[0])
            v = mx.random.normal((B * mb * 32, hkv, d), key=keys[1])
            if bits:
                def qz(x):
                    w, s, b = mx.quantize(x.reshape(-1, d), group_size=64, bits=bits)
                    return tuple(a.reshape(x.shape[0], hkv, -1) for a in (w, s, b))
                k, v = qz(k), qz(v)
            bt = mx.random.permutation(B * mb, key=keys[2]).astype(mx.int32).reshape(B, mb)
            cl = mx.full((B,), ctx, dtype=mx.int32)
            q = mx.random.normal((B, hq, L, d), key=mx.random.key(L))
            label = f"B={B} L={L} ctx={ctx} Hq={hq} Hkv={hkv} D={d} {'f32' if bits is None else f'{bits}-bit'}"
            out.append(Case(label, (q, k, v, bt, cl, d ** -0.5, bits)))
        return out

    def check(outputs, reference):
        import numpy as np

        from .kernels._common import as_list

        got, want = np.array(as_list(outputs)[0]), np.array(as_list(reference)[0])
        err = float(np.abs(got - want).max())
        return None if err <= 1e-5 * max(1.0, float(np.abs(want).max())) else f"max err {err:.3g} > 1e-5"

    return KernelSpec(pa.CPU_NAME, [], cpu, twin, cpu, cases, "float32: 1e-5 relative to the twin", check)


# ------------------------------------------------------------------- selftest

def _rows(v, kernel: str, path: str) -> list[dict]:
    if not v.cases:  # nothing ran: the cases themselves failed
        return [{"kernel": kernel, "path": path, "label": "-", "problem": v.reason}]
    return [{"kernel": kernel, "path": path, **r} for r in v.cases]


def selftest(quick: bool = False) -> dict:
    """Every kernel against its twin here; the report (see the module docstring). ``quick``: one warm-up and one
    timed run per case (every case still checked against its twin; the timings are rough)."""
    import mlx.core as mx

    from .kernels import _common, gate

    device = gate.current_device()
    cpu = gate.Device("cpu", metal=False, mx_device=mx.cpu)
    report = {"device": device.name, "mlx": mx.__version__, "metal": device.metal, "rows": [], "verdicts": [],
              "inactive": {}, "skipped_modules": {}}
    if not device.metal:
        report["note"] = NO_METAL_NOTE
    warmup, reps = (1, 1) if quick else (CPU_WARMUP, CPU_REPS)
    for name, spec in _common.kernels().items():
        if device.metal:
            v = gate.verdict(spec, device=device, refresh=True)
            report["rows"] += _rows(v, name, "metal")
        else:
            v = gate.verdict(spec, device=device)
        report["verdicts"].append(v.as_dict())
        if spec.cpu_fn is not None:
            cv = gate.evaluate(spec, cpu, fast_fn=spec.cpu_fn, warmup=warmup, reps=reps,
                               stop_on_problem=False)
            report["rows"] += _rows(cv, name, "cpu")
    report["skipped_modules"] = dict(_common.SKIPPED)
    for spec in cpu_specs():
        if isinstance(spec, tuple):
            report["inactive"][spec[0]] = spec[1]
            continue
        cv = gate.evaluate(spec, cpu, warmup=warmup, reps=reps, stop_on_problem=False)
        report["rows"] += _rows(cv, spec.name, "cpu")
    mismatched = [r for r in report["rows"] if "problem" in r]
    mismatched += [v for v in report["verdicts"] if v["reason"].startswith(("mismatch", "cases failed"))]
    report["ok"] = not mismatched and not report["skipped_modules"]
    return report


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def render_selftest(report: dict) -> str:
    lines = [f"device {report['device']}, mlx {report['mlx']}"]
    if report.get("note"):
        lines.append(report["note"])
    lines.append("")
    head = ("kernel", "path", "case", "kernel ms", "twin ms", "speedup", "max err", "result")
    table = [head]
    for r in report["rows"]:
        table.append((r["kernel"], r["path"], r["label"], _fmt(r.get("kernel_ms"), ".3f"), _fmt(r.get("twin_ms"), ".3f"),
                      _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") is not None else ""),
                      _fmt(r.get("max_err"), ".2g"), "MISMATCH: " + r["problem"] if "problem" in r else "ok"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    lines.append("")
    lines.append("Metal kernels (verdict on this device):")
    for v in report["verdicts"]:
        lines.append(f"  {v['name']}: {'enabled' if v['enabled'] else 'off'}: {v['reason']}")
    for name, why in report["inactive"].items():
        lines.append(f"  {name}: not active here: {why}")
    for module, why in report["skipped_modules"].items():
        lines.append(f"  {module}: NOT REGISTERED: {why}")
    lines.append("selftest: " + ("ok" if report["ok"] else "FAILED"))
    return "\n".join(lines)


# ---------------------------------------------------------------------- check

def _row_failed(row: dict) -> bool:
    """A check_all row ``{kernel, case, typecheck, emulated, reason, ms}`` failed: a check False or a reason given."""
    if row.get("ok") is False or row.get("typecheck") is False or row.get("emulated") is False:
        return True
    return bool(row.get("reason"))


def check() -> dict:
    """The emulator's type-check + emulated run of every Metal kernel against its twin."""
    from .kernels import metal_emu

    rows = [r if isinstance(r, dict) else (r.as_dict() if hasattr(r, "as_dict") else vars(r))
            for r in metal_emu.check_all()]
    return {"rows": rows, "ok": bool(rows) and not any(_row_failed(r) for r in rows)}


def render_check(report: dict) -> str:
    rows = report["rows"]
    if not rows:
        return "check: no rows (no Metal kernel registered?)\ncheck: FAILED"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = [keys] + [[_cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.append("check: " + ("ok" if report["ok"] else "FAILED"))
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return format(v, ".3g")
    text = str(v).replace("\n", " ")
    return text if len(text) <= 100 else text[:97] + "..."


# ------------------------------------------------------------------------ CLI

def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="{selftest,check}", required=True)
    s = sub.add_parser("selftest", help="every kernel against its twin on this device: timings and verdicts")
    s.add_argument("--json", metavar="OUT", help="also write the report as JSON here")
    s.add_argument("--quick", action="store_true",
                   help="one timed run per case: every case still checked against its twin, timings rough")
    c = sub.add_parser("check", help="type-check every Metal kernel and run it under the CPU emulator against its twin")
    c.add_argument("--json", metavar="OUT", help="also write the rows as JSON here")


def main(args) -> int:
    report = selftest(quick=args.quick) if args.action == "selftest" else check()
    print(render_selftest(report) if args.action == "selftest" else render_check(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    sys.stdout.flush()
    return 0 if report["ok"] else 1
