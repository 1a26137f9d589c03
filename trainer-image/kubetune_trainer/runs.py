"""Run identity and the run-scoped layout of a job's output: every run is its own.

A *run* is one training of a FineTuneJob from step 0 to its result. Its id is the FineTuneJob's uid in a cluster
(the operator passes it as KUBETUNE_RUN_ID; it is also in the mounted job.yaml), a fresh id for every local
`kubetune run`, and `spec-<digest>` for a bare `python -m kubetune_trainer --config job.yaml` without either.
A pod restart, a preemption or a suspend/resume of the same FineTuneJob keeps the uid, so it resumes its own
checkpoints; a FineTuneJob deleted and re-created under the same name gets a new uid and starts fresh beside
the old run, never reading, resuming, pruning or deleting the old run's files.

Layout under <spec.output.uri>/<namespace>/<name>/ (the job's store):

    runs.json                        the job's index: every finished run and `latest`. Written LAST, as one object
                                     (an S3 PUT or a rename), so a reader sees the previous index or the new one.
    runs/<run-id>/run.json           who the run is: id, spec digest, stage, adapter, base model (+ its sha256)
    runs/<run-id>/checkpoints/...    this run's checkpoints (checkpointing.py)
    runs/<run-id>/adapter/ merged/ metrics.jsonl curves.png README.md
    runs/<run-id>/manifest.json      the run's commit point (artifacts.py): present = every file it names is there

Old pods of a deleted FineTuneJob may still be writing their SIGTERM checkpoint when the new one starts: they
write under their own run's prefix, so the two never overlap and the new run needs not wait for them.

    from kubetune_trainer import runs
    ident = runs.identify(job, settings.run_id)           # RunIdentity(run_id, spec_digest, source)
    store = runs.run_store(job, ident.run_id)             # OutputStore at .../runs/<run-id>/
    runs.record_success(runs.job_store(job), entry)       # after manifest.json: runs.json -> this run
    runs.latest_result(runs.job_store(job))               # what a reader finds: (entry, manifest) or None
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError
from .storage import OutputStore, job_output_uri

log = logging.getLogger(__name__)

RUNS = "runs"
INDEX = "runs.json"
RUN_RECORD = "run.json"
MANIFEST = "manifest.json"
INDEX_VERSION = 1
RUN_ID_ENV = "KUBETUNE_RUN_ID"
# The spec sections that shape what is trained: two runs with the same digest train the same thing.
DIGEST_SECTIONS = ("stage", "model", "dataset", "adapter", "training", "distributed")
# A run id is one path segment of an object key: no '/', no '..', nothing a shell or S3 console mangles.
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ------------------------------------------------------------------------------------------------ identity
@dataclass(frozen=True)
class RunIdentity:
    run_id: str
    spec_digest: str
    source: str  # "env" (the operator / CLI said), "uid" (metadata.uid), "spec" (derived from the spec digest)


def spec_digest(spec) -> str:
    """sha256 over the spec sections that shape training (DIGEST_SECTIONS), in canonical JSON."""
    data = spec.model_dump(by_alias=True, exclude_none=True, mode="json", include=set(DIGEST_SECTIONS))
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def new_run_id(now: Optional[float] = None) -> str:
    """A fresh, sortable id for a local run: 20261130-194000-3f9a1c."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]


def check_run_id(run_id: str, field: str = "env " + RUN_ID_ENV) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id) or ".." in run_id:
        raise ConfigError(f"{run_id!r} is not a usable run id: letters, digits, '.', '_' and '-' only (at most 128, "
                          "no '..')", field=field)
    return run_id


def identify(job, run_id: Optional[str] = None) -> RunIdentity:
    """This run's identity: `run_id` (KUBETUNE_RUN_ID, set by the operator or the CLI) > metadata.uid >
    spec-<first 16 hex of the spec digest>."""
    digest = spec_digest(job.spec)
    if run_id:
        return RunIdentity(check_run_id(run_id), digest, "env")
    uid = getattr(job.metadata, "uid", None)
    if uid:
        return RunIdentity(check_run_id(uid, "metadata.uid"), digest, "uid")
    return RunIdentity(f"spec-{digest[:16]}", digest, "spec")


