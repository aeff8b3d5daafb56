#!/usr/bin/env bash
# Check a running vLLM OpenAI-compatible server: /health, /v1/models, one completion.
# Usage: deploy/smoke.sh [URL] [PROMPT]      (URL defaults to http://localhost:8000)
# Needs curl and python3 (for JSON). Exits non-zero on the first failed check.
set -euo pipefail
URL="${1:-http://localhost:8000}"
URL="${URL%/}"
PROMPT="${2:-The capital of France is}"

curl -fsS --max-time 10 "$URL/health" >/dev/null || { echo "smoke: $URL/health failed" >&2; exit 1; }
echo "health: ok"

MODELS="$(curl -fsS --max-time 10 "$URL/v1/models")" || { echo "smoke: $URL/v1/models failed" >&2; exit 1; }
read -r MODEL MAXLEN < <(python3 -c 'import json, sys
m = json.load(sys.stdin)["data"][0]
print(m["id"], m.get("max_model_len"))' <<<"$MODELS")
echo "model: $MODEL (max_model_len $MAXLEN)"

BODY="$(python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "prompt": sys.argv[2],
"max_tokens": 16, "temperature": 0}))' "$MODEL" "$PROMPT")"
OUT="$(curl -fsS --max-time 120 "$URL/v1/completions" -H 'Content-Type: application/json' -d "$BODY")" \
  || { echo "smoke: $URL/v1/completions failed" >&2; exit 1; }
python3 -c 'import json, sys
r = json.load(sys.stdin)
text = r["choices"][0]["text"]
assert text.strip(), "empty completion"
print("completion: " + json.dumps(sys.argv[1] + text) + " (%d tokens)" % r["usage"]["completion_tokens"])' \
  "$PROMPT" <<<"$OUT"
