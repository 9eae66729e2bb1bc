"""Microbenchmark: the qmm_cpu kernel against ``mx.quantized_matmul`` and float32 OpenBLAS matmul.

    python bench/kernel_micro.py [--m 1,16] [--reps 30] [--ref-reps 3] [--quick] [--prefill] [--json PATH]

For each weight shape (the fixture's 576x576, 1536x576, 576x1536, 49152x576 and
4096x4096, 14336x4096), at M=1 and M=16, affine q4-g64 with bfloat16 x, scales
and biases (what mlx-lm checkpoints hold):

* **kernel**: ``mlx_ray.kernels.qmm`` forced to the C++ kernel;
* **mlx**: ``mx.quantized_matmul`` (MLX's own CPU op);
* **f32 blas**: ``x @ w.T`` in float32 with the weights dequantized, through
  MLX's matmul on the preloaded OpenBLAS (the script re-execs itself with it).

Reported: median ms (and min, and the process CPU time), weight GB/s (packed weights + scales + biases,
or the float32 matrix for BLAS, read once per call), and that rate as a
fraction of the machine's read bandwidth measured with NumPy (1 GiB buffer,
one thread and one thread per CPU, the better of the two), median against
median and best against best. ``--prefill``
adds a sweep of M=32..512 comparing the kernel's own tiles with its
dequantize + OpenBLAS sgemm path (the crossover sets ``MLX_RAY_QMM_BLAS_MIN_M``).

The machine is shared: the load average before and after is recorded, timings
are medians of ``--reps`` runs, and the spread (min) is shown. Treat small
differences as noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

from mlx_ray.blas import loaded_blas, reexec_with_fast_blas

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096), (14336, 4096)]
OUT = Path(__file__).parent / "out" / "kernel_micro.json"


def active_status(kernel) -> dict | None:
    """The kernel's status when it is active; else None, having said why on stderr."""
    st = kernel.status()
    if not st["active"]:
        print(f"{st['name']} kernel inactive: {st['reason']}", file=sys.stderr)
        return None
    return st


def timeit(fn, reps: int) -> tuple[float, float, float]:
    """(median wall, min wall, median process CPU) seconds of fn(), after one warm-up call.

    CPU time (all threads of this process) is what the work costs regardless of
    how much of the shared machine we got; wall time is what a caller waits.
    """
    fn()
    ts, cs = [], []
    for _ in range(reps):
        c, t = time.process_time(), time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return statistics.median(ts), min(ts), statistics.median(cs)


def read_bandwidth(reps: int = 7) -> dict:
    """NumPy read bandwidth over a 1 GiB float32 buffer: one thread, and one per CPU.

    Reports the median-based figure and the best case (min time), since the
    kernel is reported both ways too.
    """
    import numpy as np

    a = np.ones(1 << 28, dtype=np.float32)
    single = timeit(lambda: a.max(), reps)
    n = os.cpu_count() or 1
    parts = np.array_split(a, n)

    def threaded():
        th = [threading.Thread(target=p.max) for p in parts]  # ufunc reductions release the GIL
        for t in th:
            t.start()
        for t in th:
            t.join()

    multi = timeit(threaded, reps)
    med = {"1 thread": a.nbytes / single[0] / 1e9, f"{n} threads": a.nbytes / multi[0] / 1e9}
    best = {"1 thread": a.nbytes / single[1] / 1e9, f"{n} threads": a.nbytes / multi[1] / 1e9}
    del a
    return {"gb_s": max(med.values()), "best_gb_s": max(best.values()), "median": med, "best": best}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "blas": loaded_blas()}


def bench_shape(n: int, k: int, m: int, args, qmm, mx) -> dict:
    mx.random.seed(0)
    w = mx.random.normal((n, k)) * 0.02
    wq, s, b = mx.quantize(w, group_size=args.group_size, bits=args.bits)
    s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
    wf = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=args.group_size, bits=args.bits)
    x = mx.random.normal((m, k)).astype(mx.bfloat16)
    xf = x.astype(mx.float32)
    mx.eval(wq, s, b, wf, x, xf)
    del w
    q_bytes = wq.nbytes + s.nbytes + b.nbytes

    def run_kernel():
        with qmm.force("kernel"):
            mx.eval(qmm.quantized_matmul(x, wq, s, b, group_size=args.group_size, bits=args.bits))

    def run_mlx():
        mx.eval(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=args.group_size, bits=args.bits))

    def run_blas():
        mx.eval(xf @ wf.T)

    row = {"n": n, "k": k, "m": m, "q_bytes": q_bytes, "f32_bytes": wf.nbytes}
    big = n * k * m > 200_000_000
    sides = [("kernel", run_kernel, args.reps, q_bytes), ("blas_f32", run_blas, args.reps, wf.nbytes)]
    if not (args.quick and big):
        sides.append(("mlx", run_mlx, 1 if big else args.ref_reps, q_bytes))
    for name, fn, reps, nbytes in sides:
        med, best, cpu = timeit(fn, reps)
        row[name] = {"ms": med * 1e3, "min_ms": best * 1e3, "cpu_ms": cpu * 1e3, "gb_s": nbytes / med / 1e9,
                     "best_gb_s": nbytes / best / 1e9}
    return row


