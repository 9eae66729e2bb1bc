"""The cluster artifact: mlx-ray's pure-Python code as a zip for a RayService's ``py_modules``.

A KubeRay head runs the cluster's own Ray image, with neither mlx-ray nor MLX.
Ray 2.53's Serve builds a config-deployed app in a ``build_serve_application``
task that is ``num_cpus=0`` and unpinned (in practice: on the head), and the
ingress replica (``num_cpus=0``) can land on any node. Both only need
mlx-ray's code, never MLX: ``mlx_ray.serve`` imports nothing heavier than
pydantic and FastAPI, which every ``ray[serve]`` has. So the application's
``runtime_env.py_modules`` carries this zip, from any URI the cluster can fetch
(https, s3, gs, or file:// on a shared mount).

Every deployment inherits an app's ``py_modules``, and neither Ray 2.53 nor
2.60 lets a deployment opt out in a config (``[]`` breaks 2.60's runtime-env
agent, ``null`` fails the config schema). So the zip's ``mlx_ray/__init__.py``
starts with a hand-over (``HAND_OVER``): on a node where mlx-ray is installed
(the Mac), it imports that install instead, so the model replicas run the
worker's own code, with its compiled kernels, as ``mlx-ray doctor`` saw it.

Layout: one top-level directory ``mlx_ray-<version>/`` holding ``mlx_ray/``
(Ray strips a remote zip's single top-level directory and puts what is left on
``sys.path``). The file name carries a hash of the content, because Ray caches
a remote package by its URI: republishing changed code under the same name
would leave nodes running the old one. Entries are sorted and dated
1980-01-01, so the same code always gives the same bytes and the same name.
Compiled extensions (``*.so``) stay out: they are platform-specific and only
the model replicas, which run the worker's install, use them.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

from ..errors import BadRequest

# The installed package and its two subpackages that live in other source folders
# (pyproject's package-dir), each found through the import system, so this works
# from an editable checkout and from a regular install alike.
_KEEP = {".py", ".json", ".txt", ".md", ".metal"}
_SKIP_DIRS = {"__pycache__", "qmm_cpu"}  # qmm_cpu/: the C++ sources of the Linux kernel
_DATE = (1980, 1, 1, 0, 0, 0)
REMOTE_SCHEMES = ("https", "s3", "gs", "azure", "abfss", "file")

# Prepended to the zip's mlx_ray/__init__.py. A module may replace itself in
# sys.modules while it is imported; the import then returns the replacement.
HAND_OVER = '''# Written by `mlx-ray package`: where mlx-ray is installed, run that install instead.
def _hand_over():
    import importlib.machinery, importlib.util, os, sys
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outside = lambda s: s is not None and s.origin and not os.path.abspath(s.origin).startswith(here + os.sep)
    spec = importlib.machinery.PathFinder.find_spec(__name__, [p for p in sys.path if os.path.abspath(p or ".") != here])
    for finder in sys.meta_path:  # an editable install's finder
        if not outside(spec) and finder is not importlib.machinery.PathFinder and hasattr(finder, "find_spec"):
            spec = finder.find_spec(__name__, None)
    if outside(spec):
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module
        spec.loader.exec_module(module)


_hand_over()
del _hand_over

'''


def _files() -> list[tuple[str, Path]]:
    """(path inside the package, file on disk), sorted."""
    out: dict[str, Path] = {}
    root = Path(importlib.import_module("mlx_ray").__path__[0])
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if Path(name).suffix in _KEEP:
                out[f"mlx_ray/{(rel_dir / name).as_posix()}"] = Path(dirpath) / name
    return sorted(out.items())


def _zip_bytes(top: str, files: list[tuple[str, Path]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, src in files:
            info = zipfile.ZipInfo(f"{top}/{arc}", date_time=_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            data = src.read_bytes()
            if arc == "mlx_ray/__init__.py":
                data = HAND_OVER.encode() + data
            zf.writestr(info, data)
    return buf.getvalue()


def build_package(out_dir: str | os.PathLike) -> Path:
    """Write ``mlx_ray-<version>-<hash>.zip`` into out_dir (atomically) and return its path."""
    from .. import __version__

    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadRequest(f"--out {out}: cannot create it ({e.strerror or e})") from None
    files = _files()
    digest = hashlib.sha256()
    digest.update(HAND_OVER.encode())
    for arc, src in files:
        digest.update(arc.encode() + b"\0" + src.read_bytes() + b"\0")
    top = f"mlx_ray-{__version__}"
    target = out / f"{top}-{digest.hexdigest()[:12]}.zip"
    data = _zip_bytes(top, files)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def stage_module_dir(root: str | os.PathLike) -> Path:
    """The same files unpacked under root; returns root/mlx_ray, a module directory that
    a driver can pass to ``runtime_env={"py_modules": [...]}`` (Ray uploads it itself)."""
    root = Path(root)
    for arc, src in _files():
        dst = root / arc
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((HAND_OVER.encode() if arc == "mlx_ray/__init__.py" else b"") + src.read_bytes())
    return root / "mlx_ray"


def check_package_uri(uri: str) -> str:
    """A URI Ray can fetch as a py_modules package, or BadRequest saying what would work."""
    scheme, sep, _ = uri.partition("://")
    if not sep or scheme not in REMOTE_SCHEMES:
        raise BadRequest(f"--package-uri {uri!r}: Ray fetches py_modules only from "
                         f"{', '.join(s + '://' for s in REMOTE_SCHEMES)} URIs (plain http:// is not one); "
                         "publish the zip from `mlx-ray package` where the cluster can fetch it")
    if not uri.endswith(".zip"):
        raise BadRequest(f"--package-uri {uri!r}: must name the .zip that `mlx-ray package` wrote")
    return uri


def configure_parser(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the zip into")
    p.add_argument("--json", action="store_true", help="print {path, name, sha256, bytes} as JSON")


def main(args) -> int:
    import json

    path = build_package(args.out)
    if args.json:
        data = path.read_bytes()
        print(json.dumps({"path": str(path), "name": path.name, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()}))
    else:
        print(path)
    return 0
