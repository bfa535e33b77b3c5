#!/usr/bin/env bash
# The default model, end to end: data, tokenizer, next-token pre-training, multi-token
# training, MWER fine-tuning, evaluation and benchmarks, and the copy shipped in the package.
#
# Usage:
#   recipes/synthetic/run.sh                                   # every stage, defaults below
#   recipes/synthetic/run.sh --stage 3 --stop-stage 4          # only the training stages 3-4
#   recipes/synthetic/run.sh --data /work/data/synthetic --exp exp/small
#   DRY_RUN=1 recipes/synthetic/run.sh                         # print the commands, run nothing
#   recipes/synthetic/run.sh --stage 8 --stop-stage 8          # the accuracy campaign only
#   recipes/synthetic/run.sh --conf recipes/synthetic/conf/smollm.sh --exp exp/smollm  # SmolLM2
#   NT_STEPS=100 MTP_STEPS=50 recipes/synthetic/run.sh --exp exp/smoke   # one value changed
#
# Options (defaults in brackets):
#   --stage N / --stop-stage N   run stages N..M only [1 / 7]
#   --data DIR                   data folder that prepare.sh fills [data/synthetic]
#   --exp DIR                    run folder: tokenizer, runs, evaluations, markers [exp/synthetic-small]
#   --conf FILE                  hyper-parameters [recipes/synthetic/conf/small.sh]
#   --speechllama CMD            the speechllama command [the repo's .venv/bin/speechllama, else PATH]
#   --python CMD                 python for scripts/peers.py [the repo's .venv/bin/python, else python3]
#   --campaign FILE              stage 8's runs and protocol [recipes/synthetic/conf/campaign.toml]
#
# Stages (each writes EXP/.done/stage-N when it finishes and is skipped while that exists;
# delete the marker to run it again; training stages continue from their last checkpoint):
#   1  data: recipes/synthetic/prepare.sh DATA --hours HOURS; train+fsdd-train manifest
#   2  tokenizer: SentencePiece (VOCAB_SIZE) on DATA/text/train.txt -> EXP/tokenizer.model
#      (skipped for a preset whose decoder is a pretrained LLM: it writes that LLM's tokens)
#   3  next-token pre-training of PRESET from scratch (frozen encoder, outputs cached) -> EXP/nt;
#      for a pretrained-LLM preset the LLM is frozen, so this trains the adapter alone; then,
#      with LORA_RANK > 0, LORA_STEPS more with LoRA deltas on the LLM -> EXP/nt_lora
#   4  multi-token training: stage 3's best with HEADS HEAD_KIND heads -> EXP/mtp; then, with
#      SD_STEPS > 0, self-distilled heads: EXP/mtp/best transcribes the training and dev sets
#      greedily (EXP/mtp_sd/labels-*), `data relabel` makes those the transcripts, and the
#      heads train SD_STEPS more on them with the trunk frozen -> EXP/mtp_sd
#   5  MWER fine-tuning of stage 4's model -> EXP/mwer (skipped, with a note, when this
#      speechllama has no `train --mwer`); the final model is EXP/mwer/best when its best dev
#      WER is no worse than stage 4's, else stage 4's (EXP/mtp_sd/best with SD_STEPS > 0, else
#      EXP/mtp/best)
#   6  evaluate the final model on EVAL_SETS with each EVAL_DECODING -> EXP/eval/SET/DECODING,
#      `speechllama bench` on BENCH_SET -> EXP/bench.{txt,json,png}, and the peers
#      (scripts/peers.py, needs the `peers` extra) -> EXP/peers.{txt,json}, and pocketsphinx
#      with a digit grammar on fsdd-test -> EXP/peers-digits.{txt,json}
#   7  export the final model (EXPORT_DTYPE) into the package: EXPORT_DIR (default:
#      speechllama/models/default, the model loaded without --model)
#   8  (only when asked: --stop-stage 8) the accuracy campaign: every run of the --campaign
#      file not finished yet trains PRESET-from-scratch for the file's fixed budget on its
#      filtered data (EXP/tokenizer.model, EXP/encoder_cache shared), is scored greedy on the
#      file's eval sets -> EXP/campaign/results.jsonl; then the table in docs/accuracy.md and
#      docs/accuracy_real.png. No marker: run it again to add new runs or finish failed ones.
#
# Devices: training and evaluation use a CUDA GPU by themselves when one is present, else
# THREADS CPU threads. Every hyper-parameter is in the --conf file; this script holds none.

