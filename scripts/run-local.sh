#!/usr/bin/env bash
# Runs a FineTuneJob on this machine, no cluster: with no argument the embedded default (SFT + LoRA on a tiny
# model built locally, output to ./kubetune-output/).
#
# Usage:
#   scripts/run-local.sh                          # the embedded default job
#   scripts/run-local.sh examples/local/sft-lora.yaml --output ./out
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/kubetune run "$@"
