#!/usr/bin/env bash
# Set up speechllama and transcribe the bundled example audio (speechllama/assets/audio/) with
# the bundled default model (speechllama/models/default/), printing the decoding statistics.
#
#   bash scripts/quickstart.sh
#
# The model was trained on synthetic speech only (see the README's Limitations): the real
# recordings in the examples show what that costs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/speechllama transcribe --decoding verify --stats speechllama/assets/audio/*
