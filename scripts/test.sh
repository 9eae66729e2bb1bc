#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on CPU. Extra args go to pytest (one run,
# newest Ray). Without extra args: the tests that do not depend on Ray's version run on
# the newest Ray (they still use Ray Serve: the fuzz, the soak, the OpenAI features, the
# zoo through Serve), then the Ray-dependent ones (marker `ray`: Serve's API and faults,
# the worker, the doctor's head checks, a stock head) run on each Ray version in
# MLX_RAY_TEST_RAY_VERSIONS (default 2.53.0, the cluster's: a worker's Ray must equal the
# head's), in an environment pinned by constraints/. MLX_RAY_TEST_RAY_ON_NEWEST=1 also runs
# the `ray` tests on the newest Ray (the full matrix; CI's ~25-minute budget leaves it out).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Run MLX with the optimized BLAS (mlx_ray/blas.py explains why).
LIB=$(python3 -c "from mlx_ray.blas import wanted_library as w; print(w() or '')")
if [[ -n "$LIB" ]]; then export LD_PRELOAD="$LIB${LD_PRELOAD:+:$LD_PRELOAD}"; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NEWEST=$(python3 -c "import ray; print(ray.__version__)")
if [[ $# -gt 0 ]]; then
  echo "== pytest on Ray $NEWEST ($*)"
  exec python3 -m pytest -q -ra --durations=25 "$@"
fi
OTHERS=()
for V in ${MLX_RAY_TEST_RAY_VERSIONS-2.53.0}; do [[ "$V" == "$NEWEST" ]] || OTHERS+=("$V"); done
if [[ ${#OTHERS[@]} -gt 0 && "${MLX_RAY_TEST_RAY_ON_NEWEST:-0}" != 1 ]]; then
  echo "== pytest on Ray $NEWEST (all but marker ray: those run on Ray ${OTHERS[*]})"
  python3 -m pytest -q -ra --durations=25 -m "not ray"
else
  echo "== pytest on Ray $NEWEST (all tests)"
  python3 -m pytest -q -ra --durations=25
fi
for V in ${OTHERS[@]+"${OTHERS[@]}"}; do
  PYV=$(bash scripts/ray_env.sh "$V")
  echo "== pytest on Ray $V (marker ray: Serve, the worker, a stock head)"
  PATH="$(dirname "$PYV"):$PATH" "$PYV" -m pytest -q -ra --durations=10 -m ray
done
