#!/usr/bin/env bash
# Continue a trained multi-token model on fresh synthetic speech: new sentences and renditions
# (another --seed), the trunk trained on as a next-token model with the frozen encoder run
# online (fresh waveform augmentation every epoch instead of a fixed set of cached copies), then
# the model's own heads put back on the new trunk (--heads-from) and tuned to it. Made for a
# GPU, where synthesis on many cores and online encoding are cheap; it runs on a CPU too.
#
# Usage:
#   recipes/synthetic/continue.sh --exp exp/continue                 # the bundled default model
#   recipes/synthetic/continue.sh --from exp/small/mtp/best --exp exp/c2 --hours 10 --steps 300
#   recipes/synthetic/continue.sh --exp exp/c3 --voices espeak-ng,hibari --mix data/synthetic/fsdd-train/manifest.jsonl
#
# Options (defaults in brackets):
#   --from CKPT        the multi-token model to continue [speechllama/models/default]
#   --exp DIR          run folder: data/, nt/, heads/, final/ [exp/continue]
#   --text DIR         prepare.sh's sentence lists (train.txt, dev.txt) [data/synthetic/text]
#   --hours H          new training audio [36]
#   --seed S           voices, speed, pitch and sentence order; not the seed the model saw [11]
#   --voices V         `data synth --voices` [train]
#   --dev MANIFEST     dev set that picks best/ [200 new sentences read by --voices]
#   --mix "M1 M2"      manifests added to the new audio, e.g. fsdd-train: leaving the real
#                      digits out cost fsdd-test 3.0% -> 7.7% WER in session 10's run []
#   --steps N          trunk steps [500]; --head-steps N  head steps [200]
#   --lr LR            trunk peak learning rate [5e-4]
#   --augment "K=V .." AugmentConfig fields for `train --augment`, e.g. "clean_prob=0.5" to
#                      leave half of the utterances clean (the defaults leave about 9%) []
#   --max-duration S   audio seconds per batch [480 on a GPU, 120 on a CPU]
#   --workers N        data loader workers (load, augment, log-mel) [cores - 2, at least 1]
#
# Output: EXP/final, an fp16 copy of the continued model (`speechllama export`); EXP/nt and
# EXP/heads hold the training runs (metrics.jsonl, best/). Run it again to resume: synthesis
# reuses the audio already made, training continues from its last checkpoint.

set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
from=$repo/speechllama/models/default
exp=exp/continue
text=data/synthetic/text
hours=36
seed=11
voices=train
mix=""
dev=""
steps=500
head_steps=200
lr=5e-4
augment=""
max_duration=""
workers=$(($(nproc --all) > 3 ? $(nproc --all) - 2 : 1))
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from=$2; shift 2 ;;
    --exp) exp=$2; shift 2 ;;
    --text) text=$2; shift 2 ;;
    --hours) hours=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --voices) voices=$2; shift 2 ;;
    --mix) mix=$2; shift 2 ;;
    --dev) dev=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --head-steps) head_steps=$2; shift 2 ;;
    --lr) lr=$2; shift 2 ;;
    --augment) augment=$2; shift 2 ;;
    --max-duration) max_duration=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "continue.sh: unknown argument $1" >&2; exit 1 ;;
  esac
done
sl=${SPEECHLLAMA:-$repo/.venv/bin/speechllama}
[ -x "$sl" ] || sl=speechllama
if [ -z "$max_duration" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    max_duration=480
  else
    max_duration=120
  fi
fi
log() { echo "$(date '+%H:%M:%S') (continue.sh) $*" >&2; }
mkdir -p "$exp"

log "new audio: $hours h, seed $seed, voices $voices"
"$sl" data synth --text "$text/train.txt" --out "$exp/data/train" --hours "$hours" \
  --seed "$seed" --voices "$voices" --no-progress
if [ -z "$dev" ]; then
  "$sl" data synth --text "$text/dev.txt" --out "$exp/data/dev" --limit 200 --seed "$seed" \
    --voices "$voices" --no-progress
  dev=$exp/data/dev/manifest.jsonl
fi
read -r -a extra <<< "$mix"
read -r -a augment_args <<< "$augment"
# beside the synthesized manifest, whose audio paths are relative to its folder
cat "$exp/data/train/manifest.jsonl" "${extra[@]}" > "$exp/data/train/mixed.jsonl"

common=(--train "$exp/data/train/mixed.jsonl" --dev "$dev" --no-cache
  --augment "${augment_args[@]}" --workers "$workers" --max-duration "$max_duration" --save-dtype float16
  --save-every 200 --log-every 50 --no-progress --resume)
log "trunk: $steps next-token steps from $from"
"$sl" train --init "$from" --heads 1 --head-kind linear --out "$exp/nt" --max-steps "$steps" \
  --lr "$lr" --warmup $((steps / 15 + 1)) --eval-every $(((steps + 1) / 2)) \
  --eval-utterances 150 "${common[@]}"
heads=$(python3 -c "import json, sys; h = json.load(open(sys.argv[1]))['model']['heads']
print(h['num_heads'], h['kind'])" "$from/config.json")
log "heads: $head_steps steps, $heads, from $from"
"$sl" train --init "$exp/nt/best" --heads "${heads% *}" --head-kind "${heads#* }" \
  --heads-from "$from" --freeze encoder adapter decoder --no-hidden-cache --out "$exp/heads" \
  --max-steps "$head_steps" --lr 3e-4 --warmup 10 --eval-every "$head_steps" \
  --eval-utterances 150 "${common[@]}"
"$sl" export "$exp/heads/best" --out "$exp/final"
log "done: $exp/final"
