"""Ray Serve deployment of mlx-ray with an OpenAI-compatible API.

``import_path: mlx_ray.serve:app`` in a Serve config (or a RayService's
``serveConfigV2``) builds the application from the config's ``args``, or from
env vars (``MODEL_ID``, ``MAX_MODEL_LEN``, ...) when there are none.
"""

from __future__ import annotations


def build_app(args: dict):
    """Serve application builder (see :func:`mlx_ray.serve.builder.build_app`)."""
    from .builder import build_app as _build

    return _build(args)


def app(args: dict):
    """The ready import path: Serve calls it with the config's `args` ({} -> env vars)."""
    return build_app(args)
