#!/usr/bin/env bash
# Continue a trained multi-token model on fresh synthetic speech: new sentences and renditions
# (another --seed), then either
#   joint (default): the whole model, trunk and heads, trained together on the multi-token
#     loss (head-loss weights --head-weights, head 1 first) with a fresh CTC head on the
#     adapter; session 14 measured it (docs/heads.md): on the same 25 h, real-smoke WER 46.6% ->
#     42.6%, head 2 right 36% of the time instead of 24%, verification 1.34 tokens per call;
#   split: the trunk trained on as a next-token model, then the model's own heads put back
#     (--heads-from) and tuned on the frozen trunk. It needs a source whose head 1 is the plain
#     un-embedding, i.e. heads trained on a frozen trunk (not a joint-trained model).
# The frozen encoder's outputs are cached with --cache-copies copies (1 clean, the rest
# waveform-augmented), as the release recipe trains; --cache-copies 0 runs the encoder online
# with fresh augmentation every epoch (cheap on a GPU). Sessions 10-11's online continuations on
# the CPU, split mode without CTC, came out worse than their source; session 14's cached runs
# came out better (docs/accuracy.md).
#
# Usage:
#   recipes/synthetic/continue.sh --exp exp/continue                 # the bundled default model
#   recipes/synthetic/continue.sh --from exp/small/mtp/best --mode split --exp exp/c2 --hours 10
#   recipes/synthetic/continue.sh --exp exp/c3 --voices espeak-ng,hibari --mix data/synthetic/fsdd-train/manifest.jsonl
#
# Options (defaults in brackets):
#   --from CKPT        the multi-token model to continue [speechllama/models/default]
#   --exp DIR          run folder: data/, joint/ or nt/ + heads/, final/ [exp/continue]
#   --text DIR         prepare.sh's sentence lists (train.txt, dev.txt) [data/synthetic/text]
#   --hours H          new training audio [36]
#   --seed S           voices, speed, pitch and sentence order; not the seed the model saw [11]
#   --voices V         `data synth --voices` [train]
#   --dev MANIFEST     dev set that picks best/ [200 new sentences read by --voices]
#   --mix "M1 M2"      manifests added to the new audio, e.g. fsdd-train: leaving the real
#                      digits out cost fsdd-test 3.0% -> 7.7% WER in session 10's run []
#   --mode M           joint | split (above) [joint]
#   --head-weights "W1 .. WK"  joint: one loss weight per head [1 0.4 0.3 0.2 ..; session
#                      15 chose them over 1 0.2 0.1 0.1 on dev and real-smoke, docs/heads.md]
#   --ctc W            weight of the CTC loss on a fresh adapter CTC head; 0: none [0.3]
#   --cache-copies N   cached encoder outputs per utterance, 1 clean + N-1 augmented; 0:
#                      the encoder online [2]
#   --steps N          joint steps, or split's trunk steps [1000]; --head-steps N  split's
#                      head steps [200]
#   --lr LR            peak learning rate of the joint or trunk stage [3e-4]
#   --lm-weight W      joint: also train on --text's train.txt as text without audio, 32
#                      sentences a step at loss weight W (`train --lm-text`); 0: off [0;
#                      0.1 gave no WER gain over 2,000 steps in session 16, docs/accuracy.md]
#   --augment "K=V .." AugmentConfig fields for `train --augment`, e.g. "clean_prob=0.5" to
#                      leave half of the utterances clean (the defaults leave about 9%) []
#   --max-duration S   audio seconds per batch [480 on a GPU, 120 on a CPU]
#   --workers N        data loader workers (load, augment, log-mel) [cores - 2, at least 1]
#
# Output: EXP/final, an fp16 copy of the continued model (`speechllama export`, CTC head
# dropped); EXP/joint (or EXP/nt and EXP/heads) hold the training runs (metrics.jsonl, best/).
# Run it again to resume: synthesis reuses the audio already made, the encoder cache its
# finished shards, training continues from its last checkpoint.

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
mode=joint
head_weights=""
ctc=0.3
copies=2
steps=1000
head_steps=200
lr=3e-4
augment=""
lm_weight=0
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
    --mode) mode=$2; shift 2 ;;
    --head-weights) head_weights=$2; shift 2 ;;
    --ctc) ctc=$2; shift 2 ;;
    --cache-copies) copies=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --head-steps) head_steps=$2; shift 2 ;;
    --lr) lr=$2; shift 2 ;;
    --augment) augment=$2; shift 2 ;;
    --lm-weight) lm_weight=$2; shift 2 ;;
    --max-duration) max_duration=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "continue.sh: unknown argument $1" >&2; exit 1 ;;
  esac
