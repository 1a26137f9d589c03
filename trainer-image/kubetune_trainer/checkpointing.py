"""Checkpoints that survive the pod: upload each one, resume from the latest complete one, save on SIGTERM.

How the runner uses it:

    from kubetune_trainer import checkpointing
    checkpointing.install_sigterm_handler()                 # first thing, in the main thread
    store = runs.run_store(job, run_id)                     # this run's prefix: never another run's checkpoints
    resume = checkpointing.prepare_resume(store, work_dir)  # local path of the latest complete one, or None
    sync = checkpointing.CheckpointSync(store, monitor, keep=spec.training.keepCheckpoints)
    trainer = stage.build_trainer(ctx)                      # ctx.callbacks includes sync
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if sync.preempted:                                      # SIGTERM: checkpoint saved and uploaded
        raise PreemptedError(...)                           # exit 143; the Job restarts the pod, which resumes

Layout in the store (the run's OutputStore, root = <spec.output.uri>/<namespace>/<name>/runs/<run-id>/, runs.py):

    checkpoints/checkpoint-<step>/   what the HF Trainer saved: weights or adapter, optimizer.pt, scheduler.pt,
                                     rng_state.pth (rng_state_<rank>.pth per rank), trainer_state.json,
                                     DeepSpeed's global_step<N>/ shards when DeepSpeed runs
    checkpoints/checkpoint-<step>/_COMPLETE   written last; lists every file and its size

A checkpoint without `_COMPLETE` (the pod died mid-upload) does not exist for `latest_checkpoint`, is replaced
when training reaches that step again, and is deleted once a newer complete one exists. Pruning keeps the
newest `keep` complete checkpoints.
The best checkpoint (the Trainer's `state.best_global_step` when `metric_for_best_model` is set, training_args.py)
is never pruned, here or by the Trainer's own rotation, and a resumed pod downloads it next to the one it
resumes from, so `load_best_model_at_end` still finds it after a restart.

Distributed runs: every rank calls on_save after the Trainer wrote its part. A barrier makes sure all parts
are on disk; then the main process of each node uploads the files on its node (on one node that is rank 0
alone; on several nodes each pod's local disk holds that node's RNG states and DeepSpeed shards), a second
barrier waits for those uploads, and global rank 0 writes `_COMPLETE`, prunes, and reports. The other ranks
wait at the barriers: that is why distributed.COLLECTIVE_TIMEOUT_S is long.

SIGTERM (preemption, `spec.suspend`, node drain): the handler only sets a flag. At the next optimizer step's
end the callback asks the Trainer to save and stop; the checkpoint goes through the same on_save upload, so it
is in the store before the grace period ends. The flag is OR-ed across ranks at each step end so all ranks stop
at the same step (a rank that stopped alone would leave the others hanging in the next all-reduce).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from . import distributed
from .errors import PreemptedError, TrainerError
from .storage import COMPLETE, OutputStore, patience
from .uploader import LatestOnlyUploader

try:  # transformers is in the trainer image; keep this module importable without it for light tooling
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a checkpoint needs for an exact resume (weights are checked separately: their names vary).
_RESUME_STATE = ("trainer_state.json", "scheduler.pt")
_WEIGHT_PATTERNS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin",
                    "model.safetensors.index.json", "pytorch_model.bin.index.json")

# ------------------------------------------------------------------------------------------------ SIGTERM
_sigterm = threading.Event()
_sigterm_time: list[float] = []


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    if not _sigterm.is_set():
        _sigterm_time.append(time.monotonic())
        _sigterm.set()
        log.warning("SIGTERM received: saving a checkpoint at the end of the current step, then stopping")


def install_sigterm_handler() -> bool:
    """Make SIGTERM set a flag instead of killing the process (main thread only). Returns whether installed."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("install_sigterm_handler called outside the main thread: SIGTERM keeps its default action")
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def sigterm_received() -> bool:
    return _sigterm.is_set()


def reset_sigterm() -> None:
    """Forget a received SIGTERM (tests running several trainings in one process)."""
    _sigterm.clear()
    _sigterm_time.clear()


def raise_if_preempted(step: Optional[int] = None) -> None:
    """PreemptedError (exit 143) when SIGTERM arrived: before training (nothing new to save) or after the
    callback saved and stopped."""
    if _sigterm.is_set():
        at = f" at step {step}" if step is not None else ""
        raise PreemptedError(f"stopped by SIGTERM{at}; the latest checkpoint is in the output store and a "
                             "restarted pod resumes from it")


