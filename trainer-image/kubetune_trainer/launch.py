"""torchrun, with the trainer's exit code kept.

torchrun exits 1 whenever a worker fails, whatever the worker's own code was. The Job's podFailurePolicy
needs the real one: 65/78/79/80 (bad data, bad config, NaN loss, forgetting) must fail the FineTuneJob at once
instead of being retried, and 143 (SIGTERM -> checkpoint saved) must read as a preemption. The first process of
each pod (rank 0 in its own) writes its TrainerReport (with exitCode) to the pod's termination log before exiting,
so this wrapper runs torchrun as a child, forwards SIGTERM/SIGINT to it, and exits with the report's code: the
other pods of a multi-node gang exit 0 on success and 143 after a SIGTERM checkpoint, like rank 0's.

On SIGTERM torchrun forwards the signal to its workers and SIGKILLs them after `--shutdown-timeout` seconds,
30 by default: far too short for rank 0 to upload a large model's checkpoint. The wrapper sets it from the
pod's terminationGracePeriodSeconds (KUBETUNE_TERMINATION_GRACE_SECONDS, rendered by the operator) minus a
margin in which the workers write their reports and torchrun exits, before the kubelet's own SIGKILL.

Usage (what the operator renders for multi-process pods):
    python -m kubetune_trainer.launch --nnodes=2 --nproc-per-node=8 --node-rank=0 \
        --master-addr=job-node-0-0.job-workers.ns.svc --master-port=29731 \
        -m kubetune_trainer --config /etc/kubetune/job.yaml
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from kubetune_api.constants import ExitCode
from kubetune_api.report import TrainerReport


def exit_code(torchrun_code: int, report_text: str | None, terminated: bool) -> int:
    """The code the pod should exit with, from torchrun's own code and rank 0's termination message."""
    report = TrainerReport.parse(report_text)
    if report is not None and report.exit_code is not None and report.state != "running":
        return report.exit_code
    if terminated:
        return ExitCode.PREEMPTED
    return torchrun_code


ENV_GRACE = "KUBETUNE_TERMINATION_GRACE_SECONDS"


def shutdown_timeout(grace_seconds: int) -> int:
    """torchrun's --shutdown-timeout for a pod with this grace period: the grace less max(5 s, 5 %), kept
    for writing the termination message and letting torchrun and this wrapper exit."""
    return max(1, grace_seconds - max(5, grace_seconds // 20))


def torchrun_args(argv: list[str], env: dict | None = None) -> list[str]:
    """argv with --shutdown-timeout added from the grace period, unless the caller chose one (or none is known)."""
    env = os.environ if env is None else env
    if any(a.split("=", 1)[0] in ("--shutdown-timeout", "--shutdown_timeout") for a in argv):
        return list(argv)
    try:
        grace = int(env.get(ENV_GRACE, ""))
    except ValueError:
        return list(argv)
    return [f"--shutdown-timeout={shutdown_timeout(grace)}", *argv]


def main(argv: list[str] | None = None) -> int:
    argv = torchrun_args(list(sys.argv[1:] if argv is None else argv))
    termination_log = os.environ.get("KUBETUNE_TERMINATION_LOG")
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv])
    terminated = False

    def forward(signum, _frame):
        nonlocal terminated
        terminated = terminated or signum == signal.SIGTERM
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    text = None
    if termination_log and os.path.exists(termination_log):
        with open(termination_log, encoding="utf-8", errors="replace") as f:
            text = f.read()
    return exit_code(code, text, terminated)


if __name__ == "__main__":
    sys.exit(main())