set -euo pipefail

stage=1
stop_stage=7
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
data=data/synthetic
exp=exp/synthetic-small
conf=$repo/recipes/synthetic/conf/small.sh
speechllama=""
python=""
campaign=$repo/recipes/synthetic/conf/campaign.toml
dry_run=${DRY_RUN:-}

log() {
  echo "$(date '+%Y-%m-%d %H:%M:%S') (run.sh) $*" >&2
}

usage() {
  sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit "${1:-1}"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --exp) exp=$2; shift 2 ;;
    --conf) conf=$2; shift 2 ;;
    --speechllama) speechllama=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --campaign) campaign=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; usage ;;
  esac
done

[ -f "$conf" ] || { echo "run.sh: $conf: no such config file" >&2; exit 1; }
# shellcheck source=conf/small.sh
. "$conf"

if [ -z "$speechllama" ]; then
  if [ -x "$repo/.venv/bin/speechllama" ]; then speechllama=$repo/.venv/bin/speechllama
  else speechllama=speechllama; fi
fi
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
# OpenMP's wait policy is the CLI's choice per command (speechllama/cli/__init__.py): PASSIVE
# for training, the runtime's default for decoding, where sleeping threads cost time per call.
# `speechllama train` picks a GPU by itself; evaluate and bench are told (DEVICE=auto: a GPU
# when nvidia-smi sees one).
if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=cuda
  else device=cpu; fi
else
  device=$DEVICE
fi

done_dir=$exp/.done
train_manifest=$exp/train.jsonl
tokenizer=$exp/tokenizer.model
dev=$data/dev/manifest.jsonl

# Print a command, then run it unless DRY_RUN is set.
run() {
  echo "+ $*"
  [ -n "$dry_run" ] || "$@"
}

# The same, with the command's output also written to FILE (the first argument).
run_to() {
  local file=$1; shift
  echo "+ $* | tee $file"
  [ -n "$dry_run" ] || { mkdir -p "$(dirname "$file")"; "$@" | tee "$file"; }
}

# Stage N runs when it is in --stage..--stop-stage and has no marker; says why it is skipped.
want() {
  [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ] || return 1
  if [ -f "$done_dir/stage-$1" ]; then
    log "Stage $1: done before ($done_dir/stage-$1), skipped"
    return 1
  fi
  log "Stage $1: $2"
}

finish() {
  [ -n "$dry_run" ] || { mkdir -p "$done_dir"; date > "$done_dir/stage-$1"; }
}

# Options shared by the training stages; --resume continues an interrupted run (and starts
# afresh when there is nothing to resume).
# A pretrained-LLM preset (VOCAB_SIZE=llm) brings its own tokenizer.
tokenizer_args=(--tokenizer "$tokenizer")
[ "$VOCAB_SIZE" = llm ] && tokenizer_args=()
common=(--dev "$dev" "${tokenizer_args[@]}" --max-duration "$MAX_DURATION"
        --eval-every "$EVAL_EVERY" --eval-utterances "$EVAL_UTTERANCES"
        --save-every "$SAVE_EVERY" --log-every "$LOG_EVERY" --seed "$SEED"
        --threads "$THREADS" --cache-dir "$exp/encoder_cache" --no-progress --resume)
# Waveform augmentation lives in the encoder cache: AUGMENT_COPIES - 1 augmented copies.
[ "$AUGMENT_COPIES" -gt 1 ] && common+=(--augment --cache-copies "$AUGMENT_COPIES")

if want 1 "data in $data (prepare.sh, $HOURS h) and the training manifest"; then
  run bash "$repo/recipes/synthetic/prepare.sh" "$data" --hours "$HOURS" --seed "$DATA_SEED" \
    --shared "$SHARED" --speechllama "$speechllama"
  echo "+ cat $data/train/manifest.jsonl $data/fsdd-train/manifest.jsonl > $train_manifest"
  if [ -z "$dry_run" ]; then
    mkdir -p "$exp"
    cat "$data/train/manifest.jsonl" "$data/fsdd-train/manifest.jsonl" > "$train_manifest.tmp"
    mv "$train_manifest.tmp" "$train_manifest"
  fi
  finish 1
fi

if [ "$VOCAB_SIZE" = llm ]; then
  log "Stage 2: $PRESET writes its pretrained LLM's tokens; no tokenizer to train"
