#!/usr/bin/env bash
# The main job on the embedded default (`make demo`): prune SmolLM2-135M by 20% on WikiText-2, export the
# pruned and the original model to ONNX, then bench original vs pruned run in ONNX Runtime and served by vLLM:
# accuracy by lm-eval-harness (local-completions against the servers), speed by vLLM's benchmark
# (`vllm bench serve`); the pruned model's card (OUT/model/README.md) gets both.
# Every step is skipped when its output already exists, so a rerun continues where it stopped.
# SWEEP=guidellm (or rates) adds a throughput-vs-latency sweep of the pair (RUN/sweep/sweep.png), ~15 min more.
# HEAL=1 adds `rtk heal OUT -o OUT-healed` (distillation from the original at its defaults, ~11-17 min more on 2 cores).
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
step "4/5 bench: original vs pruned in ONNX Runtime"
[ -f "$RUN/bench-onnx/bench.md" ] || $BIN/rtk bench --baseline "$RUN/onnx-base" --candidate "$RUN/onnx-pruned" \
  --backend onnx -o "$RUN/bench-onnx" --tasks none --rounds 3 --batch-sizes 1,4 --prompt-len 128 --gen-len 32
step "5/5 bench: original vs pruned served by vLLM (lm-eval accuracy, vllm bench serve speed)"
[ -f "$RUN/bench-vllm/bench.md" ] || $BIN/rtk bench --baseline embedded:smollm2 --candidate "$OUT/model" \
  --backend vllm -o "$RUN/bench-vllm" --tasks all --limit "$LIMIT" --rounds 3 --concurrency 1,4 \
  --num-prompts 8 --input-len 128 --output-len 32 --card "$OUT/model"
if [ -n "${SWEEP:-}" ] && [ ! -f "$RUN/sweep/bench.md" ]; then
  step "sweep: $SWEEP, original vs pruned"
  $BIN/rtk bench --baseline embedded:smollm2 --candidate "$OUT/model" --backend vllm -o "$RUN/sweep" \
    --skip quality --skip speed --sweep "$SWEEP" --sweep-seconds "${SWEEP_SECONDS:-20}" --input-len 128 --output-len 32
fi

if [ "${HEAL:-0}" = 1 ]; then  # not in the 30-minute demo: healing alone takes 11-17 min on 2 cores
  step "extra: heal the pruned model by distillation from the original (rtk heal at its defaults)"
  [ -d "$OUT-healed" ] || $BIN/rtk heal "$OUT" -o "$OUT-healed" --quiet
fi

step "done"
echo "--- $RUN/bench-onnx/bench.md (ONNX Runtime, in process)"
grep -E '^\| (b1|b4)\.' "$RUN/bench-onnx/bench.md" | head -8 || true
echo "--- $RUN/bench-vllm/bench.md (vLLM served)"
sed -n '/^### Accuracy/,/^Each model/p' "$RUN/bench-vllm/bench.md" | grep -E '^\|' || true
sed -n '/^### candidate1/,/^- ideal/p' "$RUN/bench-vllm/bench.md" | grep -E '^\|' || true
echo "total: $(( $(date +%s) - t0 )) s"