# --------------------------------------------------------------------------------------------- the store
def checkpoint_step(name_or_path: Any) -> Optional[int]:
    """checkpoint-10, checkpoints/checkpoint-10, /x/checkpoint-10 -> 10 (None for other names)."""
    m = _CKPT_RE.match(Path(str(name_or_path).rstrip("/")).name)
    return int(m.group(1)) if m else None


def _steps(store: OutputStore, prefix: str) -> dict[int, str]:
    out = {}
    for name in store.list_dirs(prefix):
        step = checkpoint_step(name)
        if step is not None:
            out[step] = name
    return out


def complete_checkpoints(store: OutputStore, prefix: str = CHECKPOINTS) -> list[int]:
    """Steps of the checkpoints whose `_COMPLETE` marker exists, ascending."""
    return sorted(s for s, name in _steps(store, prefix).items() if store.is_complete(f"{prefix}/{name}"))


def latest_checkpoint(store: OutputStore, prefix: str = CHECKPOINTS) -> Optional[str]:
    """Relative path ("checkpoints/checkpoint-10") of the highest-step complete checkpoint, or None."""
    steps = complete_checkpoints(store, prefix)
    return f"{prefix}/checkpoint-{steps[-1]}" if steps else None


def download_checkpoint(store: OutputStore, rel: str, work_dir: Path, dest_dir: Optional[Path] = None) -> Path:
    """Download a complete checkpoint to <dest_dir or work_dir/resume>/checkpoint-N and check it against
    `_COMPLETE`; returns the local path for `trainer.train(resume_from_checkpoint=...)`."""
    record = store.read_complete(rel)
    if record is None:
        raise TrainerError(f"{store.uri(rel)} is not a complete checkpoint (no {COMPLETE})")
    dest = Path(dest_dir or Path(work_dir) / "resume") / Path(rel).name
    partial = dest.with_name(dest.name + ".partial")
    for p in (dest, partial):
        shutil.rmtree(p, ignore_errors=True)
    store.get_dir(rel, partial)
    bad = [f"{name} ({'missing' if not (partial / name).is_file() else 'size differs'})"
           for name, size in (record.get("files") or {}).items()
           if not (partial / name).is_file() or (partial / name).stat().st_size != size]
    if bad:
        raise TrainerError(f"checkpoint {store.uri(rel)} downloaded incompletely: {', '.join(bad[:5])}")
    partial.rename(dest)
    log.info("downloaded checkpoint %s to %s", store.uri(rel), dest)
    return dest


def prepare_resume(store: OutputStore, work_dir: Path, prefix: str = CHECKPOINTS, *,
                   checkpoints_dir: Optional[Path] = None, rel: Optional[str] = None,
                   keep_best: bool = True) -> Optional[Path]:
    """Every rank: the local path of the latest complete checkpoint in `store` (downloaded once per node), or None.

    rel:             resume from this checkpoint instead of the latest (spec.resumeFrom, runs.py).
    checkpoints_dir: the Trainer's output_dir. When the resumed state names a best checkpoint other than the
                     resumed one, it is downloaded there and trainer_state.json points at it, so the Trainer's
                     best-model tracking (`load_best_model_at_end`) survives the restart. keep_best=False
                     forgets the best instead (continuing ANOTHER run: this run judges its own best).

    Must be called on all ranks (it has a barrier). Nothing writes checkpoints before training starts, so every
    rank lists the same latest one."""
    rel = rel or latest_checkpoint(store, prefix)
    if rel is None:
        return None
    dest = Path(work_dir) / "resume" / Path(rel).name
    if distributed.is_local_main_process():
        dest = download_checkpoint(store, rel, work_dir)
        _restore_best(store, dest, Path(checkpoints_dir or Path(work_dir) / "checkpoints"), work_dir, prefix,
                      keep_best)
    distributed.barrier()
    return dest


