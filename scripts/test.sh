#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on CPU. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Run MLX with the optimized BLAS (mlx_ray/blas.py explains why).
LIB=$(python3 -c "from mlx_ray.blas import wanted_library as w; print(w() or '')")
if [[ -n "$LIB" ]]; then export LD_PRELOAD="$LIB${LD_PRELOAD:+:$LD_PRELOAD}"; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pytest -q -ra --durations=25 "$@"
