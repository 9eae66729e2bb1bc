"""Session-wide fixtures: one real model, one model cache, shared by all tests.

Area-specific shared fixtures live in ``tests/fixtures_<area>.py``; every public
name in them is re-exported here so any test can request them.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
for _f in sorted(HERE.glob("fixtures_*.py")):
    _mod = importlib.import_module(_f.stem)
    globals().update({k: v for k, v in vars(_mod).items() if not k.startswith("_") and callable(v)})


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """The real SmolLM2-135M-Instruct as an ordinary HF directory (bf16 safetensors)."""
    from mlx_ray.fixtures import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def hub_home(tmp_path_factory, smollm2_hf) -> Path:
    """An HF_HOME whose hub cache holds the fixture as HuggingFaceTB/SmolLM2-135M-Instruct."""
    from mlx_ray.fixtures import install_into_hub_cache

    home = tmp_path_factory.mktemp("hf_home")
    install_into_hub_cache(home / "hub", src=smollm2_hf)
    return home


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The session's mlx-ray model cache root (what $MLX_RAY_CACHE points at)."""
    return tmp_path_factory.mktemp("mlx_ray_cache")


def _convert_once(smollm2_hf: Path, cache: Path, **kw) -> Path:
    from mlx_ray.conversion.convert import convert

    return convert(str(smollm2_hf), cache_dir=cache, **kw)


@pytest.fixture(scope="session")
def mlx_f32(smollm2_hf, model_cache) -> Path:
    """The fixture converted with --no-quantize --dtype float32."""
    return _convert_once(smollm2_hf, model_cache, quantize=False, dtype="float32")


@pytest.fixture(scope="session")
def mlx_q4(smollm2_hf, model_cache) -> Path:
    """The fixture converted at affine q4-g64 (slow on MLX's CPU backend: keep generations short)."""
    return _convert_once(smollm2_hf, model_cache, quantize=True, q_bits=4, q_group_size=64)


@pytest.fixture(autouse=True, scope="module")
def _release_mlx_memory():
    """After each test module, hand MLX's buffer cache back (what its engines and models freed): the suite runs
    two passes side by side (scripts/test.sh), and memory one module cached is memory the other pass's
    fine-tuning memory check and engines do not have."""
    yield
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


@pytest.fixture(autouse=True, scope="session")
def _offline_hub():
    """Tests never reach the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield
