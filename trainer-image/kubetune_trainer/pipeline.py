"""The local FineTunePipeline runner: `kubetune run pipeline.yaml` on one machine, with the operator's semantics.
Each stage runs as a local single-stage run (runner.run), in order; after a stage succeeds its gate is judged by
the same pure code the operator uses (kubetune_api.finetunepipeline.gates) on the same figures (the stage's
TrainerReport: progress + forgetting); the next stage trains on what the previous one handed over
(kubetune_api.finetunepipeline.plan). A failed gate stops the pipeline naming metric, value and threshold.

    kubetune run examples/local/pipeline-sft-dpo-grpo.yaml                  # every stage, fresh runs
    kubetune run pipeline.yaml --from dpo          # keep earlier stages' results (re-judging their gates with
                                                   # the manifest's current thresholds), re-run dpo and later
    kubetune run pipeline.yaml --from grpo --approve dpo   # a manualApproval gate, approved on the command line

State: <output>/<namespace>/<pipeline>/pipeline.json records each stage's run (job name, run id, model it
trained on, progress, forgetting, artifacts, gate), written after every stage, so `--from` knows what earlier
stages produced without re-running them. Each stage's own results live where a FineTuneJob's do:
<output>/<namespace>/<pipeline>-<stage>/runs/<run-id>/.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from kubetune_api.finetunejob import FineTuneJob
from kubetune_api.finetunejob.status import Artifacts, Forgetting, Progress
from kubetune_api.finetunepipeline import (FineTunePipeline, child_name, evaluate_gate, handed_over, next_model,
                                           stage_job_spec, validate_pipeline)
from kubetune_api.report import TrainerReport

from .errors import ConfigError

PIPELINE_KIND = "FineTunePipeline"
STATE_FILE = "pipeline.json"
# Exit codes: 0 succeeded (or stopped at a manualApproval gate, which is not a failure), a failed stage's own
# exit code, 3 a failed gate (training worked; the result is not good enough).
GATE_FAILED_EXIT = 3


@dataclass
class StageResult:
    name: str
    job: str
    state: str  # succeeded | failed | preempted | skipped (reused from an earlier run)
    run_id: Optional[str] = None
    model_source: Optional[str] = None
    model_adapter: Optional[str] = None
    progress: dict = field(default_factory=dict)
    forgetting: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    message: Optional[str] = None

    def to_json(self) -> dict:
        """camelCase, like the FineTunePipeline's status.stages[] entries."""
        from pydantic.alias_generators import to_camel

        return {to_camel(k): v for k, v in self.__dict__.items() if v not in (None, {}, [])}


@dataclass
class PipelineResult:
    state: str  # succeeded | failed | awaiting-approval
    stages: list[StageResult]
    message: str
    exit_code: int


def is_pipeline_text(docs: list) -> bool:
    return any(isinstance(d, dict) and d.get("kind") == PIPELINE_KIND for d in docs)


def load_pipeline(docs: list, source: str) -> FineTunePipeline:
    """The one FineTunePipeline among the YAML documents; pydantic errors name the camelCase field."""
    from pydantic import ValidationError

    from kubetune_api.finetunepipeline import parse_pipeline

    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == PIPELINE_KIND]
    if len(found) != 1:
        raise ConfigError(f"{source} holds {len(found)} {PIPELINE_KIND} documents; give exactly one")
    try:
        pipeline = parse_pipeline(found[0])
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: {loc}: {err['msg']}", field=loc) from None
    problems = validate_pipeline(pipeline.spec, pipeline.metadata.name)
    if problems:
        field_, _, msg = problems[0].partition(": ")
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:3])})" if len(problems) > 1 else ""
        raise ConfigError(f"{problems[0]}{more}", field=field_)
    return pipeline


def state_path(output: Path, pipeline: FineTunePipeline) -> Path:
    return output / pipeline.metadata.namespace / pipeline.metadata.name / STATE_FILE


