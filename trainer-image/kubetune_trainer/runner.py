"""One FineTuneJob, start to finish, the same for every stage and adapter:

    validate (validate_spec + stage/format) -> run identity (runs.py: this run's own prefix) -> fetch model,
    start adapter (spec.model.adapter) and data (storage) -> memory estimate vs this GPU (kubetune_api.memory;
    exit 78 when it cannot fit) -> load data, tokenizer, model -> check the adapter against the model (and load
    the start adapter onto it, trainable) -> RunMonitor.start -> reference perplexity before
    (forgetting) -> StageContext -> stage.build_trainer -> callbacks (monitor, checkpoint sync) + NaN guard
    -> resume from this run's latest complete checkpoint (or, explicitly, spec.resumeFrom) -> train -> best
    checkpoint loaded (when evaluation runs) -> final evaluate -> reference perplexity after -> artifacts
    (manifest.json, then the job's runs.json index) -> TrainerReport

Every failure ends as a TrainerReport with the error's reason, field and exit code (errors.py): the pod's
termination message carries it to the FineTuneJob's conditions. Exceeding the forgetting threshold with
onForgetting: fail raises ForgettingError only *after* the artifacts are written (a person may still want to
look at the model), and manifest.json records it.

Only rank 0 serves metrics and writes artifacts; every rank trains, evaluates and joins collective saves.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from kubetune_api.finetunejob import Artifacts, FineTuneJob, Forgetting
from kubetune_api.report import TrainerReport

from . import config
from .errors import ConfigError, ForgettingError, PreemptedError, TrainerError

log = logging.getLogger("kubetune.runner")

ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"


# ------------------------------------------------------------------------------------------------ reports
def failed_report(err: TrainerError, **extra: Any) -> TrainerReport:
    """A report for an error raised before (or without) a RunMonitor."""
    state = "preempted" if isinstance(err, PreemptedError) else "failed"
    return TrainerReport(state=state, reason=err.reason, message=err.message, field=err.field,
                         exit_code=err.exit_code, **extra)


def write_termination_message(report: TrainerReport) -> None:
    """What RunMonitor.finish does, for runs that never got a monitor (the manifest did not parse)."""
    path = os.environ.get(ENV_TERMINATION_LOG)
    if not path:
        return
    try:
        Path(path).write_text(report.to_termination_message())
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)


def _unexpected(exc: BaseException) -> TrainerError:
    """Anything that is not one of ours is retriable (exit 1): the Job's backoffLimit decides."""
    err = TrainerError(f"{type(exc).__name__}: {exc}"[:2000])
    err.__cause__ = exc
    return err


# ------------------------------------------------------------------------------------------------ pieces
@dataclass
class _Fetched:
    model_path: Path
    tokenizer_path: Path
    adapter_path: Optional[Path]  # spec.model.adapter, fetched
    train: list
    eval: Optional[list]
    reference: Optional[list]


def _fetch_all(job: FineTuneJob, settings: config.RunSettings) -> _Fetched:
    from . import adapters, modeling, storage
    from .data import Source

    spec = job.spec
    endpoint = None  # the runtime's endpoint reaches the trainer as AWS_ENDPOINT_URL
    cache = settings.cache_dir

    def fetch(uri: str, field: str, split: Optional[str] = None) -> Source:
        try:
            return Source(uri, storage.fetch(uri, cache, endpoint=endpoint), split=split)
        except TrainerError as exc:
            raise type(exc)(exc.message, field=field) from None

    model_path = modeling.fetch_model(spec.model.source, cache, endpoint=endpoint, revision=spec.model.revision)
    adapter_path = adapters.fetch_start_adapter(spec.model.adapter, cache, endpoint=endpoint) \
        if spec.model.adapter else None
    tok_path = model_path
    if spec.model.tokenizer:
        tok_path = fetch(spec.model.tokenizer, "spec.model.tokenizer").path
    train = [fetch(s.uri, f"spec.dataset.train[{i}].uri", s.split) for i, s in enumerate(spec.dataset.train)]
    evals = [fetch(s.uri, f"spec.dataset.eval[{i}].uri", s.split) for i, s in enumerate(spec.dataset.eval)] \
        if spec.dataset.eval else None
    ref = spec.evaluation.reference if spec.evaluation else None
    reference = [fetch(s.uri, f"spec.evaluation.reference[{i}].uri", s.split)
                 for i, s in enumerate(ref)] if ref else None
    return _Fetched(model_path, tok_path, adapter_path, train, evals, reference)


