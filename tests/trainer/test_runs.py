"""runs.py: run identity, the run-scoped layout, the job's runs.json index, retention, --resume and resumeFrom
checks. Store-level only (no training), on a local folder and on a real SeaweedFS.

    .venv/bin/python -m pytest tests/trainer/test_runs.py -q
"""

from __future__ import annotations

import json

import pytest

from kubetune_api.finetunejob import parse_job
from kubetune_trainer import checkpointing, runs, storage
from kubetune_trainer.errors import ConfigError
from tests.s3_server import output, s3  # noqa: F401  (fixtures: an output URI on file:// and on a real SeaweedFS)


def _job(output: str, uid: str | None = None, **spec) -> object:
    body = {"stage": "sft", "model": {"source": "file:///models/tiny"},
            "dataset": {"format": "chat", "train": [{"uri": "file:///data/chat.jsonl"}]},
            "adapter": {"type": "lora", "rank": 8}, "training": {"maxSteps": 10, "learningRate": 1e-3},
            "resources": {"gpus": 0}, "output": {"uri": output}}
    for k, v in spec.items():
        body[k] = {**body.get(k, {}), **v} if isinstance(v, dict) else v
    meta = {"name": "bot", "namespace": "ml", **({"uid": uid} if uid else {})}
    return parse_job({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": meta, "spec": body})


# ------------------------------------------------------------------------------------------------ identity
def test_identity_prefers_the_operator_id_then_uid_then_the_spec(tmp_path):
    job = _job(f"file://{tmp_path}", uid="0b9e4c1e-8c1a-4d6e-9a51-3f4b2a1c0d9e")
    assert runs.identify(job, "given-id") == runs.RunIdentity("given-id", runs.spec_digest(job.spec), "env")
    assert runs.identify(job).run_id == "0b9e4c1e-8c1a-4d6e-9a51-3f4b2a1c0d9e"
    bare = _job(f"file://{tmp_path}")
    assert runs.identify(bare).run_id == f"spec-{runs.spec_digest(bare.spec)[:16]}"
    for bad in ("../other", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ConfigError, match="run id"):
            runs.identify(job, bad) if bad else runs.check_run_id(bad)


def test_spec_digest_covers_what_shapes_training_only(tmp_path):
    base = _job(f"file://{tmp_path}")
    d = runs.spec_digest(base.spec)
    assert runs.spec_digest(_job(f"file://{tmp_path}", training={"learningRate": 2e-3}).spec) != d
    assert runs.spec_digest(_job(f"file://{tmp_path}", adapter={"rank": 16}).spec) != d
    assert runs.spec_digest(_job(f"file://{tmp_path}", model={"source": "file:///models/other"}).spec) != d
    # where results go, retries and suspension do not change what is trained
    assert runs.spec_digest(_job(f"file://{tmp_path}/elsewhere", retryLimit=7, suspend=True).spec) == d


def test_run_store_is_below_the_job_store(tmp_path):
    job = _job(f"file://{tmp_path}/r")
    assert runs.job_store(job).root_uri == f"file://{tmp_path}/r/ml/bot/"
    assert runs.run_store(job, "abc").root_uri == f"file://{tmp_path}/r/ml/bot/runs/abc/"
    with pytest.raises(ConfigError):
        runs.run_store(job, "../../escape")


def test_begin_refuses_a_run_id_reused_with_another_spec(output):
    job = _job(output)
    ident = runs.identify(job, "r1")
    store = runs.run_store(job, "r1")
    rec = runs.begin(store, job, ident)
    assert runs.begin(store, job, ident) == rec  # a restarted pod of the same run keeps the first record
    changed = _job(output, training={"learningRate": 5e-3})
    with pytest.raises(ConfigError, match="different spec") as err:
        runs.begin(store, changed, runs.identify(changed, "r1"))
    assert err.value.field == "spec"


# ---------------------------------------------------------------------------------------------------- index
def _finish(job, run_id: str, when: str, eval_loss: float = 1.0) -> dict:
    """What artifacts.upload_result leaves: a manifest in the run's prefix, then the index entry."""
    store = runs.run_store(job, run_id)
    runs.begin(store, job, runs.identify(job, run_id))
    man = {"run": {"id": run_id, "specDigest": runs.spec_digest(job.spec)}, "createdAt": when,
           "metrics": {"eval_loss": eval_loss},
           "artifacts": {"manifestUri": store.uri("manifest.json"), "adapterUri": store.uri("adapter")}}
    store.write_text("manifest.json", json.dumps(man))
    return runs.record_success(runs.job_store(job), runs.index_entry(man))


def test_index_names_every_finished_run_and_the_latest(output):
    job = _job(output)
    jstore = runs.job_store(job)
    assert runs.latest_result(jstore) is None
    _finish(job, "r1", "2026-01-01T00:00:00Z")
    index = _finish(job, "r2", "2026-01-02T00:00:00Z", eval_loss=0.5)
    assert index["latest"] == "r2" and [e["runId"] for e in index["runs"]] == ["r1", "r2"]
    entry, man = runs.latest_result(jstore)
    assert entry["adapterUri"].endswith("/ml/bot/runs/r2/adapter") and man["metrics"]["eval_loss"] == 0.5
    # re-recording a run (a retried publish) does not duplicate it
    assert [e["runId"] for e in _finish(job, "r1", "2026-01-03T00:00:00Z")["runs"]] == ["r2", "r1"]
    # a broken index is rebuilt from the runs' manifests, not trusted and not fatal
    jstore.write_text("runs.json", "{not json")
    assert [e["runId"] for e in runs.read_index(jstore)["runs"]] == ["r2", "r1"]


def test_retention_deletes_only_older_runs_and_only_when_asked(output, tmp_path):
    job = _job(output)
    jstore = runs.job_store(job)
    for i in range(4):
        _finish(job, f"r{i}", f"2026-01-0{i + 1}T00:00:00Z")
        runs.run_store(job, f"r{i}").write_text("run.json", json.dumps({"createdAt": f"2026-01-0{i + 1}"}))
    assert runs.apply_retention(jstore, 2, current="r3") == ["r0", "r1"]
    assert jstore.list_dirs("runs") == ["r2", "r3"]
    index = runs.read_index(jstore)
    assert [e["runId"] for e in index["runs"]] == ["r2", "r3"] and index["latest"] == "r3"
    assert runs.apply_retention(jstore, 5, current="r3") == []


def test_resume_picks_the_newest_unfinished_run(output):
    job = _job(output)
    jstore = runs.job_store(job)
    with pytest.raises(ConfigError, match="no interrupted run"):
        runs.resumable(jstore)
    _finish(job, "20260101-000000-aaaaaa", "2026-01-01T00:00:00Z")
    for run_id, created in (("20260102-000000-bbbbbb", "2026-01-02"), ("20260103-000000-cccccc", "2026-01-03")):
        store = runs.run_store(job, run_id)
        store.write_text("run.json", json.dumps({"runId": run_id, "createdAt": created}))
    assert runs.resumable(jstore) == "20260103-000000-cccccc"
    assert runs.resumable(jstore, "20260102-000000-bbbbbb") == "20260102-000000-bbbbbb"
    with pytest.raises(ConfigError, match="already finished"):
        runs.resumable(jstore, "20260101-000000-aaaaaa")
    with pytest.raises(ConfigError, match="no such run"):
        runs.resumable(jstore, "nope")


# ----------------------------------------------------------------------------------------------- resumeFrom
def _source_run(job, run_id: str, tmp_path, sha: str = "a" * 64) -> storage.OutputStore:
    store = runs.run_store(job, run_id)
    ident = runs.identify(job, run_id)
    runs.begin(store, job, ident)
    runs.record_model_digest(store, job, ident, sha)
    ck = tmp_path / f"ck-{run_id}"
    ck.mkdir(exist_ok=True)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    store.put_dir(ck, "checkpoints/checkpoint-5")
    store.mark_complete("checkpoints/checkpoint-5", {"step": 5})
    return store


def test_resume_from_resolves_a_run_id_a_run_uri_or_a_checkpoint_uri(output, tmp_path):
    job = _job(output)
    src = _source_run(job, "old", tmp_path)
    for ref in ("old", src.root_uri, src.uri("checkpoints/checkpoint-5")):
        got = runs.resolve_resume_from(job, ref)
        assert got.uri == src.uri("checkpoints/checkpoint-5"), ref
        runs.check_compatible(got, job, "a" * 64)  # same stage, adapter and base: accepted
    with pytest.raises(ConfigError, match="not a complete checkpoint") as err:
        runs.resolve_resume_from(job, src.uri("checkpoints/checkpoint-9"))
    assert err.value.field == "spec.resumeFrom"


@pytest.mark.parametrize("change, needle", [
    ({"stage": "cpt", "dataset": {"format": "text"}}, "stage sft there, cpt here"),
    ({"adapter": {"rank": 16}}, "adapter settings differ (rank)"),
    ({}, "base model sha256"),
])
def test_resume_from_refuses_another_stage_adapter_or_base(tmp_path, change, needle):
    old = _job(f"file://{tmp_path}/r")
    _source_run(old, "old", tmp_path)
    new = _job(f"file://{tmp_path}/r", **change)
    src = runs.resolve_resume_from(new, "old")
    with pytest.raises(ConfigError) as err:
        runs.check_compatible(src, new, "b" * 64 if not change else "a" * 64)
    assert err.value.field == "spec.resumeFrom" and needle in err.value.message
    assert "Remove spec.resumeFrom" in err.value.message


def test_checkpoints_of_one_run_are_invisible_to_another(output, tmp_path):
    """A re-created FineTuneJob (new uid) finds no checkpoint to resume, whatever the old run left."""
    old, new = _job(output, uid="uid-old"), _job(output, uid="uid-new")
    _source_run(old, runs.identify(old).run_id, tmp_path)
    assert checkpointing.latest_checkpoint(runs.run_store(old, "uid-old")) == "checkpoints/checkpoint-5"
    assert checkpointing.latest_checkpoint(runs.run_store(new, runs.identify(new).run_id)) is None
    assert checkpointing.prepare_resume(runs.run_store(new, "uid-new"), tmp_path / "work") is None


def test_latest_in_a_uri_resolves_to_the_jobs_newest_successful_run(tmp_path):
    """`<job>/latest/<rest>` is how one manifest chains from another job's result: it follows runs.json (written
    last), never a half-written newer run; before any run succeeded it is a ConfigError naming the index."""
    from kubetune_trainer.errors import ConfigError
    from kubetune_trainer.storage import OutputStore
    from kubetune_trainer.storage.fetch import resolve_latest

    job = f"file://{tmp_path}/results/ml/sft"
    with pytest.raises(ConfigError, match="runs.json names none yet"):
        resolve_latest(f"{job}/latest/merged")
    store = OutputStore(job)
    for run_id in ("20261130-0001-aaaa", "20261130-0002-bbbb"):
        (tmp_path / "results/ml/sft/runs" / run_id / "merged").mkdir(parents=True)
    runs.record_success(store, {"runId": "20261130-0001-aaaa"})
    # run 0002 has files but never committed (no index entry): latest still names 0001
    assert resolve_latest(f"{job}/latest/merged") == f"{job}/runs/20261130-0001-aaaa/merged"
    assert resolve_latest(f"{job}/latest") == f"{job}/runs/20261130-0001-aaaa"
    runs.record_success(store, {"runId": "20261130-0002-bbbb"})
    assert resolve_latest(f"{job}/latest/merged/") == f"{job}/runs/20261130-0002-bbbb/merged/"
    assert resolve_latest(f"{job}/runs/20261130-0001-aaaa/merged") == f"{job}/runs/20261130-0001-aaaa/merged"
