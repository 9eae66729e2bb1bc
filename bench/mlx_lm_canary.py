"""Canary: does the engine still work on the newest mlx-lm?

    python bench/mlx_lm_canary.py [--mlx-lm SPEC] [--pre] [--tests FILE ...] [--skip-if-pinned] [--keep] [--json]

mlx-ray pins mlx-lm exactly (pyproject.toml) because the engine drives
``BatchGenerator`` internals (``GenerationBatch``'s private fields,
``StopSequences``) that mlx-lm changes without notice. This script tries the
next one before the pin moves:

1. creates a scratch venv (``uv venv --seed`` if uv is there, else ``venv``)
   with ``--system-site-packages``, so mlx, torch, ray, ... already installed
   are reused instead of downloaded;
2. ``pip install -U SPEC`` into it (default: ``mlx-lm``, the newest on PyPI),
   *with* dependency resolution: whatever the new mlx-lm needs that the system
   lacks (a newer mlx, transformers, ...) is installed into the venv and
   shadows the system copy, which is what a user's ``pip install -U mlx-lm``
   would get. On Linux a newer ``mlx`` gets its matching ``mlx-cpu`` backend;
3. uses this checkout of mlx-ray unchanged (the installed editable copy if it
   points here, else ``pip install --no-deps -e .`` into the venv without the
   C++ kernels), and checks that ``import mlx_lm`` in the venv really is the
   version under test;
4. runs the engine's tests that exercise batching (``--tests``; default
   ``tests/test_engine.py tests/test_engine_units.py tests/test_engine_faults.py
   tests/test_engine_cli.py``) with that interpreter.

It prints one loud line, ``mlx-lm canary: PASS|FAIL|ERROR|SKIP ...`` naming the
version tested and the pinned one (and the failing tests), and exits 0 on PASS,
1 when tests fail on the new mlx-lm (or hang past ``--timeout``), 2 when it
could not set up (no network, no such version, install conflict). With
``--skip-if-pinned`` it stops after resolving the version when that is the pin
itself (SKIP, exit 0, a few seconds), since the main suite already tests it. ``--json`` prints a summary object on
stdout (the loud line then goes to stderr). PyPI (or a local wheel) only: a git
URL for SPEC needs network access to GitHub.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = ["tests/test_engine.py", "tests/test_engine_units.py", "tests/test_engine_faults.py",
                 "tests/test_engine_cli.py"]

PROBE = r"""
import json, sys
from importlib import metadata
def v(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
out = {"mlx_lm": v("mlx-lm"), "mlx": v("mlx"), "mlx_cpu": v("mlx-cpu"), "transformers": v("transformers"),
       "prefix": sys.prefix}
try:
    import mlx_lm, mlx_ray
    out["mlx_lm_file"] = mlx_lm.__file__
    out["mlx_ray_file"] = mlx_ray.__file__
    import mlx_ray.conversion
    out["mlx_ray_conversion_file"] = mlx_ray.conversion.__file__
    out["mlx_lm_import_version"] = getattr(mlx_lm, "__version__", None)
    from mlx_ray.blas import wanted_library
    out["blas"] = wanted_library() or ""
except Exception as e:  # reported, not raised: the caller decides
    out["import_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def pinned_mlx_lm() -> str | None:
    m = re.search(r'^\s*"mlx-lm\s*([=<>!~][^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    return m.group(1).strip() if m else None


def run(cmd: list[str], log, **kw) -> subprocess.CompletedProcess:
    log.write(f"\n$ {' '.join(map(str, cmd))}\n")
    log.flush()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    log.write(p.stdout)
    log.flush()
    return p


class SetupError(Exception):
    pass


def make_venv(venv: Path, log) -> str:
    if (venv / "bin" / "python").exists():
        return "reused"
    uv = shutil.which("uv")
    if uv:
        p = run([uv, "venv", "--seed", "--system-site-packages", "--python", sys.executable, str(venv)], log)
        if p.returncode == 0:
            return "uv venv --seed --system-site-packages"
    p = run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], log)
    if p.returncode != 0:
        raise SetupError(f"could not create a venv at {venv}: {p.stdout.strip()[-300:]}")
    return "python -m venv --system-site-packages"


def probe(py: str, log, env=None) -> dict:
    p = run([py, "-c", PROBE], log, cwd=tempfile.gettempdir(), env=env)  # not the repo: no accidental import
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise SetupError(f"the venv's python does not start: {p.stdout.strip()[-300:]}") from e


def within(path: str | None, root: Path) -> bool:
    return bool(path) and Path(path).resolve().is_relative_to(root)


def setup(venv: Path, spec: str, pre: bool, log) -> dict:
    how = make_venv(venv, log)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    seeded = local_packages(pip, log)  # what the venv has of its own before we install anything
    p = run([*pip, "install", "-U", *(["--pre"] if pre else []), spec], log)
    if p.returncode != 0:
        raise SetupError(f"pip install -U {spec} failed: {p.stdout.strip().splitlines()[-1] if p.stdout else ''}")
    info = probe(py, log)
    if sys.platform.startswith("linux") and info.get("mlx") and info.get("mlx_cpu") != info["mlx"]:
        # mlx-lm depends on bare mlx, which has no backend on Linux: match the CPU backend to it.
        p = run([*pip, "install", f"mlx-cpu=={info['mlx']}"], log)
        if p.returncode != 0:
            raise SetupError(f"mlx {info['mlx']} was installed but mlx-cpu=={info['mlx']} could not be")
        info = probe(py, log)
    if not (within(info.get("mlx_ray_file"), ROOT) and within(info.get("mlx_ray_conversion_file"), ROOT)):
        # The installed mlx-ray is another checkout (or none): install this one, its deps untouched.
        env = {**os.environ, "MLX_RAY_BUILD_KERNELS": "0"}
        p = run([*pip, "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)], log, env=env)
        if p.returncode != 0:
            raise SetupError("pip install --no-deps -e . into the venv failed")
        info = probe(py, log)
    if "import_error" in info:
        raise SetupError(f"importing mlx_lm / mlx_ray in the venv failed: {info['import_error']}")
    if not within(info.get("mlx_ray_file"), ROOT):
        raise SetupError(f"the venv imports mlx_ray from {info.get('mlx_ray_file')}, not this checkout {ROOT}")
    # What the venv now shadows the system with: the honest diff of the environment under test.
    added = {k: v for k, v in local_packages(pip, log).items() if seeded.get(k) != v and k != "mlx-ray"}
    if "mlx-lm" in added and not within(info.get("mlx_lm_file"), venv):
        raise SetupError(f"mlx-lm {added['mlx-lm']} went into the venv but it imports {info.get('mlx_lm_file')}")
    info.update(venv=str(venv), venv_how=how, python=py, venv_adds=added)
    return info


def local_packages(pip: list[str], log) -> dict[str, str]:
    p = run([*pip, "list", "--local", "--format=json"], log)
    try:
        return {d["name"].lower(): d["version"] for d in json.loads(p.stdout.strip().splitlines()[-1])}
    except (ValueError, IndexError, KeyError):
        return {}


def run_tests(info: dict, tests: list[str], extra: list[str], timeout: float, log) -> dict:
    junit = Path(info["venv"]) / "canary-junit.xml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{Path(info['python']).parent}{os.pathsep}{env.get('PATH', '')}"  # subprocesses: same venv
    env["VIRTUAL_ENV"] = info["venv"]
    if info.get("blas"):
        env["LD_PRELOAD"] = info["blas"] + (f":{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else "")
    cmd = [info["python"], "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", f"--junitxml={junit}", *tests, *extra]
    t = time.monotonic()
    try:
        p = run(cmd, log, cwd=ROOT, env=env, timeout=timeout)
        rc, tail = p.returncode, p.stdout.strip().splitlines()[-1:] or [""]
    except subprocess.TimeoutExpired:
        rc, tail = None, [f"timed out after {timeout:.0f} s"]
    res = {"rc": rc, "summary": tail[0], "seconds": round(time.monotonic() - t, 1),
           "passed": 0, "failed": [], "skipped": 0}
    if junit.exists():
        for case in ET.parse(junit).iter("testcase"):
            cls, name = case.get("classname") or "", case.get("name") or "?"
            name = f"{cls.replace('.', '/')}.py::{name}" if cls else f"{name.replace('.', '/')}.py (collection)"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                why = (bad.get("message") or "").strip().splitlines()
                if why == ["collection failure"]:  # the reason is in the traceback's last "E " line
                    why = [ln[1:].strip() for ln in (bad.text or "").splitlines() if ln.startswith("E ")] or why
                res["failed"].append(f"{name}: {why[-1][:200]}" if why else name)
            elif case.find("skipped") is not None:
                res["skipped"] += 1
            else:
                res["passed"] += 1
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mlx-lm", dest="spec", default="mlx-lm",
                    help="what to test: a requirement (mlx-lm, 'mlx-lm==0.33.0', 'mlx-lm>=0.33'), a bare version "
                         "(0.33.0) or a wheel path. Default: the newest on PyPI")
    ap.add_argument("--pre", action="store_true", help="allow pre-releases")
    ap.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="pytest paths (default: %(default)s)")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, one string (e.g. \"-k batch -x\")")
    ap.add_argument("--venv", type=Path, help="venv directory to create or reuse (kept); default: a temporary one")
    ap.add_argument("--keep", action="store_true", help="keep the temporary venv (its path is printed)")
    ap.add_argument("--timeout", type=float, default=2400, help="seconds for the test run (default: %(default)s)")
    ap.add_argument("--log", type=Path, help="full pip/pytest log (default: canary.log inside the venv)")
    ap.add_argument("--skip-if-pinned", action="store_true",
                    help="stop (SKIP, exit 0) when the version resolved is the pinned one (for CI: no rerun)")
    ap.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    args = ap.parse_args(argv)
    spec = f"mlx-lm=={args.spec}" if re.fullmatch(r"\d+(\.\d+)*\S*", args.spec) else args.spec

    t0 = time.monotonic()
    venv = args.venv or Path(tempfile.mkdtemp(prefix="mlx-lm-canary-")) / "venv"
    venv.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.log or venv.parent / "canary.log"
    pinned = pinned_mlx_lm()
    out: dict = {"spec": spec, "pinned": pinned, "tests": args.tests}
    with open(log_path, "a") as log:
        try:
            info = setup(venv, spec, args.pre, log)
            tested = info["mlx_lm"]
            out.update(tested=tested, venv_adds=info["venv_adds"], mlx=info["mlx"],
                       transformers=info["transformers"], venv_how=info["venv_how"])
            if args.skip_if_pinned and pinned and pinned.lstrip("=") == tested:
                out.update(result="SKIP", passed=0, skipped=0, failed=[])
            else:
                res = run_tests(info, args.tests, args.pytest_args.split(), args.timeout, log)
                out.update(res)
                if res["rc"] == 0 and not res["failed"]:
                    out["result"] = "PASS"
                elif res["rc"] in (1, None) or res["failed"]:  # None: timed out (a hang counts as breakage)
                    out["result"] = "FAIL"
                else:  # pytest usage error, no tests collected: not a verdict on mlx-lm
                    out["result"] = "ERROR"
                    out["error"] = f"pytest exited {res['rc']}: {res['summary']}"
        except SetupError as e:
            out.update(result="ERROR", error=str(e))
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out["log"] = str(log_path)

    same = out.get("tested") and pinned and pinned.lstrip("=") == out["tested"]
    what = f"{'mlx-lm ' + out['tested'] if out.get('tested') else spec} (pinned {pinned}" \
           f"{'; the newest is the pin itself' if same else ''})"
    if out["result"] == "SKIP":
        line = f"mlx-lm canary: SKIP: the newest, {what}, is what the main test suite already runs"
    elif out["result"] == "PASS":
        line = (f"mlx-lm canary: PASS: the engine's batching tests pass on {what}: {out['passed']} passed, "
                f"{out['skipped']} skipped, {out['wall_s']:.0f} s")
    elif out["result"] == "FAIL":
        names = out["failed"] or [out["summary"]]
        line = (f"mlx-lm canary: FAIL: the engine breaks on {what}: {len(out['failed'])} failed, "
                f"{out['passed']} passed ({out['summary']}); do not move the pin. Failing:\n  "
                + "\n  ".join(names))
    else:
        line = f"mlx-lm canary: ERROR: could not test {what}: {out['error']}"
    if out.get("venv_adds"):
        line += "\n  the venv added over the system packages: " + ", ".join(
            f"{k} {v}" for k, v in sorted(out["venv_adds"].items()))
    line += f"\n  log: {log_path}"
    keep = args.venv is not None or args.keep
    if not keep:
        shutil.rmtree(venv, ignore_errors=True)
    elif args.keep:
        line += f"\n  venv kept: {venv}"
    print(("=" * 78) + "\n" + line + "\n" + ("=" * 78), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(out, indent=2))
    return {"PASS": 0, "SKIP": 0, "FAIL": 1}.get(out["result"], 2)


if __name__ == "__main__":
    sys.exit(main())
