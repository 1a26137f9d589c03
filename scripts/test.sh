#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the trainer on CPU, and end-to-end tests against a local control plane
# (etcd, kube-apiserver, scheduler, controller-manager, KWOK GPU nodes, SeaweedFS, Prometheus) that the
# tests start on 127.0.0.1 and stop again.
#
# Usage:
#   scripts/test.sh                      # everything
#   scripts/test.sh tests/unit -q        # extra args go to pytest
#   KUBETUNE_TEST_WORKERS=0 scripts/test.sh tests/e2e/test_restarts.py -s   # one process (e.g. to see -s output)
#
# Two pytest-xdist workers by default (KUBETUNE_TEST_WORKERS): every end-to-end test runs on one of them, in
# order, against the one local cluster (tests/conftest.py schedules them as one unit of work), while the
# other takes the trainer and unit tests; whoever finishes first helps with what is left. The e2e tests spend
# most of their time waiting for pods, so this roughly halves the suite's wall time on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# Cluster binaries are built from the Go module proxy once and cached in ~/.cache/kubetune (cold: ~10 min).
scripts/cluster/build-binaries.sh >/dev/null
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -n "${KUBETUNE_TEST_WORKERS:-2}" "$@"