def _restore_best(store: OutputStore, resumed: Path, checkpoints_dir: Path, work_dir: Path, prefix: str,
                  keep_best: bool) -> None:
    state_path = resumed / "trainer_state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return
    best = state.get("best_global_step")
    if not keep_best:
        for k in ("best_global_step", "best_metric", "best_model_checkpoint"):
            state[k] = None
    elif best:
        best_rel = f"{prefix}/checkpoint-{best}"
        if best == checkpoint_step(resumed):
            state["best_model_checkpoint"] = str(resumed)
        elif store.is_complete(best_rel):
            local = download_checkpoint(store, best_rel, work_dir, dest_dir=checkpoints_dir)
            state["best_model_checkpoint"] = str(local)
            log.info("restored the best checkpoint so far (step %s) to %s", best, local)
        else:
            log.warning("the best checkpoint so far (step %s) is not in %s: the best model is judged again from "
                        "here on", best, store.root_uri)
            for k in ("best_global_step", "best_metric", "best_model_checkpoint"):
                state[k] = None
    else:
        return
    state_path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def prune(store: OutputStore, keep: int, prefix: str = CHECKPOINTS, *, protect: Iterable[int] = ()) -> list[int]:
    """Delete complete checkpoints beyond the newest `keep`, and incomplete ones older than the newest complete
    one (uploads abandoned by a dead pod). Incomplete ones newer than that are left alone: they are either being
    written or will be replaced when training reaches their step. `protect` (the best step) is never deleted and
    does not count towards `keep`. Returns the deleted steps."""
    steps = _steps(store, prefix)
    complete = [s for s in sorted(steps) if store.is_complete(f"{prefix}/{steps[s]}")]
    if not complete:
        return []
    protected = {int(p) for p in protect if p}
    kept = set(s for s in complete if s in protected) | set(
        [s for s in complete if s not in protected][-max(1, keep):])
    newest = complete[-1]
    doomed = [s for s in sorted(steps) if s not in kept and (s in complete or s < newest)]
    for s in doomed:  # oldest first
        store.delete_prefix(f"{prefix}/{steps[s]}")
    if doomed:
        log.info("pruned checkpoints %s (keeping %s)", doomed, sorted(kept))
    return doomed


def check_checkpoint_dir(path: Path) -> list[str]:
    """What an exact resume needs but the local checkpoint folder lacks (empty = fine)."""
    names = {p.name for p in Path(path).iterdir()} if Path(path).is_dir() else set()
    missing = [n for n in _RESUME_STATE if n not in names]
    if not any(n.startswith("rng_state") for n in names):
        missing.append("rng_state*.pth")
    if not any(n in names for n in _WEIGHT_PATTERNS) and not any(n.startswith("global_step") for n in names):
        missing.append("model/adapter weights")
    if "optimizer.pt" not in names and not any(n.startswith("global_step") for n in names):
        missing.append("optimizer.pt")
    return missing


