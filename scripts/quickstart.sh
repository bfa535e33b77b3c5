#!/usr/bin/env bash
# Set up speechllama and transcribe the bundled example audio (speechllama/assets/audio/).
#
#   bash scripts/quickstart.sh
#
# With a bundled model (speechllama/models/default/) it transcribes straight away. Until the
# released model exists, it first trains a small DEMONSTRATION model (Whisper tiny.en encoder,
# frozen; a 10M-parameter LLaMA decoder) for a few minutes on synthetic speech of the example
# sentences, read by many synthetic voices, and then transcribes the real recordings. The demo
# model only knows those sentences: it shows the pipeline end to end, not a general recogniser.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SL=.venv/bin/speechllama
EXAMPLES=(speechllama/assets/audio/*)

if [[ -d speechllama/models/default ]]; then
  exec "$SL" transcribe "${EXAMPLES[@]}"
fi

EXP=exp/quickstart
MODEL="$EXP/model/best"
if [[ ! -f "$MODEL/config.json" ]]; then
  echo "quickstart: no released model yet; training a demonstration model in $EXP (a few minutes)" >&2
  mkdir -p "$EXP"
  # The example sentences (normalised), each 40 times: every copy gets its own voice, speed and pitch.
  .venv/bin/python - "$EXP/sentences.txt" <<'PY'
import json, sys
from speechllama.assets import example_manifest
from speechllama.text import normalize
rows = [json.loads(line) for line in example_manifest().read_text().splitlines() if line.strip()]
with open(sys.argv[1], "w") as f:
    for _ in range(40):
        for row in rows:
            f.write(normalize(row["text"]) + "\n")
PY
  "$SL" data synth --text "$EXP/sentences.txt" --out "$EXP/synth" --in-order --no-progress
  "$SL" train --train "$EXP/synth/manifest.jsonl" --dev "$EXP/synth/manifest.jsonl" \
    --preset small --vocab-size 48 --out "$EXP/model" --max-steps 300 --warmup 20 --lr 2e-3 \
    --max-duration 30 --eval-every 100 --eval-utterances 20 --save-every 100 --threads 2 --no-progress
fi
"$SL" transcribe --model "$MODEL" "${EXAMPLES[@]}"
