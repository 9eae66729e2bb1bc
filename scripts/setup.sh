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
"$PY" -m pip install -q -e ".[parity,dev]"