def _digest_and_record(model_path: Path, store, job: FineTuneJob, ident) -> dict:
    """Hash the base model (artifacts.model_digest) and note the sha256 in the run's run.json, where a later
    spec.resumeFrom that names this run checks it."""
    from . import artifacts, runs

    digest = artifacts.model_digest(model_path)
    try:
        runs.record_model_digest(store, job, ident, digest["sha256"])
    except TrainerError as exc:  # the manifest still gets the digest; only resumeFrom checks lose it
        log.warning("could not record the base model digest in run.json: %s", exc)
    return digest


def _device_for_eval(model):
    """Put a not-yet-placed model on this rank's GPU before measuring anything (reference perplexity on an 8B
    model on CPU would take hours). Quantized models were placed at load time; DeepSpeed places its own."""
    from . import distributed, modeling

    if not modeling.has_cuda() or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "hf_device_map", None):
        return model
    return model.to(f"cuda:{distributed.local_rank()}")


# Stages whose eval loss is a token-level negative log-likelihood: only there is exp(loss) a perplexity (a DPO
# or reward-model loss is a preference loss; exp of it means nothing).
LM_LOSS_STAGES = ("cpt", "sft")


def _final_metrics(trainer, train_output, eval_metrics: dict, stage: str) -> dict:
    out: dict[str, Any] = {"steps": trainer.state.global_step, "epoch": trainer.state.epoch,
                           "tokens": getattr(trainer.state, "num_input_tokens_seen", None) or None}
    if train_output is not None:
        out["train_loss"] = train_output.training_loss
        out["train_runtime_seconds"] = train_output.metrics.get("train_runtime")
    # The last logged training loss (train_loss above is the run's mean, dominated by the first steps).
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if losses:
        out["last_loss"] = losses[-1]
    if "eval_loss" in eval_metrics:
        out["eval_loss"] = eval_metrics["eval_loss"]
    if stage in LM_LOSS_STAGES and "eval_perplexity" in eval_metrics:
        # Token-weighted (monitoring/token_perplexity.py), not exp(eval_loss), a mean of per-batch means.
        out["perplexity"] = eval_metrics["eval_perplexity"]
    first_eval = next((e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e), None)
    if first_eval is not None:
        out["first_eval_loss"] = first_eval
    return {k: v for k, v in out.items() if v is not None}


def _zero3(spec) -> bool:
    d = spec.distributed
    return bool(d and d.deepspeed and int(d.deepspeed.zero_stage) == 3)


def _reload_trained(adapter_dir: Path, base_path: Path, spec, kind: str, tokenizer):
    """The trained model as saved: the base (4-bit again for qlora) + the adapter, or the full model."""
    from . import adapters, modeling

    if adapters.uses_peft(spec):
        from peft import PeftModel

        base = modeling.load_model(base_path, spec, kind=kind, tokenizer=tokenizer)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    else:
        model = modeling.load_model(adapter_dir, spec, kind=kind, tokenizer=tokenizer, quantize=False)
    return _device_for_eval(model)


def forgetting_result(before: float, after: float, threshold: float) -> Forgetting:
    change = after / before - 1.0 if before > 0 and math.isfinite(before) else None
    if change is not None and not math.isfinite(change):
        change = None
    exceeded = (change is not None and change > threshold) or (math.isfinite(before) and not math.isfinite(after))
    return Forgetting(reference_perplexity_before=before, reference_perplexity_after=after if math.isfinite(after)
                      else None, relative_change=change, threshold=threshold, exceeded=exceeded)


