"""The kernel gate's clean slate, shared by every kernel test module (``pytestmark = usefixtures("clean_gate")``)."""

from __future__ import annotations

import pytest


@pytest.fixture
def clean_gate(tmp_path, monkeypatch):
    """A private verdict cache, no kernel switches from the environment, and no verdict left in this process."""
    from mlx_ray.kernels import gate

    monkeypatch.setenv("MLX_RAY_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLX_RAY_KERNELS", raising=False)
    monkeypatch.delenv("MLX_RAY_KERNELS_DISABLE", raising=False)
    gate.reset()
    yield
    gate.reset()
