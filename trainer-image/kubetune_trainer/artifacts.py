"""What a finished run leaves in the output store, under its own prefix
<spec.output.uri>/<namespace>/<name>/runs/<run-id>/ (runs.py):

    adapter/        PEFT adapter (PeftModel.from_pretrained(base, uri)) + tokenizer + README.md (the model card);
                    for full/galore the whole model. When evaluation runs: the BEST checkpoint's weights, unless
                    spec.output.publish is last.
    merged/         optional (spec.output.mergedModel): adapter merged into a full-precision base, + tokenizer
                    + README.md
    metrics.jsonl   every logged metric and event of the run (monitoring/)
    curves.png      loss / eval loss / perplexity curves
    README.md       model card: base, stage, adapter, data, metrics, forgetting, how to load
    manifest.json   run id and spec digest, which step was published and why (best / early-stop / last), digests
                    of base model and data, resolved config, library versions, metrics, forgetting, wall time,
                    device-seconds, artifact URIs. The run's commit point: written after every other file.
and then, one level up, <namespace>/<name>/runs.json names this run as the job's latest (runs.record_success).

Saved tokenizers are the base's tokenizer as a consumer should get it: training leaves truncation (maxLength,
sometimes left-sided) and padding settings on the fast tokenizer's backend, and save_pretrained would write
them into tokenizer.json, where a server that reads tokenizer.json directly (TGI, vLLM, llama.cpp converters,
the `tokenizers` library) silently truncates every long prompt.

Publishing without a window of loss: everything is first built in a local folder; the upload writes files into
the run's own prefix (no other run and no reader trusts it before its manifest.json), then manifest.json, then
the job's index. A publisher killed after any storage call leaves readers the previous result (the index still
names the previous run) or the complete new one, and never deletes a previous run's files: there is nothing to
delete, each run has its own prefix (tests/trainer/test_publish_faults.py kills it after each call in turn).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from kubetune_api.finetunejob import Artifacts, FineTuneJob, Forgetting

from . import adapters, runs
from .data import file_digest

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "deepspeed",
             "galore-torch", "kubetune")
# Trainer.save_model drops its pickled TrainingArguments next to the weights: useless to consumers of the
# adapter, and a pickle is not something to hand out with a model.
_DROP_FROM_ADAPTER = ("training_args.bin",)


@dataclass
class RunRecord:
    """What the runner learned about the run, for the manifest and the model card."""

    job: FineTuneJob
    model_kind: str = "causal"
    model_path: Optional[Path] = None  # the fetched base model folder (merge reloads it from here)
    model_digest: Optional[dict] = None
    train_files: list[dict] = field(default_factory=list)
    eval_files: list[dict] = field(default_factory=list)
    eval_source: str = "none"
    reference_files: list[dict] = field(default_factory=list)
    train_examples: int = 0
    eval_examples: int = 0
    metrics: dict = field(default_factory=dict)  # final: train_loss, eval_loss, perplexity, steps, ...
    forgetting: Optional[Forgetting] = None
    forgetting_action: Optional[str] = None  # "warn" | "fail" when exceeded
    early_stopped: bool = False
    wall_seconds: float = 0.0  # every attempt of the run (attempts.py), not only the last pod's
    device_seconds: float = 0.0
    attempts: list[dict] = field(default_factory=list)  # pod, startedAt, fromStep, toStep, wallSeconds
    devices: int = 1
    device_kind: str = "cpu"
    trainable_parameters: Optional[int] = None
    total_parameters: Optional[int] = None
    resumed_from: Optional[str] = None
    started_at: float = field(default_factory=time.time)
    run: dict = field(default_factory=dict)  # runs.describe(identity): id, specDigest, idSource
    published: dict = field(default_factory=dict)  # step, reason (best | early-stop | last), metric, value, ...


def model_digest(path: Path) -> dict:
    """sha256 of every file of the fetched base model (sorted by path) and one digest over them all."""
    path = Path(path)
    files = []
    overall = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(path).as_posix()
        digest = file_digest(f)
        files.append({"path": rel, "sha256": digest, "bytes": f.stat().st_size})
        overall.update(f"{rel}\0{digest}\n".encode())
    return {"sha256": overall.hexdigest(), "files": files}


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def save_model_files(trainer, tokenizer, dest: Path, *, initial_adapter: Optional[Path], is_main: bool) -> Path:
    """Write the trained adapter (or full model) and tokenizer to a local folder.

    Called on EVERY rank: with DeepSpeed ZeRO-3 the weights are partitioned and Trainer.save_model gathers
    them collectively; only the main process writes files."""
    dest = Path(dest)
    if is_main and dest.exists():
        shutil.rmtree(dest)
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    if initial_adapter is not None and adapters.is_peft_model(model):
        if is_main:
            adapters.save_adapter(model, dest, initial=initial_adapter)
    else:
        trainer.save_model(str(dest))
    if is_main:
        save_tokenizer(tokenizer, dest)
        for name in _DROP_FROM_ADAPTER:
            (dest / name).unlink(missing_ok=True)
    return dest


def save_tokenizer(tokenizer, dest: Path) -> None:
    """save_pretrained, then drop the truncation and padding state training left in tokenizer.json (see the
    module docstring). The file is edited, not the tokenizer: other ranks and later passes still use it."""
    dest = Path(dest)
    tokenizer.save_pretrained(str(dest))
    path = dest / "tokenizer.json"
    if not path.is_file():  # slow (sentencepiece-only) tokenizers keep no such state in a file
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("truncation") is None and data.get("padding") is None:
        return
    data["truncation"] = None
    data["padding"] = None
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _where(uri: str) -> str:
    """A path from_pretrained can take: file:// URIs are local already; others need a download first."""
    if uri.startswith("file://"):
        return uri[len("file://"):].rstrip("/")
    return f"<local copy of {uri}>"