elif want 2 "tokenizer ($VOCAB_SIZE pieces) -> $tokenizer"; then
  run "$speechllama" tokenizer train --text "$data/text/train.txt" --vocab-size "$VOCAB_SIZE" \
    --out "$tokenizer"
  finish 2
fi

# Stage 3's model: the LoRA run's when there is one.
nt=$exp/nt
[ "${LORA_RANK:-0}" -gt 0 ] && nt=$exp/nt_lora

if want 3 "next-token pre-training of $PRESET, $NT_STEPS steps -> $exp/nt"; then
  run "$speechllama" train --train "$train_manifest" "${common[@]}" --preset "$PRESET" \
    ${NT_HEADS:+--heads $NT_HEADS} ${NT_HEAD_KIND:+--head-kind $NT_HEAD_KIND} ${NT_BF16:+--bf16} \
    --max-steps "$NT_STEPS" --warmup "$NT_WARMUP" --lr "$NT_LR" --out "$exp/nt"
  if [ "${LORA_RANK:-0}" -gt 0 ]; then
    run "$speechllama" train --train "$train_manifest" "${common[@]}" --init "$exp/nt/best" \
      --model-set "decoder.lora_rank=$LORA_RANK" --model-set "decoder.lora_alpha=$LORA_ALPHA" \
      ${NT_BF16:+--bf16} --max-steps "$LORA_STEPS" --warmup "$LORA_WARMUP" --lr "$LORA_LR" \
      ${LORA_CTC_TIED:+--model-set ctc=true --model-set ctc_tied=true --model-set 'ctc_on="adapter"'} \
      ${LORA_CTC_TIED:+--ctc-weight $LORA_CTC_TIED} --out "$exp/nt_lora"
  fi
  finish 3
fi

if want 4 "multi-token training, $HEADS $HEAD_KIND heads, $MTP_STEPS steps -> $exp/mtp"; then
  run "$speechllama" train --train "$train_manifest" "${common[@]}" --init "$nt/best" \
    --heads "$HEADS" --head-kind "$HEAD_KIND" --max-steps "$MTP_STEPS" --warmup "$MTP_WARMUP" \
    --lr "$MTP_LR" ${MTP_FREEZE:+--freeze $MTP_FREEZE} ${NT_BF16:+--bf16} \
    ${MTP_NO_HIDDEN_CACHE:+--no-hidden-cache} --out "$exp/mtp"
  if [ "$SD_STEPS" -gt 0 ]; then
    # Self-distillation: the heads learn what this trunk will say, which is what verification
    # accepts. The dev set is relabelled too, so that best/ is picked by agreement.
    for part in train dev; do
      src=$train_manifest; [ "$part" = dev ] && src=$dev
      run "$speechllama" evaluate "$src" --model "$exp/mtp/best" --decoding greedy \
        --no-head-accuracy --device "$device" --threads "$THREADS" --out "$exp/mtp_sd/labels-$part"
      run "$speechllama" data relabel "$src" "$exp/mtp_sd/labels-$part" \
        --out "$exp/mtp_sd/$part.jsonl"
    done
    run "$speechllama" train --train "$exp/mtp_sd/train.jsonl" "${common[@]}" \
      --dev "$exp/mtp_sd/dev.jsonl" --init "$exp/mtp/best" --heads "$HEADS" \
      --head-kind "$HEAD_KIND" --max-steps "$SD_STEPS" --warmup "$SD_WARMUP" --lr "$SD_LR" \
      ${MTP_FREEZE:+--freeze $MTP_FREEZE} ${NT_BF16:+--bf16} \
      ${MTP_NO_HIDDEN_CACHE:+--no-hidden-cache} --out "$exp/mtp_sd"
  fi
  finish 4
fi
mtp=$exp/mtp
[ "$SD_STEPS" -gt 0 ] && mtp=$exp/mtp_sd

if [ "$MWER_STEPS" -eq 0 ]; then
  log "Stage 5: MWER_STEPS=0, no MWER fine-tuning; the final model is $mtp/best"
elif want 5 "MWER fine-tuning, $MWER_STEPS steps -> $exp/mwer"; then
  if [ -z "$dry_run" ] && ! "$speechllama" train --help 2>/dev/null | grep -q -- '--mwer'; then
    log "Stage 5: this speechllama has no 'train --mwer' (MWER fine-tuning); skipped, so the" \
        "final model is $mtp/best. Update speechllama and rerun from stage 5 to add it."
  else
    run "$speechllama" train --train "$train_manifest" "${common[@]}" --init "$mtp/best" \
      --mwer --mwer-nbest "$MWER_NBEST" --max-steps "$MWER_STEPS" --warmup "$MWER_WARMUP" \
      --lr "$MWER_LR" --out "$exp/mwer"
    finish 5
  fi
