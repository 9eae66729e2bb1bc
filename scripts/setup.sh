#!/usr/bin/env bash
# Install mlx-ray and everything it needs into the current Python environment
# (activate a virtualenv first if you want one). Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "$(uname -s)" == "Linux" ]]; then
  # Optimized BLAS for MLX's CPU backend (mlx-ray preloads it; see mlx_ray/blas.py).
  if ! ls /usr/lib/*-linux-gnu/libopenblas.so.0 >/dev/null 2>&1; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread
  fi
  # The CPU build of torch: pin it, a bare "torch" pulls a multi-GB CUDA build.
  "$PY" -m pip install -q "torch==2.13.0"
fi
# The cluster's Ray: a worker's Ray must equal the head's. MLX_RAY_RAY_VERSION=2.53.0 installs
# that Ray with its serving stack pinned as of its release (constraints/ray-<version>.txt;
# newer FastAPI/protobuf break 2.53). Unset: the newest Ray that pyproject admits.
PIN=()
if [[ -n "${MLX_RAY_RAY_VERSION:-}" ]]; then
  C="constraints/ray-$MLX_RAY_RAY_VERSION.txt"
  if [[ ! -f "$C" ]]; then
    echo "setup.sh: no $C; tested Ray versions: $(ls constraints/ | sed -n 's/^ray-\(.*\)\.txt$/\1/p' | tr '\n' ' ')" >&2
    echo "setup.sh: make one with: bash constraints/compile.sh $MLX_RAY_RAY_VERSION YYYY-MM-DD (a month after that release)" >&2
    exit 2
  fi
  PIN=(-c "$C" "ray[serve,train]==$MLX_RAY_RAY_VERSION")
fi
"$PY" -m pip install -q -e ".[parity,dev]" ${PIN[@]+"${PIN[@]}"}  # (bash 3.2 on macOS: empty arrays)
