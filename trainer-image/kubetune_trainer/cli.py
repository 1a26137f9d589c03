"""The trainer's side of `kubetune`: `kubetune run` (train a FineTuneJob on this machine, no cluster) and
`kubetune tiny`. The parser lives in the client (kubetune_cli.app), which dispatches here when the trainer is
installed; `main` is that same parser, so `python -m kubetune_trainer.cli` is the whole CLI.

    kubetune run                                   # the built-in default: SFT + LoRA on a tiny local model
    kubetune run examples/local/sft-lora.yaml      # any FineTuneJob manifest (same trainer as the pods)
    kubetune run job.yaml --output ./out           # results under ./out/<namespace>/<name>/runs/<run-id>/
    kubetune run --resume                          # continue the newest interrupted run of the job (or --resume ID)
    kubetune run examples/local/pipeline-sft-dpo-grpo.yaml   # a FineTunePipeline: stages in order, gated
    kubetune run pipeline.yaml --from dpo          # re-run from a stage, reusing earlier stages' results
    kubetune tiny model /tmp/tiny-llama            # build the tiny model / synthetic data yourself
    kubetune tiny data /tmp/tiny-data

Manifests run locally may use ${KUBETUNE_TINY_MODEL} (a tiny Llama built on first use, cached in
~/.cache/kubetune), ${KUBETUNE_TINY_DATA} (synthetic datasets, one .jsonl per format, generated into the output
folder) and ${KUBETUNE_OUTPUT} (the --output folder); nothing is downloaded.

Imports stay lazy: `kubetune --help` must not load torch (5-7 s).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from importlib import resources
from pathlib import Path

# The job `kubetune run` runs without a manifest: package data, and examples/local/sft-lora.yaml is a link to
# it (one copy). Sized to finish in well under a minute on 2 CPU cores while visibly learning (measured:
# eval loss 6.1 -> 2.2, reference perplexity on general text +5 %, ~20 ms per step).
DEFAULT_JOB = resources.files(__package__).joinpath("default_job.yaml").read_text()
DEFAULT_OUTPUT = "kubetune-output"

_VAR = re.compile(r"\$\{(KUBETUNE_[A-Z_]+)\}")


# ------------------------------------------------------------------------------------------------ run
def expand_local_vars(text: str, output: Path) -> str:
    """Fill ${KUBETUNE_TINY_MODEL}, ${KUBETUNE_TINY_DATA} and ${KUBETUNE_OUTPUT}, building only what the
    manifest mentions; other ${KUBETUNE_*} come from the environment. Unknown ones are an error, not a
    silently broken URI."""
    wanted = set(_VAR.findall(text))
    values: dict[str, str] = {"KUBETUNE_OUTPUT": str(output)}
    if "KUBETUNE_TINY_MODEL" in wanted:
        from . import tiny

        _status("building the tiny model (first run only, ~10 s)" if not _tiny_cached() else None)
        values["KUBETUNE_TINY_MODEL"] = str(tiny.cached_model())
    if "KUBETUNE_TINY_DATA" in wanted:
        from . import tiny

        dest = output / ".tiny-data"
        if not (dest / "chat.jsonl").exists():
            tiny.generate_datasets(dest)
        values["KUBETUNE_TINY_DATA"] = str(dest)
    for name in wanted - values.keys():
        if name in os.environ:
            values[name] = os.environ[name]
    missing = sorted(wanted - values.keys())
    if missing:
        from .errors import ConfigError

        raise ConfigError(f"the manifest uses ${{{missing[0]}}}, which is not set (known: KUBETUNE_TINY_MODEL, "
                          "KUBETUNE_TINY_DATA, KUBETUNE_OUTPUT, or any KUBETUNE_* in the environment)")
    return _VAR.sub(lambda m: values[m.group(1)], text)


def _tiny_cached() -> bool:
    root = Path(os.environ.get("KUBETUNE_TINY_CACHE", Path.home() / ".cache/kubetune/tiny"))
    return any(root.glob("llama-*/config.json"))


def _status(msg: str | None) -> None:
    if msg:
        print(f"kubetune: {msg}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    """The local run prints a progress bar and a summary; library chatter (tqdm bars, deprecation warnings,
    DeepSpeed's accelerator probe) would bury them. --verbose keeps it."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not _has_gpu_hint():
        # A CUDA build of torch on a machine without a GPU can make DeepSpeed probe CUDA (shared notes).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "deepspeed", "bitsandbytes", "datasets", "transformers", "trl", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _has_gpu_hint() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or Path("/dev/nvidia0").exists()


# Log keys of the RL stages' mean reward and policy KL: TRL's GRPO/RLOO, then kubetune's PPO.
REWARD_KEYS = ("reward", "objective/scores")
KL_KEYS = ("kl", "objective/kl")


class _Progress:
    """Progress for a local run: a rich bar on a terminal, one plain line per log event otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.bar = None
        self.task = None
        self.total = None
        self.loss = None
        self.eval_loss = None
        # RL stages: the loss says little (GRPO's is ~0 by construction); the reward and KL say whether it learns.
        self.reward = None
        self.kl = None
        self.started = time.time()

    def callback(self):
        from transformers import TrainerCallback

        progress = self

        class ProgressCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                progress.begin(state.max_steps, state.global_step)

            def on_step_end(self, args, state, control, **kwargs):
                progress.step(state.global_step)

            def on_log(self, args, state, control, logs=None, **kwargs):
                progress.log(state.global_step, logs or {})

            def on_train_end(self, args, state, control, **kwargs):
                progress.end()

        return ProgressCallback()

    def _desc(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.reward is not None:
            parts.append(f"reward {self.reward:.3g}")
        if self.kl is not None:
            parts.append(f"kl {self.kl:.3g}")
        if self.eval_loss is not None:
            parts.append(f"eval {self.eval_loss:.3f}")
        return " ".join(parts) or "training"

    def begin(self, total: int, step: int) -> None:
        self.total = total
        if self.tty:
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.bar = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.description}"), TimeRemainingColumn(), transient=False)
                self.bar.start()
                self.task = self.bar.add_task(self._desc(), total=total, completed=step)
                return
            except ImportError:
                self.bar = None
        print(f"train: {step}/{total} steps", file=self.stream, flush=True)

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=self._desc())
        elif self.tty and self.total:
            print(f"\rtrain: {step}/{self.total} {self._desc()}   ", end="", file=self.stream, flush=True)

    def log(self, step: int, logs: dict) -> None:
        rl = False
        for attr, keys in (("reward", REWARD_KEYS), ("kl", KL_KEYS)):
            value = next((logs[k] for k in keys if isinstance(logs.get(k), (int, float))), None)
            if value is not None:
                setattr(self, attr, float(value))
                rl = True
        if "loss" in logs or rl:
            if "loss" in logs:
                self.loss = float(logs["loss"])
            if self.bar is None and not self.tty:
                line = f"train: {step}/{self.total}" + (f" loss {self.loss:.4f}" if "loss" in logs else "")
                if rl:
                    line += "".join(f" {name} {v:.4g}" for name, v in (("reward", self.reward), ("kl", self.kl))
                                    if v is not None)
                print(line, file=self.stream, flush=True)
        if "eval_loss" in logs:
            self.eval_loss = float(logs["eval_loss"])
            if self.bar is None and not self.tty:
                print(f"eval:  {step}/{self.total} eval loss {self.eval_loss:.4f}", file=self.stream, flush=True)
        if self.bar is not None:
            self.bar.update(self.task, description=self._desc())

    def end(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        elif self.tty:
            print(file=self.stream)


def _fmt(v, spec: str = ".4g") -> str:
    return "n/a" if v is None else format(v, spec)


def summary(report, manifest: dict | None) -> str:
    """The few lines a person wants after a run."""
    lines = []
    m = (manifest or {}).get("metrics", {})
    p = report.progress
    if report.state == "succeeded":
        lines.append(f"kubetune: succeeded in {_fmt((manifest or {}).get('wallSeconds'), '.1f')} s")
    if p is not None and p.step is not None:
        lines.append(f"  steps        {p.step}/{p.total_steps}")
    loss = m.get("last_loss", p.loss if p else None)
    lines.append(f"  train loss   {_fmt(loss)}")
    if m.get("eval_loss") is not None or (p and p.eval_loss is not None):
        first = m.get("first_eval_loss")
        ev = m.get("eval_loss", p.eval_loss if p else None)
        ppl = m.get("perplexity", p.perplexity if p else None)
        start = f" (first eval {_fmt(first)})" if first is not None else ""
        lines.append(f"  eval loss    {_fmt(ev)}{start}")
        if ppl is not None and (manifest is None or "perplexity" in m):  # LM stages only (runner.LM_LOSS_STAGES)
            lines.append(f"  eval PPL     {_fmt(ppl)}")
    if p is not None and p.metric and p.perplexity is None:  # non-LM stages: reward accuracy, mean reward ...
        lines.append(f"  headline     {p.metric}")
    f = report.forgetting
    if f is not None and f.reference_perplexity_before is not None:
        change = f"{100 * f.relative_change:+.1f} %" if f.relative_change is not None else "n/a"
        verdict = "EXCEEDED" if f.exceeded else "within"
        lines.append(f"  forgetting   reference PPL {_fmt(f.reference_perplexity_before)} -> "
                     f"{_fmt(f.reference_perplexity_after)} ({change}, {verdict} threshold "
                     f"{100 * (f.threshold or 0):.0f} %)")
    run = (manifest or {}).get("run") or {}
    pub = (manifest or {}).get("published") or {}
    if run.get("id"):
        lines.append(f"  run          {run['id']}")
    if pub:
        lines.append(f"  published    step {pub.get('step')} ({pub.get('reason')})")
    a = report.artifacts
    if a is not None and a.adapter_uri:
        lines.append(f"  adapter      {_local(a.adapter_uri)}")
        if a.merged_model_uri:
            lines.append(f"  merged model {_local(a.merged_model_uri)}")
        if a.manifest_uri:
            lines.append(f"  manifest     {_local(a.manifest_uri)}")
    if report.state != "succeeded":
        # last, so it is the line a person (or a script's `tail -1`) sees: what failed and which field or file
        what = report.message or ""
        if report.field and report.field not in what:
            what = f"{report.field}: {what}"
        lines.append(f"kubetune: {report.state} ({report.reason}, exit {report.exit_code}): {what}")
    return "\n".join(lines)


def _local(uri: str) -> str:
    if uri.startswith("file://"):
        path = Path(uri[len("file://"):])
        try:
            return str(path.relative_to(Path.cwd())) or "."
        except ValueError:
            return str(path)
    return uri


def _read_manifest(report) -> dict | None:
    import json

    a = report.artifacts
    if a is None or not a.manifest_uri or not a.manifest_uri.startswith("file://"):
        return None
    try:
        return json.loads(Path(a.manifest_uri[len("file://"):]).read_text())
    except (OSError, ValueError):
        return None


def cmd_run(args: argparse.Namespace) -> int:
    if not args.verbose:
        _quiet_libraries()
    from . import config
    from .errors import TrainerError

    try:
        # --output takes a folder or file:///abs/dir (the spelling spec.output.uri uses)
        output = config.local_output(args.output) if args.output else Path(DEFAULT_OUTPUT).resolve()
        config.check_writable(output, "--output" if args.output else DEFAULT_OUTPUT)
        if args.manifest:
            try:
                text = Path(args.manifest).read_text()
            except OSError as exc:
                raise config.ConfigError(f"cannot read {args.manifest}: {exc.strerror or exc}") from None
            source = args.manifest
        else:
            text, source = DEFAULT_JOB, "the built-in default job"
        expanded = expand_local_vars(text, output)
        from . import pipeline as local_pipeline

        docs = config.parse_yaml(expanded, source)
        if local_pipeline.is_pipeline_text(docs):
            if args.resume:
                raise config.ConfigError("--resume is for one FineTuneJob; a pipeline re-runs from a stage: --from "
                                         "STAGE", field="--resume")
            return local_pipeline.main_local(args, docs, source, output, lambda: _stage_runner(args))
        if getattr(args, "from_stage", None) or getattr(args, "approve", None):
            raise config.ConfigError("--from and --approve are for FineTunePipeline manifests", field="--from")
        job = config.load_job_text(expanded, source)
        if args.output or not args.manifest:
            # --output (or the default job) decides where results go, whatever the manifest said.
            job = job.model_copy(update={"spec": job.spec.model_copy(update={
                "output": job.spec.output.model_copy(update={"uri": f"file://{output}"})})})
        ns, name = job.metadata.namespace, job.metadata.name
        from . import runs

        # Every `kubetune run` is a new run beside the earlier ones; continuing one is asked for explicitly.
        run_id = runs.resumable(runs.job_store(job), None if args.resume == "newest" else args.resume) \
            if args.resume else runs.new_run_id()
        work = Path(os.environ.get("KUBETUNE_WORK_DIR") or output / ".work" / ns / name / run_id)
        settings = config.RunSettings.from_env(
            work_dir=work, run_id=run_id, metrics_port=int(os.environ.get("KUBETUNE_METRICS_PORT", "0")))
    except TrainerError as exc:
        print(f"kubetune: {exc}", file=sys.stderr)
        return exc.exit_code

    _status(f"{'resuming' if args.resume else 'running'} {ns}/{name} run {run_id} ({job.spec.stage} + "
            f"{job.spec.adapter.type}) from {source}")
    from .runner import run

    progress = _Progress()
    report = run(job, settings, extra_callbacks=[progress.callback()], console_logs=args.verbose)
    progress.end()
    print(summary(report, _read_manifest(report)), file=sys.stderr if report.state != "succeeded" else sys.stdout)
    return int(report.exit_code or 0)


def _stage_runner(args: argparse.Namespace):
    """One pipeline stage as a local run: a fresh run id and work folder, the progress bar, the summary."""
    from . import config, runs
    from .runner import run

    def run_stage(job):
        run_id = runs.new_run_id()
        out = Path(job.spec.output.uri[len("file://"):]) if job.spec.output.uri.startswith("file://") else \
            Path(DEFAULT_OUTPUT).resolve()
        work = out / ".work" / job.metadata.namespace / job.metadata.name / run_id
        settings = config.RunSettings.from_env(
            work_dir=work, run_id=run_id, metrics_port=int(os.environ.get("KUBETUNE_METRICS_PORT", "0")))
        progress = _Progress()
        report = run(job, settings, extra_callbacks=[progress.callback()], console_logs=args.verbose)
        progress.end()
        print(summary(report, _read_manifest(report)), file=sys.stderr)
        return report

    return run_stage


# ------------------------------------------------------------------------------------------------ tiny
def cmd_tiny(args: argparse.Namespace) -> int:
    from . import tiny

    return tiny.main([args.what, args.dest, *args.rest])


def main(argv: list[str] | None = None) -> int:
    """The whole `kubetune` command line (kubetune_cli.app.main)."""
    from kubetune_cli.app import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
