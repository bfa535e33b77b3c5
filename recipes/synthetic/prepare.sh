#!/usr/bin/env bash
# Build the synthetic-speech data folder: training and dev audio from many synthetic voices,
# a test set read by voices training never hears, and the real-speech test sets.
#
# Usage:
#   recipes/synthetic/prepare.sh DATA                       # everything, 50 h of training audio
#   recipes/synthetic/prepare.sh DATA --hours 10            # a smaller training set
#   recipes/synthetic/prepare.sh DATA --stage 3 --stop-stage 3 --hours 100   # only (more) train
#   recipes/synthetic/prepare.sh DATA --hours 0.01 --dev-limit 5 --heldout-limit 3   # smoke run
#
# Options (defaults in brackets):
#   --stage N / --stop-stage N   run stages N..M only [0 / 6]
#   --hours H                    training audio in hours [50]
#   --seed S                     voice, speed, pitch and sentence order [0]
#   --jobs N                     synthesis worker processes [all cores]
#   --shared DIR                 the shared data folder (fsdd/, real_en_smoke/, text/) [/work/shared/data]
#   --corpora "F1 F2 ..."        text corpora for prepare-text, space-separated
#                                [the shared folder's text/*.txt.gz and text/*.tsv.gz]
#   --dev-limit N                synthesize only the first N dev sentences [all 500]
#   --heldout-limit N            synthesize only the first N held-out sentences [all 500]
#   --speechllama CMD            the speechllama command [the repo's .venv/bin/speechllama, else PATH]
#   --asterisk SRC               asterisk-locked's source: fetch (apt-get download the two Debian
#                                packages into DATA/downloads), skip, or a folder where they are
#                                already extracted [fetch]
#
# Stages:
#   0  check the synthesis engines and the speechllama command
#   1  real-smoke, fsdd-train, fsdd-test: import the shared manifest.tsv files (audio referenced);
#      fsdd-locked: each FSDD speaker's last take of each digit, moved out of fsdd-train
#      (`speechllama campaign lock-fsdd`): real speech no training run and no choice sees
#      asterisk-locked: real read sentences, Debian's Asterisk English prompts (one US-English
#      speaker, 8 kHz, CC-BY-SA-3.0; `speechllama data asterisk`), a test set nothing is chosen on
#   2  text/: normalise the corpora, drop test sentences, hold out dev and held-out sentences
#   3  train/: --hours of audio, training voices, varied speed and pitch
#   4  dev/: the dev sentences (never in train), training voices
#   5  synth-heldout/: the held-out sentences, each read by every held-out voice (festival
#      cmu_us_slt_arctic_hts, piper en_US-joe-medium) at default speed and pitch
#   6  validate every manifest and print a summary
#
# Output: DATA/<set>/manifest.jsonl for set in train dev synth-heldout fsdd-train fsdd-test
# fsdd-locked real-smoke asterisk-locked (NeMo JSONL; synthetic audio as 16 kHz FLAC next to its manifest).
# Synthesis stages resume: re-running one skips the files already made.
#
# Synthesis uses every core. On a 2-core machine never run it next to 2-thread training.
# Speed measured on this project's 2-core machine while other jobs shared it (load 3-6), with
# 2 processes, in x real time: espeak-ng 130-270, flite 50-140, festival diphones 80, hibari
# 50-70, festival slt HTS 30, piper 7-10; the default training mix 35 at load 5-6, which would
# make 50 h take about 1.5 h on a loaded machine (the full build has not been timed yet).

set -euo pipefail

stage=0
stop_stage=6
hours=50
seed=0
jobs=$(nproc)
shared=/work/shared/data
corpora=""
dev_limit=""
heldout_limit=""
speechllama=""
asterisk=fetch

log() {
  echo "$(date '+%Y-%m-%d %H:%M:%S') (prepare.sh:${BASH_LINENO[0]}) $*" >&2
}

usage() {
  sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit "${1:-1}"
}

data=""
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --hours) hours=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --shared) shared=$2; shift 2 ;;
    --corpora) corpora=$2; shift 2 ;;
    --dev-limit) dev_limit=$2; shift 2 ;;
    --heldout-limit) heldout_limit=$2; shift 2 ;;
    --speechllama) speechllama=$2; shift 2 ;;
    --asterisk) asterisk=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    -*) echo "prepare.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$data" ] || { echo "prepare.sh: one DATA folder only" >&2; usage; }
       data=$1; shift ;;
  esac
done
[ -n "$data" ] || usage

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "$speechllama" ]; then
  if [ -x "$repo/.venv/bin/speechllama" ]; then
    speechllama=$repo/.venv/bin/speechllama
  else
    speechllama=speechllama
  fi
fi
if [ -n "$corpora" ]; then
  read -r -a corpus_files <<< "$corpora"