def bench_prefill(args, qmm, mx) -> list[dict]:
    ext = qmm._get_state().ext
    if ext.blas() != "openblas":
        print("(prefill sweep skipped: OpenBLAS is not loaded)", file=sys.stderr)
        return []
    rows, old = [], ext.blas_min_m()
    try:
        for n, k in [(1536, 576), (576, 1536), (4096, 4096)]:
            wq, s, b = mx.quantize(mx.random.normal((n, k)) * 0.02, group_size=args.group_size, bits=args.bits)
            s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
            for m in (32, 64, 128, 256, 512):
                x = mx.random.normal((m, k)).astype(mx.bfloat16)
                mx.eval(wq, s, b, x)
                row = {"n": n, "k": k, "m": m}
                for name, min_m in (("tiles", 0), ("dequant_sgemm", 1)):
                    ext.set_blas_min_m(min_m)
                    med, _, _ = timeit(lambda: mx.eval(ext.quantized_matmul(x, wq, s, b, group_size=args.group_size,
                                                                          bits=args.bits)), max(3, args.reps // 5))
                    row[name] = {"ms": med * 1e3, "gflop_s": 2 * n * k * m / med / 1e9}
                rows.append(row)
    finally:
        ext.set_blas_min_m(old)
    return rows


def table(report: dict) -> str:
    from mlx_ray.bench.table import markdown_table

    bw, bw_best = report["bandwidth"]["gb_s"], report["bandwidth"]["best_gb_s"]
    rows = []
    for r in report["rows"]:
        k, ml, bl = r["kernel"], r.get("mlx"), r["blas_f32"]
        rows.append([f"{r['n']}x{r['k']}", r["m"], k["ms"], k["min_ms"], k["cpu_ms"], k["gb_s"], k["gb_s"] / bw,
                     k["best_gb_s"] / bw_best, ml["ms"] if ml else None, (ml["ms"] / k["ms"]) if ml else None,
                     bl["ms"], bl["gb_s"]])
    out = [markdown_table(["N x K", "M", "kernel ms", "kernel min", "kernel cpu ms", "kernel GB/s", "of bw",
                           "of bw (best/best)", "mlx ms", "speed-up", "f32 blas ms", "blas GB/s"], rows)]
    if report.get("prefill"):
        prow = [[f"{r['n']}x{r['k']}", r["m"], r["tiles"]["ms"], r["tiles"]["gflop_s"], r["dequant_sgemm"]["ms"],
                 r["dequant_sgemm"]["gflop_s"]] for r in report["prefill"]]
        out += ["", markdown_table(["N x K", "M", "tiles ms", "tiles GFLOP/s", "dequant+sgemm ms",
                                    "sgemm GFLOP/s"], prow)]
    return "\n".join(out)


def main(argv=None) -> int:
    reexec_with_fast_blas()  # float32 matmul on OpenBLAS, as mlx-ray runs it
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="1,16", help="comma list of M (rows of x)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--ref-reps", type=int, default=3, help="repetitions of MLX's own (slow) op")
    p.add_argument("--quick", action="store_true", help="skip MLX's own op on the big products")
    p.add_argument("--prefill", action="store_true", help="also sweep large M: kernel tiles vs dequantize+sgemm")
    p.add_argument("--json", type=Path, default=OUT)
    args = p.parse_args(argv)

    import mlx.core as mx

    from mlx_ray.kernels import qmm

    st = active_status(qmm)
    if st is None:
        return 1
    report = {"machine": machine(), "kernel": st, "load_before": os.getloadavg(), "bits": args.bits,
              "group_size": args.group_size, "dtype": "bfloat16"}
    print(f"measuring read bandwidth ... ", end="", flush=True, file=sys.stderr)
    report["bandwidth"] = read_bandwidth()
    report["bandwidth_gb_s"] = report["bandwidth"]["gb_s"]
    print(f"{report['bandwidth_gb_s']:.1f} GB/s (best {report['bandwidth']['best_gb_s']:.1f})", file=sys.stderr)
    rows = []
    for m in (int(v) for v in args.m.split(",")):
        for n, k in SHAPES:
            print(f"  {n}x{k} M={m}", file=sys.stderr)
            rows.append(bench_shape(n, k, m, args, qmm, mx))
    report["rows"] = rows
    if args.prefill:
        report["prefill"] = bench_prefill(args, qmm, mx)
    report["load_after"] = os.getloadavg()
    print(f"\n{report['machine']['cpu']}, {report['machine']['cpus']} CPUs, {st['reason']}; "
          f"read bandwidth {report['bandwidth_gb_s']:.1f} GB/s median, {report['bandwidth']['best_gb_s']:.1f} best "
          f"(NumPy); load avg before/after "
          f"{report['load_before'][0]:.1f}/{report['load_after'][0]:.1f}\n")
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