# ------------------------------------------------------------------------------------------------ callback
class CheckpointSync(TrainerCallback):
    """Upload every checkpoint the HF Trainer saves, `_COMPLETE` last; prune to `keep`; SIGTERM -> save + stop.

    store:   the job's OutputStore.
    monitor: a RunMonitor (or anything with record_checkpoint(uri)); rank 0 reports each complete checkpoint.
    keep:    complete checkpoints kept in the store (spec.training.keepCheckpoints).
    """

    def __init__(self, store: OutputStore, monitor: Any = None, keep: int = 2, *, prefix: str = CHECKPOINTS):
        self.store = store
        self.monitor = monitor
        self.keep = max(1, int(keep))
        self.prefix = prefix
        self.preempted = False  # this run stopped because of SIGTERM (after saving)
        self.preempted_step: Optional[int] = None
        self.last_uri: Optional[str] = None
        self.best_step: Optional[int] = None  # the Trainer's best_global_step at the latest save (never pruned)
        self.upload_seconds: list[float] = []
        self._uploader: Optional[LatestOnlyUploader] = None

    # The best model: a checkpoint at every evaluation that beats the best so far, whatever the checkpoint
    # cadence, so the Trainer's load_best_model_at_end always finds the best step saved (training_args.py).
    # on_evaluate runs before the Trainer updates state.best_metric, so "better than state.best_metric" is new.
    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name = getattr(args, "metric_for_best_model", None)
        if not name or not metrics or state.global_step == 0:  # step 0 (eval_on_start) is a baseline, not a candidate
            return control
        value = metrics.get(name if name.startswith("eval_") else f"eval_{name}")
        if value is None:
            return control
        best = state.best_metric
        better = best is None or (value > best if args.greater_is_better else value < best)
        if better:
            control.should_save = True
        return control

    # SIGTERM -> save and stop at the end of the current optimizer step
    def on_step_end(self, args, state, control, **kwargs):
        stop = distributed.any_rank(sigterm_received()) if distributed.is_distributed() else sigterm_received()
        if stop and not self.preempted:
            self.preempted = True
            self.preempted_step = state.global_step
            log.warning("stopping at step %d for SIGTERM: saving a checkpoint first", state.global_step)
        if self.preempted:
            control.should_save = True
            control.should_training_stop = True
        if self._uploader is not None:
            self._uploader.raise_if_failed()  # the patience budget ran out in the background: end the run now
        return control

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        # 1. every rank has written its part (rng_state_<rank>.pth, DeepSpeed shards)
        distributed.barrier()
        if self._background():
            if distributed.is_main_process():
                self._submit(step, local, getattr(state, "best_global_step", None) or None)
            return control
        # Several nodes: each node's main process uploads its own disk's files, in step with the others
        # (barriers cannot run in a background thread while training runs collectives). Storage outages are
        # still waited out (patience.py), but training waits with them.
        rel = f"{self.prefix}/checkpoint-{step}"
        t0 = time.monotonic()
        if distributed.is_main_process():
            missing = check_checkpoint_dir(local)
            if missing:
                log.warning("checkpoint %s lacks %s: a resume from it will not be exact", local, missing)
            # leftovers of an earlier attempt that died while uploading this same step
            self.store.delete_prefix(rel)
        distributed.barrier()
        # 2. one uploader per node: the files on this node's disk
        if distributed.is_local_main_process():
            if not local.is_dir():
                raise TrainerError(f"the Trainer reported a checkpoint at step {step} but {local} does not exist")
            self.store.put_dir(local, rel)
        distributed.barrier()
        # 3. the marker, then pruning and the report
        if distributed.is_main_process():
            self._complete(step, getattr(state, "best_global_step", None) or None, t0)
        return control

    # ---- background uploads (one node): training goes on while the store is slow or unreachable
    def _background(self) -> bool:
        return distributed.world_size() <= distributed.local_world_size()

    def _submit(self, step: int, local: Path, best: Optional[int]) -> None:
        if not local.is_dir():
            raise TrainerError(f"the Trainer reported a checkpoint at step {step} but {local} does not exist")
        missing = check_checkpoint_dir(local)
        if missing:
            log.warning("checkpoint %s lacks %s: a resume from it will not be exact", local, missing)
        self.uploader.raise_if_failed()
        # Healthy store: one checkpoint at a time, each one uploaded (the previous upload overlapped the steps
        # since). Failing store: do not wait; this checkpoint replaces any still pending (uploader.py).
        while self.uploader.busy() and not patience.policy().in_outage():
            self.uploader.wait(timeout=0.5)
        # A snapshot of hard links: the Trainer's own rotation (save_total_limit) may delete the folder before
        # the upload starts; the links keep the files without copying gigabytes.
        snap = Path(local).parent / UPLOAD_STAGING / f"checkpoint-{step}-{uuid.uuid4().hex[:6]}"
        shutil.copytree(local, snap, copy_function=_link_or_copy)
        self.uploader.submit(_Pending(step, snap, best))

    def _upload(self, item: "_Pending") -> None:
        rel = f"{self.prefix}/checkpoint-{item.step}"
        t0 = time.monotonic()
        with patience.cancellable(self.uploader.cancelled):
            self.store.delete_prefix(rel)  # leftovers of an earlier pod that died uploading this step
            self.store.put_dir(item.path, rel)
            self._complete(item.step, item.best, t0)

    def _complete(self, step: int, best: Optional[int], t0: float) -> None:
        rel = f"{self.prefix}/checkpoint-{step}"
        self.store.mark_complete(rel, {"step": step})
        self.last_uri = self.store.uri(rel)
        self.best_step = best
        dt = time.monotonic() - t0
        self.upload_seconds.append(dt)
        log.info("checkpoint %d uploaded to %s in %.1f s", step, self.last_uri, dt)
        if self.monitor is not None:
            self.monitor.record_checkpoint(self.last_uri)
        # Pruning is housekeeping: one attempt, never waiting out an outage; what it misses now the next
        # checkpoint's pruning deletes.
        try:
            with patience.once():
                prune(self.store, self.keep, self.prefix, protect=[best] if best else [])
        except TrainerError as exc:
            log.warning("pruning old checkpoints skipped (retried after the next checkpoint): %s", exc)

    def on_train_end(self, args, state, control, **kwargs):
        """Training is over (done, or stopped for SIGTERM): every checkpoint handed over is uploaded before the
        run publishes its result or the preempted pod exits; a spent patience budget raises here."""
        if self._uploader is not None:
            self._uploader.wait()
        return control

    def close(self) -> None:
        """Stop the background uploader (a run that ended another way); pending uploads are dropped."""
        if self._uploader is not None:
            self._uploader.close()

    @property
    def uploader(self) -> LatestOnlyUploader:
        if self._uploader is None:
            self._uploader = LatestOnlyUploader(self._upload, discard=lambda item: shutil.rmtree(
                item.path, ignore_errors=True), name="kubetune-checkpoint-upload")
        return self._uploader


UPLOAD_STAGING = ".kubetune-upload"  # next to the Trainer's checkpoint-N folders; it never rotates this one


@dataclass(frozen=True)
class _Pending:
    step: int
    path: Path
    best: Optional[int]

    def __str__(self) -> str:
        return f"checkpoint-{self.step}"


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: copy
        shutil.copy2(src, dst)
    return dst