def _read_state(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {s["name"]: s for s in data.get("stages", []) if isinstance(s, dict) and "name" in s}


def _write_state(path: Path, pipeline: FineTunePipeline, results: list[StageResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pipeline": pipeline.metadata.name, "stages": [r.to_json() for r in results]},
                              indent=2))
    tmp.replace(path)


def _dump(model) -> dict:
    return model.to_k8s() if model is not None else {}


def run_pipeline(pipeline: FineTunePipeline, output: Path, *, run_stage: Callable[[FineTuneJob], TrainerReport],
                 from_stage: Optional[str] = None, approved: tuple[str, ...] = (),
                 say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> PipelineResult:
    """Run the pipeline's stages in order. `run_stage` trains one FineTuneJob and returns its report (the CLI
    passes runner.run with a progress bar; tests may pass the same). Stages before `from_stage` are taken from
    the state file, their gates judged again with the current thresholds."""
    spec = pipeline.spec
    names = [s.name for s in spec.stages]
    if from_stage is not None and from_stage not in names:
        raise ConfigError(f"--from {from_stage}: not a stage of {pipeline.metadata.name} ({', '.join(names)})",
                          field="--from")
    start = names.index(from_stage) if from_stage else 0
    path = state_path(output, pipeline)
    previous = _read_state(path) if start else {}
    results: list[StageResult] = []
    model_source, model_adapter = spec.model.source, None
    ns = pipeline.metadata.namespace
    for i, stage in enumerate(spec.stages):
        job_name = child_name(pipeline.metadata.name, stage.name)
        if i < start:
            old = previous.get(stage.name)
            if not old or old.get("state") not in ("succeeded", "skipped"):
                raise ConfigError(f"--from {from_stage}: stage {stage.name} has no successful run in {path}; run "
                                  f"from {stage.name} (or earlier) first", field="--from")
            res = StageResult(name=stage.name, job=job_name, state="skipped", run_id=old.get("runId"),
                              model_source=old.get("modelSource"), model_adapter=old.get("modelAdapter"),
                              progress=old.get("progress") or {},
                              forgetting=old.get("forgetting") or {}, artifacts=old.get("artifacts") or {},
                              message=f"reused run {old.get('runId')}")
            say(f"kubetune: stage {i + 1}/{len(names)} {stage.name}: reusing run {res.run_id}")
        else:
            job_spec = stage_job_spec(spec, i, model_source, model_adapter)
            job = FineTuneJob(metadata={"name": job_name, "namespace": ns,
                                        "labels": {"kubetune.dev/pipeline": pipeline.metadata.name}},
                              spec=job_spec)
            say(f"kubetune: stage {i + 1}/{len(names)} {stage.name} ({job_spec.stage} + {job_spec.adapter.type}) "
                f"on {model_source}" + (f" from adapter {model_adapter}" if model_adapter else ""))
            report = run_stage(job)
            res = StageResult(name=stage.name, job=job_name, state=report.state, model_source=model_source,
                              model_adapter=model_adapter,
                              run_id=report.artifacts.run_id if report.artifacts else None,
                              progress=_dump(report.progress), forgetting=_dump(report.forgetting),
                              artifacts=_dump(report.artifacts), message=report.message)
            if report.state != "succeeded":
                results.append(res)
                _write_state(path, pipeline, results)
                msg = (f"stage {stage.name} {report.state} ({report.reason}): {report.message}; fix it and re-run "
                       f"with --from {stage.name}")
                return PipelineResult("failed", results, msg, int(report.exit_code or 1))
        verdict = evaluate_gate(stage.gate, res.progress, res.forgetting, approved=stage.name in approved)
        res.gate = verdict.to_k8s()
        results.append(res)
        _write_state(path, pipeline, results)
        say(f"kubetune: stage {stage.name} gate {verdict.state}: {verdict.message}")
        if verdict.state == "Failed":
            nxt = f"--from {names[i + 1]}" if i + 1 < len(names) else f"--from {stage.name}"
            msg = (f"stage {stage.name} {verdict.message}; edit the threshold (or the stage) and re-run with {nxt}")
            return PipelineResult("failed", results, msg, GATE_FAILED_EXIT)
        if verdict.state == "AwaitingApproval":
            nxt = names[i + 1] if i + 1 < len(names) else stage.name
            msg = (f"stage {stage.name} {verdict.message}: approve with --from {nxt} --approve {stage.name}")
            return PipelineResult("awaiting-approval", results, msg, 0)
        uri = handed_over(spec, i, Artifacts.model_validate(res.artifacts))
        if i + 1 < len(spec.stages):
            if not uri:
                msg = f"stage {stage.name} succeeded but its artifacts name no model to hand over ({res.artifacts})"
                return PipelineResult("failed", results, msg, 1)
            # continue keeps the base this stage trained on (a reused stage: the one its run recorded)
            model_source, model_adapter = next_model(spec, i, res.model_source or model_source, uri)
    return PipelineResult("succeeded", results, f"all {len(names)} stages succeeded and passed their gates", 0)


def summary(result: PipelineResult) -> str:
    lines = [f"{'stage':<20} {'state':<10} {'gate':<17} {'headline':<24} adapter"]
    for r in result.stages:
        p = Progress.model_validate(r.progress or {})
        headline = p.metric or (f"eval loss {p.eval_loss:.4g}" if p.eval_loss is not None else "")
        f = Forgetting.model_validate(r.forgetting or {})
        if f.relative_change is not None:
            headline += f" fgt {100 * f.relative_change:+.1f}%"
        lines.append(f"{r.name:<20} {r.state:<10} {(r.gate or {}).get('state', '-'):<17} {headline:<24} "
                     f"{(r.artifacts or {}).get('adapterUri', '-')}")
    lines.append(f"kubetune: pipeline {result.state}: {result.message}")
    return "\n".join(lines)


def main_local(args: Any, docs: list, source: str, output: Path, run_stage_factory: Callable[[], Callable]) -> int:
    """`kubetune run pipeline.yaml` after the CLI parsed the manifest (kubetune_trainer.cli.cmd_run)."""
    pipeline = load_pipeline(docs, source)
    if args.output:
        # --output decides where every stage's results go, whatever the manifest said (as for a FineTuneJob)
        for stage in pipeline.spec.stages:
            stage.job.output = stage.job.output.model_copy(update={"uri": f"file://{output}"})
    approved = tuple(a for item in (getattr(args, "approve", None) or []) for a in item.split(",") if a)
    result = run_pipeline(pipeline, output, run_stage=run_stage_factory(), from_stage=getattr(args, "from_stage", None),
                          approved=approved)
    print(summary(result), file=sys.stdout if result.state != "failed" else sys.stderr)
    return result.exit_code