STAGE_WHAT = {
    "cpt": "continued pre-training", "sft": "supervised fine-tuning", "dpo": "direct preference optimization",
    "orpo": "odds-ratio preference optimization", "kto": "Kahneman-Tversky optimization",
    "reward": "reward model", "grpo": "group relative policy optimization", "rloo": "REINFORCE leave-one-out",
    "ppo": "proximal policy optimization",
}


def _adapter_detail(spec) -> str:
    from kubetune_api.defaults import effective_lora

    e = effective_lora(spec.adapter)
    return (f"rank {e['r']}, alpha {e['lora_alpha']}, dropout {e['lora_dropout']}, "
            f"target modules {', '.join(e['target_modules'])}"
            + (", 4-bit base" if spec.adapter.type == "qlora" else "")
            + (", weight-decomposed" if spec.adapter.type == "dora" else ""))


def model_card(record: RunRecord, arts: Artifacts) -> str:
    job = record.job
    spec = job.spec
    m = record.metrics
    f = record.forgetting
    peft = adapters.uses_peft(spec)
    head = "AutoModelForSequenceClassification" if record.model_kind == "reward" else "AutoModelForCausalLM"
    tags = ["kubetune", spec.stage, spec.adapter.type]
    front = ["---"]
    if spec.model.source.startswith("hf://"):  # the Hub links base_model only for a Hub repo id
        front.append(f"base_model: {spec.model.source[len('hf://'):].split('@')[0].rstrip('/')}")
    if peft:
        front.append("library_name: peft")
    front += [f"pipeline_tag: {'text-classification' if record.model_kind == 'reward' else 'text-generation'}",
              "tags:", *[f"- {t}" for t in tags], "---", ""]
    lines = front + [
        f"# {job.metadata.namespace}/{job.metadata.name}",
        "",
        f"Fine-tuned by kubetune: stage **{spec.stage}** ({STAGE_WHAT.get(spec.stage, spec.stage)}), "
        f"adapter **{spec.adapter.type}**" + (f" ({_adapter_detail(spec)})" if peft else "") + ".",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{spec.model.source}`" + (f" @ {spec.model.revision}" if spec.model.revision else "")
        + (f" (sha256 {record.model_digest['sha256'][:16]}...)" if record.model_digest else "") + " |",
        *([f"| started from adapter | `{spec.model.adapter}` (trained further here) |"] if spec.model.adapter else []),
        f"| data | {', '.join(f'`{s.uri}`' for s in spec.dataset.train)} ({spec.dataset.format}, "
        f"{record.train_examples} training examples) |",
        f"| evaluation data | {record.eval_source}: {record.eval_examples} examples |",
        f"| steps | {_fmt(m.get('steps'))}" + (" (stopped early)" if record.early_stopped else "") + " |",
        f"| train loss | {_fmt(m.get('train_loss'))} |",
        f"| eval loss | {_fmt(m.get('eval_loss'))} |",
    ]
    if "perplexity" in m:  # language-model stages only: other stages' losses are not token NLLs
        lines.append(f"| eval perplexity (token-weighted) | {_fmt(m.get('perplexity'))} |")
    for key, label in (("reward_accuracy", "reward accuracy (chosen ranked above rejected)"),
                       ("reward_margin", "reward margin (chosen minus rejected)"),
                       ("mean_reward", "mean reward (latest rollouts)"), ("kl", "KL from the reference policy")):
        if key in m:
            lines.append(f"| {label} | {_fmt(m[key])} |")
    if f is not None:
        verdict = "exceeded" if f.exceeded else "within"
        lines.append(f"| forgetting (reference perplexity) | {_fmt(f.reference_perplexity_before)} -> "
                     f"{_fmt(f.reference_perplexity_after)} ({_fmt(100 * (f.relative_change or 0), 3)} %; "
                     f"{verdict} threshold {_fmt(100 * (f.threshold or 0), 3)} %) |")
    lines += [
        f"| trainable parameters | {_fmt(record.trainable_parameters)} of {_fmt(record.total_parameters)}"
        + (f" ({100 * record.trainable_parameters / record.total_parameters:.2f} %)"
           if record.trainable_parameters and record.total_parameters else "") + " |",
        f"| wall time | {record.wall_seconds:.1f} s on {record.devices} {record.device_kind} device(s) "
        f"({record.device_seconds:.1f} device-seconds) |",
        "",
        "## Load it",
        "",
        "```python",
        f"from transformers import {head}, AutoTokenizer",
    ]
    if peft:
        lines += [
            "from peft import PeftModel",
            "",
            f'base = {head}.from_pretrained("{_where(spec.model.source)}"'
            + (", num_labels=1" if record.model_kind == "reward" else "") + ")",
            f'model = PeftModel.from_pretrained(base, "{_where(arts.adapter_uri)}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{_where(arts.adapter_uri)}")',
        ]
        if arts.merged_model_uri:
            lines += ["", "# or, already merged (no peft needed):",
                      f'model = {head}.from_pretrained("{_where(arts.merged_model_uri)}")']
    else:
        lines += [
            "",
            f'model = {head}.from_pretrained("{_where(arts.adapter_uri)}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{_where(arts.adapter_uri)}")',
        ]
    lines += ["```", "", "`manifest.json` next to this file has the data digests, the resolved config and the "
              "library versions; `metrics.jsonl` and `curves.png` have the training curves.", ""]
    return "\n".join(lines)


