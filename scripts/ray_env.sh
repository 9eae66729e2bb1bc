#!/usr/bin/env bash
# Build (once) and print the Python of a test environment on another Ray version:
#   build/envs/ray-<version>: this environment (MLX, torch, transformers, mlx-ray itself,
#   its compiled kernels) overlaid with Ray's serving stack pinned by
#   constraints/ray-<version>.txt. First checks that the project's full dependency set
#   resolves under those constraints (what `pip install -e . -c ...` does on a Mac).
#   bash scripts/ray_env.sh 2.53.0     -> prints build/envs/ray-2.53.0/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?ray version, e.g. 2.53.0}
PY=${PYTHON:-python3}
C="constraints/ray-$VERSION.txt"
[[ -f "$C" ]] || { echo "scripts/ray_env.sh: no $C (make one with constraints/compile.sh)" >&2; exit 2; }
ENV="build/envs/ray-$VERSION"
STAMP="$ENV/.complete-$(sha256sum "$C" | cut -c1-12)"
UV=$("$PY" -c "import shutil,sys,os; print(shutil.which('uv') or os.path.join(os.path.dirname(sys.executable),'uv'))")
if [[ ! -f "$STAMP" ]]; then
  # The full set resolves with the constraints (no install, a few seconds).
  "$UV" pip compile --quiet --python "$("$PY" -c 'import sys; print(sys.executable)')" pyproject.toml \
    --extra dev --extra parity -c "$C" --find-links /opt/wheels -o /dev/null >&2
  rm -rf "$ENV"
  "$PY" -m venv --system-site-packages "$ENV"
  "$UV" pip install --quiet --python "$ENV/bin/python" "ray[serve,train]==$VERSION" -c "$C" >&2
  touch "$STAMP"
fi
"$ENV/bin/python" -c "import ray, sys; assert ray.__version__ == '$VERSION', ray.__version__" >&2
echo "$ENV/bin/python"
