#!/usr/bin/env bash
# The main job on the embedded default (`make demo`): prune SmolLM2-135M by 20% on WikiText-2, export the
# pruned and the original model to ONNX, then bench original vs pruned served by vLLM and run in ONNX Runtime.
# Every step is skipped when its output already exists, so a rerun continues where it stopped.
# HEAL=1 adds `rtk heal OUT -o OUT-healed` (distillation from the original, ~20 min more).
set -euo pipefail
BIN=${BIN:-.venv/bin}
export RTK_DATA_DIR=${RTK_DATA_DIR:-$(cd .. && pwd)/shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
OUT=${OUT:-runs/smollm2-demo}          # rtk prune output (OUT/model is the servable folder)
RUN=${RUN:-runs/smollm2-demo-bench}    # exports and bench results
LIMIT=${LIMIT:-50}
t0=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - t0 )) s)"; }

step "1/5 prune (recipes/smollm2-demo.yaml)"
$BIN/rtk prune recipes/smollm2-demo.yaml -o "$OUT" --quiet
step "2/5 export the pruned model to ONNX"
[ -d "$RUN/onnx-pruned" ] || $BIN/rtk export "$OUT/model" --format onnx -o "$RUN/onnx-pruned"
step "3/5 export the original model to ONNX"
[ -d "$RUN/onnx-base" ] || $BIN/rtk export embedded:smollm2 --format onnx -o "$RUN/onnx-base"
step "4/5 bench: original vs pruned served by vLLM (OpenAI /v1/completions)"
[ -f "$RUN/bench-vllm/bench.md" ] || $BIN/rtk bench --baseline embedded:smollm2 --candidate "$OUT/model" \
  --backend vllm -o "$RUN/bench-vllm" --tasks all --limit "$LIMIT" --rounds 3 --concurrency 1,4 \
  --num-prompts 8 --input-len 128 --output-len 32
step "5/5 bench: original vs pruned in ONNX Runtime"
[ -f "$RUN/bench-onnx/bench.md" ] || $BIN/rtk bench --baseline "$RUN/onnx-base" --candidate "$RUN/onnx-pruned" \
  --backend onnx -o "$RUN/bench-onnx" --tasks none --rounds 3 --batch-sizes 1,4 --prompt-len 128 --gen-len 32

if [ "${HEAL:-0}" = 1 ]; then  # not in the 30-minute demo: healing alone takes ~20 min on 2 cores
  step "extra: heal the pruned model by distillation from the original (rtk heal at its defaults)"
  [ -d "$OUT-healed" ] || $BIN/rtk heal "$OUT" -o "$OUT-healed" --quiet
fi

step "done"
for b in bench-vllm bench-onnx; do echo "--- $RUN/$b/bench.md"; sed -n '1,200p' "$RUN/$b/bench.md" | grep -E '^\||^#|speedup|PPL' | head -40; done
echo "total: $(( $(date +%s) - t0 )) s"