# ------------------------------------------------------------------------------------------------ run
def run(job: FineTuneJob, settings: Optional[config.RunSettings] = None, *,
        extra_callbacks: Iterable[Any] = (), console_logs: bool = True) -> TrainerReport:
    """Run the job; never raises for training failures: the report says what happened (and its exit code).

    extra_callbacks: more TrainerCallbacks (the CLI's progress bar). console_logs=False drops the
    Trainer's own per-log print (the CLI draws progress itself)."""
    settings = settings or config.RunSettings.from_env()
    started = time.time()
    from . import checkpointing

    # First thing, in the main thread: from here on SIGTERM means "checkpoint and stop", not "die".
    checkpointing.install_sigterm_handler()
    monitor = None
    report: Optional[TrainerReport] = None
    state: dict[str, Any] = {}
    try:
        job = config.apply_settings(job, settings)
        config.validate_job(job)
        from .storage import patience

        # From here on every object-storage call waits out outages up to the job's budget (patience.py).
        patience.configure(job.spec.output.storage_patience_seconds)
        config.preflight(job, settings)
        from . import distributed
        from .monitoring import RunMonitor

        settings.work_dir.mkdir(parents=True, exist_ok=True)
        monitor = RunMonitor(job, settings.work_dir, host=settings.metrics_host, port=settings.metrics_port,
                             rank=distributed.rank())
        monitor.start()
        from .rewards.failures import add_listener

        # Failed reward calls count in kubetune_reward_errors_total; removed again so that runs in one process
        # (tests, `kubetune run` loops) do not count into an earlier run's monitor.
        remove_listener = add_listener(monitor.count_reward_error)
        try:
            report = _run(job, settings, monitor, state, started, list(extra_callbacks), console_logs)
        finally:
            remove_listener()
    except TrainerError as exc:
        if isinstance(exc, PreemptedError):
            log.warning("%s", exc)
        else:
            log.error("run failed: %s", exc)
        report = _error_report(monitor, exc, state)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must become a report with an exit code
        log.exception("run failed unexpectedly")
        report = _error_report(monitor, _unexpected(exc), state)
    finally:
        if monitor is not None and report is not None:
            monitor.finish(report)  # rank 0 only
            from . import distributed

            if not monitor.reporting and distributed.is_local_main_process():
                # The other pods of a multi-node gang: their own report makes kubetune_trainer.launch exit with
                # the run's code (0 on success, 143 after a SIGTERM checkpoint) instead of torchrun's, which is
                # 1 whenever a worker failed, so the JobSet's failure policy sees what really happened.
                write_termination_message(report)
        elif report is not None:
            write_termination_message(report)
    return report


def _error_report(monitor, err: TrainerError, state: dict) -> TrainerReport:
    kind = "preempted" if isinstance(err, PreemptedError) else "failed"
    if monitor is None:
        return failed_report(err)
    return monitor.report(kind, error=err, artifacts=state.get("artifacts"), forgetting=state.get("forgetting"))


def _finished(store, job_store, monitor) -> Optional[TrainerReport]:
    """This run already published its result (a pod that died after manifest.json, before exiting): make sure
    the index names it and report success again instead of training a finished run once more."""
    from . import distributed, runs

    man = runs.read_json(store, runs.MANIFEST)
    if man is None:
        return None
    if distributed.rank() == 0:
        index = runs.read_index(job_store)
        if not any(e.get("runId") == (man.get("run") or {}).get("id") for e in index["runs"]):
            runs.record_success(job_store, runs.index_entry(man))
    log.info("run already finished: %s", store.uri(runs.MANIFEST))
    return monitor.report("succeeded", artifacts=Artifacts.model_validate(man.get("artifacts") or {}))


def _resume_point(job: FineTuneJob, store, work: Path, record, digest_future) -> Optional[Path]:
    """This run's own latest complete checkpoint; else, only when spec.resumeFrom asks, another run's checkpoint
    checked for the same stage, adapter and base model (runs.check_compatible). Every rank calls it."""
    from . import checkpointing, distributed, runs

    resume = checkpointing.prepare_resume(store, work, checkpoints_dir=work / "checkpoints")
    if resume:
        record.resumed_from = store.uri(f"{checkpointing.CHECKPOINTS}/{resume.name}")
        return resume
    ref = job.spec.resume_from
    if not ref:
        return None
    src = runs.resolve_resume_from(job, ref)
    err = None
    if distributed.rank() == 0:  # only rank 0 hashed the base model
        try:
            runs.check_compatible(src, job, (digest_future.result() or {}).get("sha256"))
        except ConfigError as exc:
            err = exc
    if distributed.any_rank(err is not None):
        raise err or ConfigError("rank 0 refused spec.resumeFrom (see its log)", field="spec.resumeFrom")
    resume = checkpointing.prepare_resume(src.store, work, rel=src.checkpoint, keep_best=False)
    record.resumed_from = src.uri
    return resume


