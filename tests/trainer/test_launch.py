"""kubetune_trainer.launch keeps the trainer's exit code through torchrun (which itself exits 1)."""

from __future__ import annotations

import json
import subprocess
import sys

from kubetune_api.constants import ExitCode
from kubetune_trainer.launch import exit_code, shutdown_timeout, torchrun_args


def test_permanent_code_from_rank0_report_wins_over_torchrun_1():
    report = json.dumps({"state": "failed", "reason": "InvalidDataset", "exitCode": 65})
    assert exit_code(1, report, terminated=False) == ExitCode.DATA_ERROR


def test_preemption_reads_as_143():
    report = json.dumps({"state": "preempted", "reason": "Preempted", "exitCode": 143})
    assert exit_code(1, report, terminated=True) == ExitCode.PREEMPTED
    assert exit_code(1, None, terminated=True) == ExitCode.PREEMPTED


def test_without_a_report_torchruns_code_stands():
    assert exit_code(1, "Traceback (most recent call last): ...", terminated=False) == 1
    assert exit_code(0, None, terminated=False) == 0


def test_real_torchrun_worker_exit_code_is_kept(tmp_path, monkeypatch):
    """A worker that writes a report and exits 78: torchrun says 1, the launcher says 78."""
    worker = tmp_path / "worker.py"
    log = tmp_path / "termination-log"
    worker.write_text(
        "import json, os, sys\n"
        "if os.environ.get('RANK') == '0':\n"
        "    open(os.environ['KUBETUNE_TERMINATION_LOG'], 'w').write(json.dumps("
        "{'state': 'failed', 'reason': 'InvalidConfig', 'exitCode': 78}))\n"
        "sys.exit(78)\n")
    env = {"KUBETUNE_TERMINATION_LOG": str(log), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "kubetune_trainer.launch", "--nnodes=1", "--nproc-per-node=2",
                           "--standalone", str(worker)], env={**env, "PYTHONPATH": ":".join(sys.path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 78, proc.stderr[-2000:]


def test_shutdown_timeout_follows_the_pods_grace_period():
    assert shutdown_timeout(300) == 285 and shutdown_timeout(90) == 85 and shutdown_timeout(15) == 10
    assert shutdown_timeout(3) == 1
    rest = ["--nnodes=1", "--standalone", "-m", "kubetune_trainer"]
    assert torchrun_args(rest, {"KUBETUNE_TERMINATION_GRACE_SECONDS": "300"}) == ["--shutdown-timeout=285", *rest]
    # no grace period known (kubetune run, a hand-written command): torchrun's own default stands
    assert torchrun_args(rest, {}) == rest
    assert torchrun_args(rest, {"KUBETUNE_TERMINATION_GRACE_SECONDS": "soon"}) == rest
    # an explicit choice wins
    mine = ["--shutdown_timeout=7", *rest]
    assert torchrun_args(mine, {"KUBETUNE_TERMINATION_GRACE_SECONDS": "300"}) == mine
