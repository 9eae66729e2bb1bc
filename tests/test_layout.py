"""The checkout's layout: only ``mlx_ray`` is importable from the repository root.

From a checkout, the root is on ``sys.path`` (``python -m``, pytest, Ray's workers started from
it), so a top-level package there shadows any installed distribution of the same name: a
top-level ``kernels/`` shadowed Hugging Face's ``kernels``, which transformers 5.25 imports,
and every replica failed to load a model.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_root_holds_one_package():
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["mlx_ray"]


def test_transformers_imports_from_the_root():
    """transformers' hub-kernel integration imports ``kernels`` when that distribution is installed."""
    proc = subprocess.run([sys.executable, "-c", "import transformers.activations, mlx_ray.kernels"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
