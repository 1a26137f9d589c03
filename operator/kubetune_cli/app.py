"""`kubetune`: the command line's parser and dispatch. Parsing and --help import neither torch nor the
kubernetes client; each command imports what it needs when it runs.

    kubetune follow support-bot -n ml              # watch a FineTuneJob live (exit 0 Succeeded, 1 Failed)
    kubetune plot support-bot -n ml -o curve.png   # its loss/PPL curves (or: kubetune plot metrics.jsonl)
    kubetune run                                   # local training (needs the trainer extra): the default job
    kubetune run examples/local/sft-lora.yaml      # any FineTuneJob manifest (same trainer as the pods)
    kubetune run job.yaml --output ./out           # a new run beside the earlier ones (runs/<run-id>/)
    kubetune run --resume                          # continue the newest interrupted run (or --resume RUN_ID)
    kubetune run pipeline.yaml [--from STAGE]      # a FineTunePipeline: its stages in order, gated, locally
    kubetune tiny model /tmp/tiny-llama            # build the tiny model / synthetic data (trainer extra)
    kubetune estimate job.yaml --model-config config.json   # per-GPU memory breakdown; exit 1 if it cannot fit

Install: `pip install 'kubetune[client]'` (follow, plot) or `pip install 'kubetune[trainer]'` (also run, tiny).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Callable

DEFAULT_OUTPUT = "kubetune-output"  # kubetune_trainer.cli.DEFAULT_OUTPUT (the client must not import the trainer to say it)
TRAINER_INSTALL = "pip install 'kubetune[trainer]'"


def trainer_installed() -> bool:
    """The trainer's heavy dependencies are importable (find_spec does not import them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "trl", "peft"))


def _needs_trainer(command: str) -> int:
    print(f"kubetune {command} trains on this machine and needs the trainer (torch, transformers): "
          f"{TRAINER_INSTALL}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------------ commands
def cmd_run(args: argparse.Namespace) -> int:
    if not trainer_installed():
        return _needs_trainer("run")
    from kubetune_trainer.cli import cmd_run as run

    return run(args)


def cmd_tiny(args: argparse.Namespace) -> int:
    if not trainer_installed():
        return _needs_trainer("tiny")
    from kubetune_trainer.cli import cmd_tiny as tiny

    return tiny(args)


def cmd_follow(args: argparse.Namespace) -> int:
    from .follow import follow

    return follow(args.name, args.namespace, args.kubeconfig)


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_command

    return plot_command(args.source, args.output, args.namespace, args.kubeconfig, args.endpoint)


def cmd_estimate(args: argparse.Namespace) -> int:
    from .estimate import run

    code, text = run(args.manifest, args.model_config, args.gpu_memory, args.runtime)
    print(text, file=sys.stderr if code == 2 else sys.stdout)
    return code


# ------------------------------------------------------------------------------------------------ parser
def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a FineTuneJob or FineTunePipeline manifest on this machine (no cluster; "
                       "trainer extra)",
                       description="Run a FineTuneJob (or a FineTunePipeline: its stages in order, each gated as "
                       "the operator gates it) locally with the same trainer the pods run. Without a "
                       f"manifest: an SFT + LoRA job on a tiny model built locally. Needs {TRAINER_INSTALL}.")
    p.add_argument("manifest", nargs="?", help="FineTuneJob YAML (default: the built-in SFT + LoRA job)")
    p.add_argument("--output", "-o", help=f"results folder (default: ./{DEFAULT_OUTPUT}); overrides "
                   "spec.output.uri with file://OUTPUT")
    p.add_argument("--resume", nargs="?", const="newest", metavar="RUN_ID",
                   help="continue an interrupted run of this job from its latest checkpoint: the newest unfinished "
                   "one, or RUN_ID (default: start a fresh run beside the earlier ones)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="FineTunePipeline only: re-run from this stage, reusing the earlier stages' results "
                   "(their gates are judged again with the manifest's thresholds)")
    p.add_argument("--approve", action="append", metavar="STAGE[,STAGE]",
                   help="FineTunePipeline only: approve these stages' manualApproval gates")
    p.add_argument("--verbose", "-v", action="store_true", help="show library logs and the Trainer's log lines")
    p.set_defaults(func=cmd_run)


def _add_tiny(sub) -> None:
    p = sub.add_parser("tiny", help="build the tiny model or the synthetic datasets (no downloads; trainer extra)")
    p.add_argument("what", choices=["model", "data", "reward-model"])
    p.add_argument("dest")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="more options for `python -m kubetune_trainer.tiny`")
    p.set_defaults(func=cmd_tiny)


def _add_follow(sub) -> None:
    p = sub.add_parser("follow", help="follow a FineTuneJob live: phase, step bar, loss, eval loss, PPL, ETA",
                       description="Follow a FineTuneJob's status until it finishes. Exit code 0 when it "
                       "Succeeded, 1 when it Failed or was deleted, 2 when it cannot be found.")
    p.add_argument("name", help="FineTuneJob name")
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.set_defaults(func=cmd_follow)


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's loss / perplexity curves to a PNG",
                       description="Draw train loss, eval loss, eval perplexity (and RL reward) vs step from a "
                       "run's metrics.jsonl: a local file or folder, an output URI (s3://, file://, pvc://), or "
                       "the name of a FineTuneJob whose artifacts hold it.")
    p.add_argument("source", help="FineTuneJob NAME, path to metrics.jsonl (or its folder), or output URI")
    p.add_argument("-o", "--output", default="curve.png", help="PNG to write (default: %(default)s)")
    p.add_argument("-n", "--namespace", help="namespace of NAME (default: the kubeconfig context's)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--endpoint", help="S3 endpoint URL (default: the job's runtime's storage.endpoint or "
                   "$AWS_ENDPOINT_URL)")
    p.set_defaults(func=cmd_plot)


def _add_estimate(sub) -> None:
    from .estimate import add_arguments

    p = sub.add_parser("estimate", help="will a FineTuneJob fit its GPUs? per-GPU and per-node memory breakdown",
                       description="Estimate the per-GPU and per-node memory of a FineTuneJob from its model's "
                       "config.json. Exit 0 when it fits (or nothing declares the GPU memory), 1 when it does not "
                       "(the message lists the cheapest fixes), 2 when an input cannot be read.")
    add_arguments(p)
    p.set_defaults(func=cmd_estimate)


# Each subcommand registers itself here (name order = help order); new commands (estimate, pipelines) add one.
SUBCOMMANDS: list[Callable] = [_add_run, _add_tiny, _add_follow, _add_plot, _add_estimate]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kubetune", description="kubetune: declarative LLM fine-tuning. Follow "
                                 "and plot FineTuneJobs on a cluster; run them locally with the trainer installed.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