def _run(job: FineTuneJob, settings: config.RunSettings, monitor, state: dict, started: float,
         extra_callbacks: list, console_logs: bool) -> TrainerReport:
    from . import (adapters, artifacts, attempts, checkpointing, data, distributed, modeling, runs, storage,
                   training_args)
    from .monitoring import reference_perplexity
    from .stages import StageContext, get_stage

    spec = job.spec
    try:
        stage = get_stage(spec.stage)
    except KeyError as exc:
        raise ConfigError(str(exc), field="spec.stage") from None
    is_main = distributed.rank() == 0
    world = distributed.world_size()
    record = artifacts.RunRecord(job=job, model_kind=stage.model_kind, started_at=started, devices=world,
                                 device_kind="gpu" if modeling.has_cuda() else "cpu")
    work = settings.work_dir

    # ---- run identity: everything this run reads and writes lives under its own prefix (runs.py)
    ident = runs.identify(job, settings.run_id)
    record.run = runs.describe(ident)
    job_store = runs.job_store(job)
    store = runs.run_store(job, ident.run_id)
    log.info("run %s (%s) of %s/%s: %s", ident.run_id, ident.source, job.metadata.namespace, job.metadata.name,
             store.root_uri)
    runs.begin(store, job, ident, write=is_main)
    done = _finished(store, job_store, monitor)
    if done is not None:
        return done

    # ---- fetch + load. One process per node downloads into the node's cache; the others then find it there.
    if distributed.is_local_main_process():
        fetched = _fetch_all(job, settings)
    distributed.barrier()
    if not distributed.is_local_main_process():
        fetched = _fetch_all(job, settings)
    record.model_path = fetched.model_path
    # Before any weights load: a job that cannot fit this GPU fails now, with the numbers (exit 78).
    modeling.check_memory(spec, fetched.model_path)
    # Hashing a multi-GB base model takes a while: do it while the data loads and the model trains.
    hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-digest")
    digest_future = hasher.submit(_digest_and_record, fetched.model_path, store, job, ident) if is_main else None
    hasher.shutdown(wait=False)

    # The node's first process parses the files into Arrow files in the node cache; the other ranks then
    # memory-map them (one parse per node, and host memory that does not grow with the number of ranks).
    data_cache = settings.cache_dir / "datasets"
    with distributed.local_main_first(spec):
        prepared = data.prepare(spec.dataset, fetched.train, fetched.eval, seed=spec.training.seed,
                                cache_dir=data_cache)
    record.train_files, record.eval_files, record.eval_source = prepared.train_files, prepared.eval_files, \
        prepared.eval_source
    record.train_examples = len(prepared.train)
    record.eval_examples = len(prepared.eval) if prepared.eval is not None else 0
    tokenizer = modeling.load_tokenizer(fetched.tokenizer_path, spec,
                                        field="spec.model.tokenizer" if spec.model.tokenizer else "spec.model.source")
    targs = training_args.build(job, work, has_eval=prepared.eval is not None)
    # ZeRO-3: the DeepSpeed config must be live before from_pretrained so each rank loads only its partition
    # (kept alive until the stage's own TrainingArguments exists).
    zero3_load = distributed.partition_at_load(targs)
    model = modeling.load_model(fetched.model_path, spec, kind=stage.model_kind, tokenizer=tokenizer,
                                uri=spec.model.source)
    adapters.validate(spec, model)
    peft_config = adapters.peft_config(spec, stage.model_kind)
    start_adapter = None
    if fetched.adapter_path is not None:
        # spec.model.adapter: this stage keeps training a saved adapter (handover continue). Loaded before the
        # forgetting baseline, which measures the model this stage starts from. The stage gets the PeftModel and
        # no peft_config (nothing new to create). A resumed pod still gets its own checkpoint below:
        # trainer.train(resume_from_checkpoint=...) loads the checkpoint's adapter weights over these.
        start_adapter = adapters.check_start_adapter(spec, fetched.adapter_path, model, stage.model_kind,
                                                     uri=spec.model.adapter)
        model = adapters.load_start_adapter(adapters.prepare_base(model, spec), fetched.adapter_path,
                                            start_adapter, uri=spec.model.adapter)
        peft_config = None
        log.info("starting from the adapter %s (r=%s, alpha=%s, dora=%s)", spec.model.adapter, start_adapter.r,
                 start_adapter.lora_alpha, start_adapter.use_dora)

    # ---- forgetting baseline (before any new adapter wraps or modifies the base)
    ev = spec.evaluation
    ref_texts = None
    before = None
    if fetched.reference:
        with distributed.local_main_first(spec):
            ref_texts, record.reference_files = data.load_reference_texts(
                fetched.reference, ev.reference_max_samples, seed=spec.training.seed, cache_dir=data_cache)
        if zero3_load is not None:
            # The loaded model is partitioned (it runs only inside the DeepSpeed engine): rank 0 measures an
            # unpartitioned copy, as it measures the saved model after training.
            if is_main:
                with distributed.zero3_init_disabled():
                    base = modeling.load_model(fetched.model_path, spec, kind=stage.model_kind,
                                               tokenizer=tokenizer, uri=spec.model.source)
                    if start_adapter is not None:
                        base = adapters.load_start_adapter(base, fetched.adapter_path, start_adapter,
                                                           uri=spec.model.adapter)
                    base = _device_for_eval(base)
                    before = reference_perplexity(base, tokenizer, ref_texts, spec.training.max_length)
                    del base
        else:
            model = _device_for_eval(model)
            before = reference_perplexity(model, tokenizer, ref_texts, spec.training.max_length)
        if before is not None:
            monitor.record_reference("before", before)
            log.info("reference perplexity before training: %.4g", before)

    # ---- trainer
    if start_adapter is None:  # a start adapter's base was prepared before it was loaded
        model = adapters.prepare_base(model, spec)
    sync = checkpointing.CheckpointSync(store, monitor, keep=spec.training.keep_checkpoints)
    # Each checkpoint carries the run's metrics and attempts so far (attempts.py): placed before `sync`, which
    # uploads the checkpoint folder.
    history = attempts.RunHistory(monitor, started=started, pod=os.environ.get("POD_NAME"), is_main=is_main)
    callbacks = [monitor.callback(), history.callback(), sync, *extra_callbacks]
    ctx = StageContext(
        job=job, model=model, tokenizer=tokenizer, peft_config=peft_config,
        train_dataset=prepared.train, eval_dataset=prepared.eval,
        training_args=targs,
        callbacks=callbacks, work_dir=work,
        load_model=modeling.model_loader(spec, settings.cache_dir),
        fetch=lambda uri: storage.fetch(uri, settings.cache_dir),
    )
    stage.validate_dataset(ctx)
    trainer = stage.build_trainer(ctx)
    del zero3_load  # the trainer's own arguments hold the same DeepSpeed config from here on
    present = trainer.callback_handler.callbacks
    for cb in callbacks:  # a stage that dropped ctx.callbacks still gets checkpointing and metrics
        if cb not in present:
            trainer.add_callback(cb)
    if not console_logs:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    monitor.guard(trainer)
    best_by, why_not_best = training_args.best_model(job, has_eval=prepared.eval is not None)
    training_args.enable_best_model(trainer)
    record.trainable_parameters, record.total_parameters = adapters.trainable_parameters(trainer.model)
    initial_adapter = None
    if adapters.needs_weight_conversion(spec) and is_main:
        initial_adapter = adapters.save_initial_adapter(trainer.model, work / "initial-adapter")

    # ---- train (resuming from the latest complete checkpoint a previous pod of THIS run left in the store)
    checkpointing.raise_if_preempted()  # SIGTERM during loading: nothing new to save, just stop
    resume = _resume_point(job, store, work, record, digest_future)
    if resume:
        log.info("resuming from %s", record.resumed_from)
        step = checkpointing.checkpoint_step(resume.name) or 0
        if record.resumed_from == store.uri(f"{checkpointing.CHECKPOINTS}/{resume.name}"):
            history.restore(resume, step)  # this run's own checkpoint: its earlier attempts and their metrics
        # eval_on_start is the run's step-0 baseline, which the first attempt measured (and logged): a resumed
        # pod would evaluate the restored weights once more and log them as a second, late "step 0".
        trainer.args.eval_on_start = False
    try:
        # Checkpoints upload in the background; the sync's on_train_end waits for them (or raises the
        # StorageUnavailableError that ended the patience budget).
        train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        sync.close()
    if sync.preempted:
        raise PreemptedError(f"SIGTERM received: checkpoint saved at step {trainer.state.global_step} "
                             f"({sync.last_uri}); a restarted pod resumes from it")

    # ---- which weights are published: the best checkpoint (the Trainer loaded it at the end) or the last step
    st = trainer.state
    if best_by is not None and st.best_model_checkpoint and st.best_global_step:
        record.published = {"step": st.best_global_step, "reason": "early-stop" if monitor.early_stopped else "best",
                            "metric": best_by[0], "value": st.best_metric, "lastStep": st.global_step,
                            "checkpoint": store.uri(f"{checkpointing.CHECKPOINTS}/checkpoint-{st.best_global_step}")}
    else:
        why = why_not_best if best_by is None else "no evaluation after step 0 produced a checkpoint"
        record.published = {"step": st.global_step, "reason": "last", "why": why}
    log.info("publishing step %s (%s)", record.published["step"], record.published["reason"])

    # ---- final evaluation (of the published weights)
    eval_metrics: dict = {}
    if prepared.eval is not None:
        at = record.published["step"]
        last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e and e.get("step") == at),
                    None)
        # The Trainer's own cadence may already have evaluated these weights: no second pass.
        eval_metrics = last if last is not None else trainer.evaluate()
    record.metrics = _final_metrics(trainer, train_output, eval_metrics, spec.stage)
    # The stage's headline figure (reward accuracy/margin, mean reward/KL) for the manifest and the model card.
    for name, value in monitor.headline().items():
        record.metrics.setdefault(name, value)
    record.early_stopped = bool(monitor.early_stopped)

    # ---- the trained weights, locally (every rank: ZeRO-3 gathers partitioned weights collectively)
    local = work / "artifacts"
    local.mkdir(parents=True, exist_ok=True)
    adapter_dir = artifacts.save_model_files(trainer, tokenizer, local / "adapter",
                                             initial_adapter=initial_adapter, is_main=is_main)

    # ---- forgetting: reference perplexity after training
    if ref_texts is not None:
        after = None
        if _zero3(spec):
            # ZeRO-3 leaves the in-memory parameters partitioned: measure the saved model instead.
            if is_main:
                with distributed.zero3_init_disabled():  # rank 0 alone: no zero.Init partitioning
                    trained = _reload_trained(adapter_dir, fetched.model_path, spec, stage.model_kind, tokenizer)
                after = reference_perplexity(trained, tokenizer, ref_texts, spec.training.max_length)
                del trained
        else:
            after = reference_perplexity(trainer.model, tokenizer, ref_texts, spec.training.max_length)
        if after is not None:
            monitor.record_reference("after", after)
            record.forgetting = forgetting_result(before, after, ev.forgetting_threshold)
            state["forgetting"] = record.forgetting
            log.info("reference perplexity after training: %.4g (%+.1f %%, threshold %+.1f %%)", after,
                     100 * (record.forgetting.relative_change or 0), 100 * ev.forgetting_threshold)
            if record.forgetting.exceeded:
                record.forgetting_action = ev.on_forgetting

    # ---- publish (main process), manifest.json last
    arts = None
    if is_main:
        # every attempt of the run (pods that were preempted, deleted or crashed before this one, attempts.py)
        record.attempts = history.attempts(trainer.state.global_step)
        record.wall_seconds = history.wall_seconds(record.attempts)
        record.device_seconds = record.wall_seconds * world
        record.model_digest = digest_future.result() if digest_future else None
        latest = sync.last_uri or (store.uri(rel) if (rel := checkpointing.latest_checkpoint(store)) else None)
        arts = artifacts.publish(record, store, local, adapter_dir, tokenizer, monitor.metrics_path,
                                 latest_checkpoint=latest, job_store=job_store)
        keep_runs = spec.output.keep_runs
        if keep_runs:
            runs.apply_retention(job_store, keep_runs, current=ident.run_id)
        state["artifacts"] = arts
        log.info("artifacts: %s", arts.adapter_uri)
    distributed.barrier()
    if record.forgetting_action == "fail":
        f = record.forgetting
        raise ForgettingError(
            f"reference perplexity rose {100 * (f.relative_change or math.inf):.1f} % "
            f"({f.reference_perplexity_before:.4g} -> {f.reference_perplexity_after}), above the threshold "
            f"{100 * f.threshold:.1f} %; artifacts were written and manifest.json marks them",
            field="spec.evaluation.forgettingThreshold")
    return monitor.report("succeeded", artifacts=arts, forgetting=record.forgetting)
