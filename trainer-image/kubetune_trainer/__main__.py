"""The trainer pod's entry point: run one FineTuneJob and exit with a code the operator acts on.

    python -m kubetune_trainer --config /etc/kubetune/job.yaml            # what the pod runs
    python -m kubetune_trainer --config job.yaml --work-dir /tmp/work     # the same, by hand
    torchrun --nproc-per-node 8 -m kubetune_trainer --config job.yaml     # multi-process (the operator's form)

Exit codes (kubetune_api.constants.ExitCode): 0 ok, 1 retriable, 65 data error, 78 config error, 79 loss not
finite, 80 forgetting threshold exceeded (onForgetting: fail), 143 preempted (checkpoint saved; a restart
resumes). The final TrainerReport goes to the termination message (KUBETUNE_TERMINATION_LOG), which is how the
reason reaches the FineTuneJob's conditions; settings come from the env the operator sets (see config.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from kubetune_api.constants import CONFIG_FILE_NAME, CONFIG_MOUNT_DIR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubetune_trainer",
                                 description="Run one FineTuneJob (the trainer pod's entry point).")
    ap.add_argument("--config", default=f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}",
                    help="FineTuneJob manifest (YAML; default: %(default)s)")
    ap.add_argument("--work-dir", help="scratch folder (default: $KUBETUNE_WORK_DIR or ./kubetune-work)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from . import config
    from .errors import TrainerError
    from .runner import failed_report, write_termination_message

    try:
        settings = config.RunSettings.from_env(work_dir=args.work_dir)
        job = config.load_job(args.config)
    except TrainerError as exc:
        # Nothing is running yet (no monitor): the report goes straight to the termination message.
        report = failed_report(exc)
        write_termination_message(report)
        print(f"kubetune: {exc}", file=sys.stderr)
        return exc.exit_code

    from .runner import run

    report = run(job, settings)
    if report.state != "succeeded":
        print(f"kubetune: {report.state}: {report.reason}: {report.message}", file=sys.stderr)
    return int(report.exit_code or 0)


if __name__ == "__main__":
    sys.exit(main())