def manifest(record: RunRecord, arts: Artifacts) -> dict:
    job = record.job
    spec = job.spec
    config = job.model_dump(by_alias=True, exclude_none=True, mode="json", exclude={"status"})
    return {
        "apiVersion": job.api_version,
        "kind": "FineTuneResult",
        "job": {"name": job.metadata.name, "namespace": job.metadata.namespace, "uid": job.metadata.uid},
        "run": record.run,
        "published": record.published,
        "stage": spec.stage,
        "adapterType": spec.adapter.type,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "baseModel": {"source": spec.model.source, "revision": spec.model.revision, **(record.model_digest or {})},
        # spec.model.adapter: the saved adapter this run started from (and trained further)
        "startAdapter": spec.model.adapter,
        "datasets": {
            "format": spec.dataset.format,
            "train": record.train_files,
            "eval": record.eval_files,
            "evalSource": record.eval_source,
            "trainExamples": record.train_examples,
            "evalExamples": record.eval_examples,
            "reference": record.reference_files,
        },
        "config": config,
        "libraries": library_versions(),
        "metrics": record.metrics,
        "forgetting": record.forgetting.to_k8s() if record.forgetting else None,
        # "fail" here means the job failed on forgetting (exit 80) although these artifacts were written.
        "forgettingAction": record.forgetting_action,
        "earlyStopped": record.early_stopped,
        "resumedFrom": record.resumed_from,
        "wallSeconds": round(record.wall_seconds, 3),
        "attempts": record.attempts,
        "deviceSeconds": round(record.device_seconds, 3),
        # What the run cost in GPU time: the GPUs the job holds (per node x nodes) x wallSeconds, for charge-back
        # next to the operator's status.gpuSeconds (which counts pods as Kubernetes saw them run).
        "gpuSeconds": round(spec.resources.gpus * spec.resources.nodes * record.wall_seconds, 3),
        "devices": record.devices,
        "deviceKind": record.device_kind,
        "parameters": {"trainable": record.trainable_parameters, "total": record.total_parameters},
        "artifacts": arts.to_k8s(),
    }