else
  shopt -s nullglob
  corpus_files=("$shared"/text/*.txt.gz "$shared"/text/*.tsv.gz)
  shopt -u nullglob
fi
mkdir -p "$data"

run_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }

if run_stage 0; then
  log "Stage 0: check the engines and $speechllama"
  for tool in espeak-ng flite text2wave; do
    command -v "$tool" >/dev/null || { log "missing $tool (apt-get install espeak-ng flite festival)"; exit 1; }
  done
  for voice in kal_diphone ked_diphone; do
    ls -d /usr/share/festival/voices/*/"$voice" >/dev/null 2>&1 \
      || { log "missing festival voice $voice (festvox-kallpc16k, festvox-kdlpc16k)"; exit 1; }
  done
  ls -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts >/dev/null 2>&1 \
    || { log "missing festival voice cmu_us_slt_arctic_hts (festvox-us-slt-hts)"; exit 1; }
  "$speechllama" data synth --help >/dev/null
fi

if run_stage 1; then
  log "Stage 1: real-smoke, fsdd-train, fsdd-test from $shared; asterisk-locked"
  imports=$data/.imports
  "$speechllama" data import-tsv "$shared/real_en_smoke/manifest.tsv" --out "$imports" --name real_smoke
  "$speechllama" data import-tsv "$shared/fsdd/manifest.tsv" --out "$imports" --name fsdd
  # The rows hold absolute audio paths into $shared, so the manifests can move.
  for pair in real_smoke:real-smoke fsdd_train:fsdd-train fsdd_test:fsdd-test; do
    mkdir -p "$data/${pair#*:}"
    mv "$imports/${pair%%:*}.jsonl" "$data/${pair#*:}/manifest.jsonl"
  done
  rmdir "$imports"
  "$speechllama" campaign lock-fsdd "$data"
  ast_root=$asterisk
  if [ "$asterisk" = fetch ]; then
    # apt-get download needs no root; Debian's package lists must be current (apt-get update).
    ast_root=$data/downloads/asterisk/root
    if [ ! -d "$ast_root" ]; then
      mkdir -p "$data/downloads/asterisk"
      if (cd "$data/downloads/asterisk" \
          && apt-get download asterisk-core-sounds-en-wav asterisk-core-sounds-en) >&2; then
        for deb in "$data"/downloads/asterisk/*.deb; do dpkg-deb -x "$deb" "$ast_root.tmp"; done
        mv "$ast_root.tmp" "$ast_root"
      else
        log "asterisk-locked skipped: apt-get download failed (Debian only; apt-get update first)"
        ast_root=skip
      fi
    fi
  fi
  if [ "$ast_root" != skip ]; then
    "$speechllama" data asterisk "$ast_root" --out "$data/asterisk-locked"
  fi
fi

if run_stage 2; then
  log "Stage 2: sentence lists in $data/text"
  [ ${#corpus_files[@]} -gt 0 ] || { log "no text corpora in $shared/text (see --corpora)"; exit 1; }
  excludes=("$shared/real_en_smoke/manifest.tsv" "$shared/fsdd/manifest.tsv")
  [ ! -f "$data/asterisk-locked/manifest.tsv" ] || excludes+=("$data/asterisk-locked/manifest.tsv")
  "$speechllama" data prepare-text "${corpus_files[@]}" --out "$data/text" --seed "$seed" \
    --exclude "${excludes[@]}"
fi

if run_stage 3; then
  log "Stage 3: $hours h of training audio in $data/train"
  "$speechllama" data synth --text "$data/text/train.txt" --out "$data/train" \
    --hours "$hours" --seed "$seed" --jobs "$jobs" --voices train
fi

if run_stage 4; then
  log "Stage 4: dev audio (unseen sentences, training voices) in $data/dev"
  "$speechllama" data synth --text "$data/text/dev.txt" --out "$data/dev" \
    --seed "$seed" --jobs "$jobs" --voices train ${dev_limit:+--limit "$dev_limit"}
fi

if run_stage 5; then
  log "Stage 5: held-out voices read the held-out sentences into $data/synth-heldout"
  "$speechllama" data synth --text "$data/text/heldout.txt" --out "$data/synth-heldout" \
    --seed "$seed" --jobs "$jobs" --voices heldout --every-voice --no-vary --in-order \
    ${heldout_limit:+--limit "$heldout_limit"}
fi

if run_stage 6; then
  log "Stage 6: validate"
  for set in train dev synth-heldout fsdd-train fsdd-test real-smoke; do
    [ -f "$data/$set/manifest.jsonl" ] || { log "missing $data/$set/manifest.jsonl"; exit 1; }
  done
  "$speechllama" data validate "$data"/{train,dev,synth-heldout,fsdd-train,fsdd-test,real-smoke}/manifest.jsonl
fi

log "Done: $data"