done
case "$mode" in joint|split) ;; *) echo "continue.sh: --mode is joint or split, not $mode" >&2; exit 1 ;; esac
if [ ! -f "$from/config.json" ]; then
  echo "continue.sh: --from $from: not a checkpoint directory (no config.json)" >&2; exit 1
fi
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

common=(--train "$exp/data/train/mixed.jsonl" --dev "$dev" --augment "${augment_args[@]}"
  --workers "$workers" --max-duration "$max_duration" --save-dtype float16
  --save-every 100 --log-every 50 --no-progress --resume)
if [ "$copies" -gt 0 ]; then
  common+=(--cache --cache-copies "$copies" --cache-dir "$exp/encoder_cache")
else
  common+=(--no-cache)
fi
heads=$(python3 -c "import json, sys; h = json.load(open(sys.argv[1]))['model']['heads']
print(h['num_heads'], h['kind'])" "$from/config.json")
if [ "$mode" = joint ]; then
  if [ -z "$head_weights" ]; then
    head_weights=$(python3 -c "import sys; k = int(sys.argv[1])
print(' '.join(['1', '0.4', '0.3', *['0.2'] * (k - 3)][:k]))" "${heads% *}")
  fi
  read -r -a weights <<< "$head_weights"
  lm=()
  awk -v w="$lm_weight" 'BEGIN { exit !(w > 0) }' && lm=(--lm-text "$text/train.txt" --lm-weight "$lm_weight")
  log "joint: $steps steps of the whole model and its ${heads% *} ${heads#* } heads (weights $head_weights), CTC $ctc, from $from"
  "$sl" train --init "$from" --head-loss-weights "${weights[@]}" --ctc-weight "$ctc" \
    --out "$exp/joint" --max-steps "$steps" --lr "$lr" --warmup $((steps / 10 + 1)) \
    --eval-every $(((steps + 1) / 2)) --eval-utterances 150 "${lm[@]}" "${common[@]}"
  best=$exp/joint/best
else
  log "trunk: $steps next-token steps from $from, CTC $ctc"
  "$sl" train --init "$from" --heads 1 --head-kind linear --ctc-weight "$ctc" --out "$exp/nt" \
    --max-steps "$steps" --lr "$lr" --warmup $((steps / 15 + 1)) \
    --eval-every $(((steps + 1) / 2)) --eval-utterances 150 "${common[@]}"
  frozen=(encoder adapter decoder)
  awk -v w="$ctc" 'BEGIN { exit !(w > 0) }' && frozen+=(ctc_head)  # the trunk's CTC head too
  log "heads: $head_steps steps, $heads, from $from"
  "$sl" train --init "$exp/nt/best" --heads "${heads% *}" --head-kind "${heads#* }" \
    --heads-from "$from" --freeze "${frozen[@]}" --no-hidden-cache \
    --out "$exp/heads" --max-steps "$head_steps" --lr 3e-4 --warmup 10 \
    --eval-every "$head_steps" --eval-utterances 150 "${common[@]}"
  best=$exp/heads/best
fi
"$sl" export "$best" --out "$exp/final"
log "done: $exp/final"