# --------------------------------------------------------------------------------------------------- stores
def job_store(job) -> OutputStore:
    """<spec.output.uri>/<namespace>/<name>/: the index and every run of this job."""
    return OutputStore.for_job(job)


def run_store(job, run_id: str) -> OutputStore:
    """<spec.output.uri>/<namespace>/<name>/runs/<run-id>/: everything one run writes."""
    return OutputStore(f"{job_output_uri(job)}{RUNS}/{check_run_id(run_id)}/")


def run_record(job, ident: RunIdentity, model_digest: Optional[str] = None) -> dict:
    spec = job.spec
    return {
        "runId": ident.run_id,
        "specDigest": ident.spec_digest,
        "job": {"namespace": job.metadata.namespace, "name": job.metadata.name, "uid": job.metadata.uid},
        "stage": spec.stage,
        "adapter": spec.adapter.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "baseModel": {"source": spec.model.source, "revision": spec.model.revision, "sha256": model_digest},
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def read_json(store: OutputStore, rel: str) -> Optional[dict]:
    text = store.read_text(rel)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def begin(store: OutputStore, job, ident: RunIdentity, *, write: bool = True) -> dict:
    """Every rank, before training; the main process (write=True) writes run.json unless it exists (a restarted
    pod of the same run keeps the first one).

    A run id that exists with another spec digest means someone reused an id for a different training (a local
    `--resume ID` after editing the manifest): refused, since resuming it would mix two trainings."""
    rec = read_json(store, RUN_RECORD)
    if rec is not None:
        if rec.get("specDigest") not in (None, ident.spec_digest):
            raise ConfigError(
                f"run {ident.run_id} at {store.root_uri} was started from a different spec (digest "
                f"{str(rec.get('specDigest'))[:12]} here {ident.spec_digest[:12]}): it cannot be continued with this "
                "one; start a fresh run (a new FineTuneJob, or `kubetune run` without --resume)", field="spec")
        return rec
    rec = run_record(job, ident)
    if write:
        store.write_text(RUN_RECORD, json.dumps(rec, indent=1, sort_keys=True))
    return rec


def record_model_digest(store: OutputStore, job, ident: RunIdentity, sha256: str) -> None:
    """Add the base model's sha256 to run.json once hashed (resumeFrom checks it against a new run's base)."""
    rec = read_json(store, RUN_RECORD) or run_record(job, ident)
    rec.setdefault("baseModel", {})["sha256"] = sha256
    store.write_text(RUN_RECORD, json.dumps(rec, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------------------- index
def read_index(store: OutputStore) -> dict:
    """The job's runs.json ({"version", "latest", "runs": [entry, ...]}); empty when there is none yet."""
    data = read_json(store, INDEX)
    if data is None or not isinstance(data.get("runs"), list):
        if store.read_text(INDEX) is not None:
            log.warning("%s is not a valid run index; it will be rebuilt from the runs' manifests", store.uri(INDEX))
            return rebuild_index(store)
        return {"version": INDEX_VERSION, "latest": None, "runs": []}
    return data


def rebuild_index(store: OutputStore) -> dict:
    """An index from the finished runs found under runs/ (their manifest.json), newest last."""
    entries = []
    for run_id in store.list_dirs(RUNS):
        man = read_json(store, f"{RUNS}/{run_id}/{MANIFEST}")
        if man is not None:
            entries.append(index_entry(man))
    entries.sort(key=lambda e: (e.get("finishedAt") or "", e["runId"]))
    return {"version": INDEX_VERSION, "latest": entries[-1]["runId"] if entries else None, "runs": entries}


def index_entry(manifest: dict) -> dict:
    """What runs.json says about one finished run (from its manifest.json)."""
    arts = manifest.get("artifacts") or {}
    run = manifest.get("run") or {}
    return {k: v for k, v in {
        "runId": run.get("id"),
        "specDigest": run.get("specDigest"),
        "finishedAt": manifest.get("createdAt"),
        "manifestUri": arts.get("manifestUri"),
        "adapterUri": arts.get("adapterUri"),
        "mergedModelUri": arts.get("mergedModelUri"),
        "published": manifest.get("published"),
        "evalLoss": (manifest.get("metrics") or {}).get("eval_loss"),
    }.items() if v is not None}


def record_success(store: OutputStore, entry: dict) -> dict:
    """Add a finished run to runs.json and make it `latest`: ONE write of the whole index (the commit point that
    makes the run discoverable). Only a finished run's main process calls it, after its manifest.json."""
    index = read_index(store)
    runs = [e for e in index["runs"] if e.get("runId") != entry["runId"]] + [entry]
    index = {"version": INDEX_VERSION, "latest": entry["runId"], "runs": runs}
    store.write_text(INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def latest_result(store: OutputStore) -> Optional[tuple[dict, dict]]:
    """What a reader finds: the index's latest run and its manifest.json, or None when no run finished.

    The index is written after the run's manifest, and a run's manifest after all its files: a latest run
    without a manifest cannot happen unless someone deleted it, which is reported, not papered over."""
    index = read_index(store)
    latest = index.get("latest")
    if not latest:
        return None
    entry = next((e for e in index["runs"] if e.get("runId") == latest), None)
    man = read_json(store, f"{RUNS}/{latest}/{MANIFEST}")
    if entry is None or man is None:
        raise ConfigError(f"{store.uri(INDEX)} names run {latest} as latest but {store.uri(f'{RUNS}/{latest}/')} "
                          "holds no manifest.json (deleted by hand?)")
    return entry, man


def resumable(store: OutputStore, run_id: Optional[str] = None) -> str:
    """The run `kubetune run --resume [RUN_ID]` continues: RUN_ID (it must exist and be unfinished) or the
    newest unfinished run of the job (run.json but no manifest.json). ConfigError naming what exists otherwise."""
    ids = store.list_dirs(RUNS)
    finished = {i for i in ids if store.exists(f"{RUNS}/{i}/{MANIFEST}")}
    if run_id:
        check_run_id(run_id, "--resume")
        if run_id not in ids:
            raise ConfigError(f"--resume {run_id}: no such run under {store.uri(RUNS)}/ (runs: {ids or 'none'})",
                              field="--resume")
        if run_id in finished:
            raise ConfigError(f"--resume {run_id}: that run already finished; its result is at "
                              f"{store.uri(f'{RUNS}/{run_id}/')}", field="--resume")
        return run_id
    created = {i: (read_json(store, f"{RUNS}/{i}/{RUN_RECORD}") or {}).get("createdAt") or "" for i in ids
               if i not in finished}
    if not created:
        raise ConfigError(f"--resume: no interrupted run of this job under {store.root_uri} (finished: "
                          f"{sorted(finished) or 'none'}); run without --resume to start a fresh one",
                          field="--resume")
    return max(created, key=lambda i: (created[i], i))


# ------------------------------------------------------------------------------------------------ retention
def apply_retention(store: OutputStore, keep_runs: int, current: str) -> list[str]:
    """Delete the runs beyond the newest `keep_runs` (spec.output.keepRuns), never `current`. Only an explicit
    setting calls this: without it, no run is ever deleted. Order matters for readers: the index stops naming
    a run first, then its manifest.json (it stops looking final), then the rest of its files."""
    keep_runs = max(1, int(keep_runs))
    ids = store.list_dirs(RUNS)
    created = {}
    for run_id in ids:
        rec = read_json(store, f"{RUNS}/{run_id}/{RUN_RECORD}") or {}
        created[run_id] = rec.get("createdAt") or ""
    ordered = sorted((i for i in ids if i != current), key=lambda i: (created[i], i))
    doomed = ordered[:max(0, len(ordered) - (keep_runs - 1))]
    if not doomed:
        return []
    index = read_index(store)
    kept = [e for e in index["runs"] if e.get("runId") not in doomed]
    if len(kept) != len(index["runs"]):
        latest = index.get("latest") if index.get("latest") not in doomed else (kept[-1]["runId"] if kept else None)
        store.write_text(INDEX, json.dumps({"version": INDEX_VERSION, "latest": latest, "runs": kept}, indent=1,
                                           sort_keys=True) + "\n")
    for run_id in doomed:
        if store.exists(f"{RUNS}/{run_id}/{MANIFEST}"):
            store.delete_prefix(f"{RUNS}/{run_id}/{MANIFEST}")
        store.delete_prefix(f"{RUNS}/{run_id}")
    log.info("retention (keepRuns %d): deleted runs %s", keep_runs, doomed)
    return doomed


# --------------------------------------------------------------------------------------------- resumeFrom
@dataclass
class ResumeSource:
    store: OutputStore      # the source run's store
    checkpoint: str         # "checkpoints/checkpoint-N" inside it
    record: dict            # its run.json (or what its manifest says)

    @property
    def uri(self) -> str:
        return self.store.uri(self.checkpoint)


_CKPT_TAIL = re.compile(r"^(?P<run>.+)/checkpoints/(?P<ckpt>checkpoint-\d+)/?$")


def resolve_resume_from(job, ref: str, field: str = "spec.resumeFrom") -> ResumeSource:
    """spec.resumeFrom -> the checkpoint to continue from. `ref` is a run id of this job, a run's URI
    (…/runs/<id>/: its latest complete checkpoint) or a checkpoint URI (…/runs/<id>/checkpoints/checkpoint-N)."""
    from . import checkpointing

    out = job.spec.output
    if "://" not in ref:
        run_uri, ckpt = f"{job_output_uri(job)}{RUNS}/{check_run_id(ref, field)}/", None
    else:
        m = _CKPT_TAIL.match(ref.rstrip("/"))
        run_uri, ckpt = (m.group("run") + "/", f"{checkpointing.CHECKPOINTS}/{m.group('ckpt')}") if m else \
            (ref.rstrip("/") + "/", None)
    store = OutputStore(run_uri)
    if ckpt is None:
        ckpt = checkpointing.latest_checkpoint(store)
        if ckpt is None:
            raise ConfigError(f"{field}: {run_uri} holds no complete checkpoint to continue from", field=field)
    elif not store.is_complete(ckpt):
        raise ConfigError(f"{field}: {store.uri(ckpt)} is not a complete checkpoint (no _COMPLETE marker)",
                          field=field)
    rec = read_json(store, RUN_RECORD)
    if rec is None:
        man = read_json(store, MANIFEST)
        if man is None:
            raise ConfigError(f"{field}: {run_uri} has neither run.json nor manifest.json: not a kubetune run "
                              "folder, so nothing says what it was trained from", field=field)
        rec = {"stage": man.get("stage"), "adapter": (man.get("config") or {}).get("spec", {}).get("adapter"),
               "baseModel": man.get("baseModel") or {}}
    return ResumeSource(store, ckpt, rec)


def check_compatible(src: ResumeSource, job, model_sha256: Optional[str], field: str = "spec.resumeFrom") -> None:
    """Continuing another run's optimizer and step is only meaningful for the same stage, the same adapter
    configuration and the same base model bytes: anything else is refused, naming what differs."""
    spec = job.spec
    problems = []
    if src.record.get("stage") != spec.stage:
        problems.append(f"stage {src.record.get('stage')} there, {spec.stage} here")
    mine = spec.adapter.model_dump(by_alias=True, exclude_none=True, mode="json")
    theirs = src.record.get("adapter") or {}
    if theirs != mine:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        problems.append(f"adapter settings differ ({', '.join(diff)})")
    their_sha = (src.record.get("baseModel") or {}).get("sha256")
    if not their_sha:
        problems.append("the source run's base model digest is not recorded (its run.json predates hashing)")
    elif model_sha256 and their_sha != model_sha256:
        problems.append(f"base model sha256 {their_sha[:12]} there, {model_sha256[:12]} here")
    if problems:
        raise ConfigError(f"{field}: cannot continue from {src.uri}: " + "; ".join(problems)
                          + ". Remove spec.resumeFrom to start fresh, or point it at a run of the same stage, "
                          "adapter and base model", field=field)


def describe(ident: RunIdentity) -> dict[str, Any]:
    return {"id": ident.run_id, "specDigest": ident.spec_digest, "idSource": ident.source}
