"""The foundation: CLI entry, BLAS preload, fixture model and its hub-cache layout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlx_ray import blas
from mlx_ray.errors import BadRequest, Overloaded

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD BLAS is Linux-only")


def run_py(code: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_cli_help_lists_every_command_and_rejects_unknown():
    out = subprocess.run([sys.executable, "-m", "mlx_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("convert", "models", "generate", "serve", "parity", "bench", "worker", "doctor"):
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "mlx_ray.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2


def test_cli_help_does_not_import_mlx_or_ray():
    code = "import sys; from mlx_ray import cli; print(int('mlx.core' in sys.modules or 'ray' in sys.modules))"
    assert run_py(code) == "0"


def test_errors_are_one_line():
    e = BadRequest("bad   value\n for top_p;\n use 0 < top_p <= 1", param="top_p")
    assert str(e) == "bad value for top_p; use 0 < top_p <= 1" and e.param == "top_p"
    assert Overloaded("queue full", retry_after=2).retry_after == 2


@linux_only
def test_blas_choice_is_overridable(monkeypatch):
    monkeypatch.setenv("MLX_RAY_BLAS", "reference")
    assert blas.wanted_library() is None
    assert blas.runtime_env_vars() == {}
    monkeypatch.setenv("MLX_RAY_BLAS", "/nonexistent/libblas.so")
    assert blas.wanted_library() is None
    monkeypatch.setenv("MLX_RAY_BLAS", "auto")
    lib = blas.wanted_library()
    assert lib and os.path.exists(lib), "libopenblas0-pthread should be installed by scripts/setup.sh"
    assert blas.runtime_env_vars() == {"LD_PRELOAD": lib}


@linux_only
def test_preload_swaps_blas_and_agrees_with_reference():
    """The preloaded OpenBLAS is really the one MLX calls, and gives the same matmul."""
    code = (
        "import mlx.core as mx, numpy as np\n"
        "from mlx_ray.blas import loaded_blas\n"
        "mx.random.seed(0); a = mx.random.normal((256, 256)); b = mx.random.normal((256, 256))\n"
        "c = np.array(a @ b); print(loaded_blas().split()[0], float(c.sum()), float(np.abs(c).max()))\n"
    )
    env_ref = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env_ref["MLX_RAY_BLAS"] = "reference"
    ref = run_py(code, env_ref).split()
    fast = run_py(code, blas.env_with_fast_blas(env_ref | {"MLX_RAY_BLAS": "auto"})).split()
    assert ref[0] == "reference" and fast[0] == "openblas"
    assert float(fast[1]) == pytest.approx(float(ref[1]), rel=1e-4, abs=1e-2)
    assert float(fast[2]) == pytest.approx(float(ref[2]), rel=1e-5)


@linux_only
def test_cli_reexecs_itself_with_the_fast_blas():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_RAY_BLAS_REEXEC")}
    code = (
        "import sys; from mlx_ray.blas import reexec_with_fast_blas, loaded_blas\n"
        "reexec_with_fast_blas()\n"
        "import mlx.core as mx; print(loaded_blas().split()[0])\n"
    )
    assert run_py(code, env) == "openblas"


def test_fixture_is_a_plain_hf_llama_dir(smollm2_hf):
    import json

    cfg = json.loads((smollm2_hf / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert (smollm2_hf / "tokenizer.json").exists() and (smollm2_hf / "model.safetensors").exists()


def test_hub_cache_resolves_offline_through_huggingface_hub(hub_home, smollm2_hf):
    """huggingface_hub's own resolution finds the fixture with HF_HUB_OFFLINE=1."""
    code = (
        "from huggingface_hub import snapshot_download\n"
        "print(snapshot_download('HuggingFaceTB/SmolLM2-135M-Instruct'))\n"
    )
    env = dict(os.environ, HF_HOME=str(hub_home), HF_HUB_OFFLINE="1")
    snap = run_py(code, env)
    assert snap.startswith(str(hub_home / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots"))
    assert (open(os.path.join(snap, "config.json")).read() == (smollm2_hf / "config.json").read_text())
    missing = subprocess.run([sys.executable, "-c", code.replace("SmolLM2-135M-Instruct", "NoSuchModel")],
                             env=env, capture_output=True, text=True)
    assert missing.returncode != 0


def test_the_wheel_holds_every_package(tmp_path):
    """A regular (non-editable) install, as on a Mac without a checkout, has every subpackage and the data
    files read at run time. The wheel is built without its optional C++ kernels (MLX_RAY_BUILD_KERNELS=0)."""
    import zipfile
    from pathlib import Path

    import shutil

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy: a checkout's build/ may hold stale files that setuptools would pack
    shutil.copytree(root / "mlx_ray", src / "mlx_ray", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.log"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copyfile(root / name, src / name)
    env = {**os.environ, "MLX_RAY_BUILD_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("mlx_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(root)) for p in (root / "mlx_ray").rglob("__init__.py")}
    assert packages and {p for p in packages if f"{p}/__init__.py" not in names} == set()
    sources = {str(p.relative_to(root)) for p in (root / "mlx_ray").rglob("*.py")
               if "__pycache__" not in p.parts and str(p.parent.relative_to(root)) in packages}
    assert sources - names == set()
    data = {str(p.relative_to(root)) for pattern in ("kernels/*.metal", "kernels/metal_emu/*.h", "parity/data/*")
            for p in (root / "mlx_ray").glob(pattern)}
    assert data and data - names == set()
