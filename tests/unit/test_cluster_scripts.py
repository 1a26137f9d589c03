"""The local cluster's process helpers (scripts/cluster/common.sh: start, check_alive, diagnose) with plain
commands: a component slow to exec is not taken for a dead one, and one that died says how (status, signal)."""
from __future__ import annotations

import subprocess
from pathlib import Path

COMMON = Path(__file__).resolve().parents[2] / "scripts" / "cluster" / "common.sh"


def _bash(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = f"""set -euo pipefail
export KUBETUNE_CLUSTER_DIR={tmp_path}
source {COMMON}
COMPONENTS=(slow dies killed)
mkdir -p "$RUN" "$LOGS"
trap 'for f in "$RUN"/*.pid; do kill -KILL -- "-$(cat "$f")" 2>/dev/null || true; done' EXIT
{body}
"""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_a_component_slow_to_exec_counts_as_running(tmp_path):
    # setsid reached 0.5 s late, as on a loaded machine: until it has exec'd, the child is a copy of this
    # shell in this shell's process group, which `running` rightly does not count
    proc = _bash(tmp_path, """
setsid() { sleep 0.5; exec /usr/bin/env setsid "$@"; }
start slow - sleep 30
check_alive slow
echo ALIVE
""")
    assert proc.returncode == 0, proc.stderr
    assert "ALIVE" in proc.stdout
    assert "started slow" in proc.stderr


def test_a_component_that_exits_is_reported_with_its_status(tmp_path):
    proc = _bash(tmp_path, """
start dies - sh -c 'echo cannot bind; exit 4'
check_alive dies
echo UNREACHED
""")
    assert proc.returncode == 1
    assert "UNREACHED" not in proc.stdout
    assert "dies: NOT running (pid" in proc.stderr and "exited with status 4" in proc.stderr, proc.stderr
    assert "cannot bind" in proc.stderr          # its log tail
    assert "ERROR: dies exited" in proc.stderr


def test_a_component_killed_before_it_logged_names_the_signal(tmp_path):
    proc = _bash(tmp_path, """
start killed - sh -c 'kill -KILL $$'
check_alive killed
""")
    assert proc.returncode == 1
    assert "killed by SIGKILL" in proc.stderr, proc.stderr
