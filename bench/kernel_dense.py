"""Microbenchmark: the dense_cpu kernel against MLX's own matmul (OpenBLAS sgemm), by M.

    python bench/kernel_dense.py [--m 1,2,4,8,16,24,32,48,64] [--dtypes float32,bfloat16] [--reps 30] [--json PATH]

For the fixture's weight shapes (576x576, 1536x576, 576x1536, the 49152x576
tied head) and a 4096x4096 one, with float32 activations and weights in each
``--dtypes``: median ms of ``dense_matmul(x, w)`` and of ``x @ w.T`` (MLX's
matmul on the preloaded OpenBLAS; the script re-execs itself with it), the
kernel's weight read rate, and the speed-up. The last table gives, per shape and
dtype, the largest M at which the kernel is still faster: the default of
``MLX_RAY_DENSE_MAX_M`` comes from it.

The machine may be shared: timings are medians, and the load average before and
after is printed. Treat differences under ~10% as noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kernel_micro import active_status, machine, timeit

from mlx_ray.blas import reexec_with_fast_blas

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096)]
OUT = Path(__file__).parent / "out" / "kernel_dense.json"


def bench(n: int, k: int, m: int, dtype, reps: int, ext, mx) -> dict:
    mx.random.seed(0)
    w = (mx.random.normal((n, k)) * 0.02).astype(dtype)
    x = mx.random.normal((m, k))
    mx.eval(w, x)
    row = {"n": n, "k": k, "m": m, "dtype": str(dtype).split(".")[-1]}
    for name, fn in (("kernel", lambda: mx.eval(ext.dense_matmul(x, w))), ("mlx", lambda: mx.eval(x @ w.T))):
        med, best, cpu = timeit(fn, reps)
        row[name] = {"ms": med * 1e3, "min_ms": best * 1e3, "cpu_ms": cpu * 1e3, "gb_s": w.nbytes / med / 1e9}
    row["speedup"] = row["mlx"]["ms"] / row["kernel"]["ms"]
    return row


def crossover(rows: list[dict]) -> list[list]:
    """Per (shape, dtype): the largest M measured at which the kernel still wins."""
    out = {}
    for r in rows:
        key = (f"{r['n']}x{r['k']}", r["dtype"])
        out.setdefault(key, 0)
        if r["speedup"] > 1.0:
            out[key] = max(out[key], r["m"])
    return [[shape, dt, m or "never"] for (shape, dt), m in out.items()]


def main(argv=None) -> int:
    reexec_with_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="1,2,4,8,16,24,32,48,64", help="comma list of M (rows of x)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", type=Path, default=OUT)
    args = p.parse_args(argv)

    import mlx.core as mx

    from mlx_ray.bench.table import markdown_table
    from mlx_ray.kernels import dense

    st = active_status(dense)
    if st is None:
        return 1
    ext = dense._get_state().ext
    report = {"machine": machine(), "kernel": st, "load_before": os.getloadavg(), "rows": []}
    for dt in args.dtypes.split(","):
        for n, k in SHAPES:
            for m in (int(v) for v in args.m.split(",")):
                print(f"  {dt} {n}x{k} M={m}", file=sys.stderr)
                report["rows"].append(bench(n, k, m, getattr(mx, dt), args.reps, ext, mx))
    report["load_after"] = os.getloadavg()
    rows = [[f"{r['n']}x{r['k']}", r["dtype"], r["m"], r["kernel"]["ms"], r["kernel"]["gb_s"], r["mlx"]["ms"],
             r["speedup"]] for r in report["rows"]]
    print(f"\n{report['machine']['cpu']}, {report['machine']['cpus']} CPUs, {st['reason']}; load avg before/after "
          f"{report['load_before'][0]:.1f}/{report['load_after'][0]:.1f}\n")
    print(markdown_table(["N x K", "w dtype", "M", "kernel ms", "kernel GB/s", "mlx ms", "speed-up"], rows))
    report["crossover"] = crossover(report["rows"])
    print("\nlargest M where the kernel wins:\n" + markdown_table(["N x K", "w dtype", "M"], report["crossover"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
