"""Build hook for the optional C++ kernels in ``mlx_ray/kernels/`` (everything else is in pyproject.toml).

``mlx_ray/kernels/qmm_cpu`` is an MLX C++ extension (a custom primitive + nanobind
bindings) compiled with CMake against the installed mlx wheel. The build is
best effort: with no compiler, no CMake, an unsupported platform or any build
error, the install still succeeds, mlx-ray falls back to MLX's own op, and
``mlx-ray doctor`` shows why (the build log is kept next to the package as
``mlx_ray/kernels/_qmm_cpu_build.log``). ``MLX_RAY_BUILD_KERNELS=0`` skips it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import traceback
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


def _find_mlx_cmake_dir() -> Path | None:
    """The mlx that will run the kernel: the target environment's, else the build environment's.

    pip builds in an isolated environment that has its own copy of mlx (a build
    requirement), but libmlx's C++ ABI is only stable within a version, so the
    target environment's mlx is preferred when it is already installed.
    """
    candidates = [Path(sysconfig.get_paths()[key]) / "mlx" for key in ("platlib", "purelib")]
    try:
        import mlx

        candidates += [Path(p) for p in mlx.__path__]
    except ImportError:
        pass
    for root in candidates:
        cfg = root / "share" / "cmake" / "MLX"
        if (cfg / "MLXConfig.cmake").exists():
            return cfg
    return None


def _nanobind_cmake_dir() -> Path:
    import nanobind

    return Path(nanobind.cmake_dir())


class OptionalCMakeBuild(build_ext):
    """build_ext that runs CMake and never fails the install."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        logs = [target.parent / f"{ext.name.rsplit('.', 1)[-1]}_build.log"]
        if getattr(self, "editable_mode", False):  # editable: also next to the sources
            logs.append(ext.source_dir.parent / logs[0].name)
        lines: list[str] = []
        try:
            lines += self._cmake_build(ext, target)
            status = f"built {target.name}"
        except Exception as exc:  # noqa: BLE001 - any failure must leave the install working
            status = f"not built: {exc}"
            target.unlink(missing_ok=True)  # never ship a stale binary from an earlier in-tree build
            lines.append(traceback.format_exc())
            print(f"WARNING: mlx-ray kernel {ext.name} {status}; using MLX's own ops instead", file=sys.stderr)
        for log in logs:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(status + "\n\n" + "\n".join(lines))

    def _cmake_build(self, ext: CMakeExtension, target: Path) -> list[str]:
        if os.environ.get("MLX_RAY_BUILD_KERNELS", "1") == "0":
            raise RuntimeError("skipped (MLX_RAY_BUILD_KERNELS=0)")
        if sys.platform == "win32":
            raise RuntimeError("Windows is not supported")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake)")
        mlx_dir = _find_mlx_cmake_dir()
        if mlx_dir is None:
            raise RuntimeError("mlx with its CMake config not found at build time (install mlx first)")
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [cmake, "-S", str(ext.source_dir), "-B", str(build_dir),
                     f"-DPython_EXECUTABLE={sys.executable}",
                     f"-DMLX_DIR={mlx_dir}", f"-Dnanobind_DIR={_nanobind_cmake_dir()}",
                     f"-DQMM_OUTPUT_DIR={target.parent}", "-DCMAKE_BUILD_TYPE=Release"]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        build = [cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)]
        lines = []
        for step, cmd in (("configure", configure), ("build", build)):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines += ["$ " + " ".join(cmd), proc.stdout, proc.stderr]
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                raise RuntimeError(f"cmake {step} failed: {tail[0][:200]}")
        if not target.exists():
            raise RuntimeError(f"CMake did not produce {target.name}")
        return lines

    def copy_extensions_to_source(self) -> None:
        # Editable installs: copy only what was actually built.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            if os.path.exists(regular_file):
                self.copy_file(regular_file, inplace_file, level=self.verbose)

    def get_outputs(self) -> list[str]:
        return [p for p in super().get_outputs() if os.path.exists(p)]


setup(
    ext_modules=[CMakeExtension("mlx_ray.kernels._qmm_cpu", HERE / "mlx_ray" / "kernels" / "qmm_cpu")],
    cmdclass={"build_ext": OptionalCMakeBuild},
)