fi

# The model stages 6 and 7 use: MWER's when stage 5 made one, else the multi-token model's.
# MWER's model is final only when its dev WER is no worse than stage 4's: 60 MWER steps took
# dev WER from 65.6% to 63.6% on the session-3 trunk, but from 49.6% to 52.1% on session 9's.
final=$mtp/best
# Prints "STAGE4 MWER", the lowest dev WER each run logged (its best/; 2 when it logged none),
# and succeeds when MWER's is no worse.
mwer_no_worse() {
  "$python" - "$mtp/metrics.jsonl" "$exp/mwer/metrics.jsonl" <<'PY'
import json, sys
def best(path):
    try:
        wers = [json.loads(line).get("dev_wer") for line in open(path) if line.strip()]
    except (OSError, ValueError):
        return 2.0
    return min([w for w in wers if w is not None] or [2.0])
mtp, mwer = (best(path) for path in sys.argv[1:])
print(mtp, mwer)
sys.exit(mwer > mtp)
PY
}
if [ -d "$exp/mwer/best" ] && [ -z "$dry_run" ]; then
  if wers=$(mwer_no_worse); then
    final=$exp/mwer/best
  else
    read -r mtp_wer mwer_wer <<< "$wers"
    log "MWER raised dev WER ($mtp_wer -> $mwer_wer): the final model is $mtp/best"
  fi
elif [ -n "$dry_run" ] && [ "$MWER_STEPS" -gt 0 ] && [ "$stage" -le 5 ] && [ "$stop_stage" -ge 5 ]; then
  final=$exp/mwer/best
fi

if want 6 "evaluate $final on $EVAL_SETS; bench on $BENCH_SET; peers"; then
  for set in $EVAL_SETS; do
    for decoding in $EVAL_DECODING; do
      run "$speechllama" evaluate "$data/$set/manifest.jsonl" --model "$final" \
        --decoding "$decoding" --device "$device" --threads "$THREADS" --out "$exp/eval/$set/$decoding"
    done
  done
  methods=(); [ -z "$BENCH_METHODS" ] || methods=(--methods "$BENCH_METHODS")
  run_to "$exp/bench.txt" "$speechllama" bench --manifest "$data/$BENCH_SET/manifest.jsonl" \
    --model "$final" --device "$device" --threads "$BENCH_THREADS" --repeats "$BENCH_REPEATS" \
    "${methods[@]}" --json "$exp/bench.json" --plot "$exp/bench.png"
  if [ -n "$dry_run" ] || "$python" -c "import faster_whisper, pocketsphinx" 2>/dev/null; then
    run_to "$exp/peers.txt" "$python" "$repo/scripts/peers.py" --data "$data" --model "$final" \
      --device "$device" --by-source --isolate --threads "$BENCH_THREADS" --json "$exp/peers.json"
    run_to "$exp/peers-digits.txt" "$python" "$repo/scripts/peers.py" --systems pocketsphinx-digits \
      "fsdd-test=$data/fsdd-test/manifest.jsonl" --json "$exp/peers-digits.json"
  else
    log "Stage 6: peers skipped: pip install 'speechllama[peers]' (faster-whisper, pocketsphinx)"
  fi
  finish 6
fi

if want 7 "export $final ($EXPORT_DTYPE) into the package${EXPORT_DIR:+: $EXPORT_DIR}"; then
  run "$speechllama" export "$final" --dtype "$EXPORT_DTYPE" ${EXPORT_DIR:+--out "$repo/$EXPORT_DIR"}
  finish 7
fi

if want 8 "accuracy campaign $campaign -> $exp/campaign, docs/accuracy.md"; then
  status=0  # a failed run still leaves the others' rows, and the report shows those
  run "$speechllama" campaign run "$campaign" --data "$data" --exp "$exp/campaign" \
    --tokenizer "$tokenizer" --cache-dir "$exp/encoder_cache" --device "$device" \
    --threads "$THREADS" || status=$?
  run "$speechllama" campaign report --exp "$exp/campaign" --spec "$campaign" \
    --doc "$repo/docs/accuracy.md" --plot "$repo/docs/accuracy_real.png"
  [ "$status" -eq 0 ] || exit "$status"
fi
