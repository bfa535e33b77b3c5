#!/usr/bin/env bash
# Set up speechllama in ./.venv: Debian tools for speech synthesis, the CPU build of PyTorch,
# then the package with its test extras. Safe to re-run.
#   bash scripts/setup.sh           # everything (needs root for apt-get, or the packages present)
#   SKIP_APT=1 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox
  chromium chromium-driver)  # the last two: tests/test_serve_browser.py (headless)
if [[ "${SKIP_APT:-0}" != 1 ]]; then
  missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if ((${#missing[@]})); then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
  fi
fi

PYTHON="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev,synth,peers,smollm,serve]'