# What upload_result copies from the local result folder, in order; manifest.json is written after all of them.
RESULT_FOLDERS = ("adapter", "merged")
RESULT_FILES = ("metrics.jsonl", "curves.png", "README.md")
MANIFEST = "manifest.json"


def publish(record: RunRecord, store, local_dir: Path, adapter_dir: Path, tokenizer, metrics_path: Optional[Path],
            *, latest_checkpoint: Optional[str] = None, job_store=None) -> Artifacts:
    """Main process only: build the whole result in local_dir, then upload_result (manifest.json, then the
    job_store's runs.json, last). `store` is the run's store (runs.run_store). Returns the artifact URIs."""
    job = record.job
    spec = job.spec
    local_dir = Path(local_dir)
    if Path(adapter_dir).resolve() != (local_dir / "adapter").resolve():
        shutil.rmtree(local_dir / "adapter", ignore_errors=True)
        shutil.copytree(adapter_dir, local_dir / "adapter")
    shutil.rmtree(local_dir / "merged", ignore_errors=True)
    merges = bool(spec.output.merged_model) and adapters.uses_peft(spec)
    # The URIs are known before anything is uploaded, so the model card (which names them) can travel inside
    # adapter/ and merged/ too, replacing PEFT's blank README template there.
    adapter_uri = store.uri("adapter")
    # full/galore: the trained weights already are the whole model
    merged_uri = store.uri("merged") if merges else (adapter_uri if spec.output.merged_model else None)
    arts = Artifacts(output_uri=store.root_uri, run_id=record.run.get("id"), adapter_uri=adapter_uri,
                     merged_model_uri=merged_uri, manifest_uri=store.uri(MANIFEST), latest_checkpoint=latest_checkpoint,
                     index_uri=job_store.uri(runs.INDEX) if job_store is not None else None)
    card_text = model_card(record, arts)
    (local_dir / "adapter" / "README.md").write_text(card_text)
    if merges:
        merged_dir = local_dir / "merged"
        merged = adapters.merge(adapter_dir, record.model_path, spec, record.model_kind)
        merged.save_pretrained(str(merged_dir))
        save_tokenizer(tokenizer, merged_dir)
        (merged_dir / "README.md").write_text(card_text)
        del merged
    for name in RESULT_FILES:
        (local_dir / name).unlink(missing_ok=True)
    if metrics_path is not None and Path(metrics_path).exists():
        shutil.copyfile(metrics_path, local_dir / "metrics.jsonl")
        try:
            from .monitoring import plot_curves

            plot_curves(local_dir / "metrics.jsonl", local_dir / "curves.png")
        except Exception as exc:  # noqa: BLE001 - a missing plot must not fail a finished training run
            log.warning("could not plot the training curves: %s", exc)
    (local_dir / "README.md").write_text(card_text)
    (local_dir / MANIFEST).write_text(json.dumps(manifest(record, arts), indent=2, default=str) + "\n")
    upload_result(store, local_dir, job_store=job_store)
    return arts


def upload_result(store, local_dir: Path, *, job_store=None) -> None:
    """Upload a result built in local_dir (RESULT_FOLDERS, RESULT_FILES, manifest.json) to the run's store;
    manifest.json after everything else, then the job's runs.json (job_store) naming this run as latest.

    Storage calls only, no torch: the fault-injection test kills it after each call. Files of an earlier attempt
    of the SAME run (a pod that died mid-publish) are replaced; nothing outside the run's prefix is touched but
    runs.json, which is one object written whole."""
    local_dir = Path(local_dir)
    for folder in RESULT_FOLDERS:
        if (local_dir / folder).is_dir():
            if store.exists(folder):  # an earlier attempt of this run; not final (no manifest.json yet)
                store.delete_prefix(folder)
            store.put_dir(local_dir / folder, folder)
            store.mark_complete(folder)
    for name in RESULT_FILES:
        if (local_dir / name).is_file():
            store.put_file(local_dir / name, name)
    man = local_dir / MANIFEST
    store.put_file(man, MANIFEST)  # the run's commit point
    if job_store is not None:
        runs.record_success(job_store, runs.index_entry(json.loads(man.read_text())))
