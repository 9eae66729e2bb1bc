#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on CPU. Extra args go to pytest.
# Without extra args, the Ray-dependent tests (marker `ray`: Serve, the worker, a
# stock head) then run again on each Ray version in MLX_RAY_TEST_RAY_VERSIONS
# (default 2.53.0, the cluster's), in an environment pinned by constraints/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Run MLX with the optimized BLAS (mlx_ray/blas.py explains why).
LIB=$(python3 -c "from mlx_ray.blas import wanted_library as w; print(w() or '')")
if [[ -n "$LIB" ]]; then export LD_PRELOAD="$LIB${LD_PRELOAD:+:$LD_PRELOAD}"; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NEWEST=$(python3 -c "import ray; print(ray.__version__)")
echo "== pytest on Ray $NEWEST (all tests)"
python3 -m pytest -q -ra --durations=25 "$@"
[[ $# -eq 0 ]] || exit 0
for V in ${MLX_RAY_TEST_RAY_VERSIONS-2.53.0}; do
  [[ "$V" == "$NEWEST" ]] && continue
  PYV=$(bash scripts/ray_env.sh "$V")
  echo "== pytest on Ray $V (marker ray: Serve, the worker, a stock head)"
  PATH="$(dirname "$PYV"):$PATH" "$PYV" -m pytest -q -ra --durations=10 -m ray
done
