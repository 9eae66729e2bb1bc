#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on CPU. Extra args go to pytest (one run,
# newest Ray). Without extra args: the tests that do not depend on Ray's version run on
# the newest Ray (they still use Ray Serve: the fuzz, the soak, the OpenAI features, the
# zoo through Serve), and beside them the Ray-dependent ones (marker `ray`: Serve's API and
# faults, the worker, the doctor's head checks, a stock head) run on each Ray version in
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
if [[ ${#OTHERS[@]} -eq 0 ]]; then
  echo "== pytest on Ray $NEWEST (all tests)"
  exec python3 -m pytest -q -ra --durations=25
fi
# The `ray` tests on each other Ray version run *beside* the newest Ray's pass, not after it: they wait on
# Ray (nodes, heads, replicas) more than they compute (~1.2 of 2 cores alone; the other pass ~1.7), so
# together they take about 2/3 of the time one after the other. Each pass has its own basetemp and
# worker-port range (MLX_RAY_TEST_SHARD); a background pass's output is printed whole when it ends.
BT=$(mktemp -d); PIDS=(); LOGS=(); NAMES=()
trap 'for p in ${PIDS[@]+"${PIDS[@]}"}; do kill -- -"$p" 2>/dev/null || true; done; rm -rf "$BT"' EXIT
# Some `ray` tests also run on the newest Ray, after the first other version's pass and in its slack: the
# Ray APIs that moved between 2.53 and the newest (Ray Train's v2 trainer, Serve's handles for sleep/wake, the
# router on a cluster whose Mac sleeps): issues 31 and 32 ask for them on both.
ALSO=()
[[ "${MLX_RAY_TEST_RAY_ON_NEWEST:-0}" == 1 ]] || read -r -a ALSO <<< "${MLX_RAY_TEST_ALSO_ON_NEWEST-tests/test_finetune.py tests/test_sleep_wake.py tests/test_router_cluster.py}"
i=1
for V in "${OTHERS[@]}"; do
  PYV=$(bash scripts/ray_env.sh "$V")
  echo "== pytest on Ray $V (marker ray: Serve, the worker, a stock head), beside the next pass; its log at the end"
  set -m  # its own process group, so the trap can stop all of it
  (rcv=0; MLX_RAY_TEST_SHARD=$i PATH="$(dirname "$PYV"):$PATH" "$PYV" -m pytest -q -ra --durations=10 -m ray \
     --basetemp="$BT/ray-$V" -p no:cacheprovider || rcv=$?
   if [[ $i -eq 1 && ${#ALSO[@]} -gt 0 ]]; then
     echo "== pytest on Ray $NEWEST (marker ray, also: ${ALSO[*]})"
     MLX_RAY_TEST_SHARD=$i python3 -m pytest -q -ra --durations=5 -m ray --basetemp="$BT/ray-newest" \
       -p no:cacheprovider "${ALSO[@]}" || rcv=1
   fi
   exit $rcv) >"$BT/ray-$V.log" 2>&1 &
  PIDS+=($!); LOGS+=("$BT/ray-$V.log"); NAMES+=("$V")
  set +m
  i=$((i + 1))
done
rc=0
if [[ "${MLX_RAY_TEST_RAY_ON_NEWEST:-0}" == 1 ]]; then
  echo "== pytest on Ray $NEWEST (all tests)"
  MLX_RAY_TEST_SHARD=0 python3 -m pytest -q -ra --durations=25 || rc=$?
else
  echo "== pytest on Ray $NEWEST (all but marker ray: those run on Ray ${OTHERS[*]})"
  MLX_RAY_TEST_SHARD=0 python3 -m pytest -q -ra --durations=25 -m "not ray" || rc=$?
fi
for j in "${!PIDS[@]}"; do
  rcj=0; wait "${PIDS[$j]}" || rcj=$?
  echo "== pytest on Ray ${NAMES[$j]} (marker ray): exit $rcj"
  cat "${LOGS[$j]}"
  [[ $rcj -eq 0 ]] || rc=1
done
PIDS=()
exit $rc
