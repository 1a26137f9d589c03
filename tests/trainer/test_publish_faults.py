"""Publishing without a window of loss (artifacts.upload_result, runs.record_success), proved by fault injection:
the publisher is killed after each storage call in turn, on a local folder and on a real SeaweedFS, and a reader
must then see the previous result or the complete new one: never neither, never a half result that looks final.

"Killed" means: the call in flight completes (an S3 PUT or a rename is atomic on its own), then the process does
nothing more, on any thread. The storage calls are the backend operations every OutputStore method goes through;
each is wrapped so that the N-th one raises a BaseException after it returns, and every later one before it
starts. Then the pod is retried (the publish runs again from the same local result) and must complete.

    .venv/bin/python -m pytest tests/trainer/test_publish_faults.py -q
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from kubetune_api.finetunejob import parse_job
from kubetune_trainer import artifacts, runs
from tests.s3_server import output, s3  # noqa: F401  (fixtures: an output URI on file:// and on a real SeaweedFS)

_BACKEND_CALLS = ("put_file", "write_bytes", "read_bytes", "is_object", "list_files", "list_children",
                  "delete_tree", "move_tree", "download", "_has_objects")


class Killed(BaseException):
    """The publisher process died (not an Exception: nothing in the code under test may catch it)."""


class Killer:
    """Counts storage calls on the stores it wraps; kills the publisher after call number `after`."""

    def __init__(self, after: int | None):
        self.after, self.calls, self.dead, self.lock = after, [], False, threading.Lock()

    def wrap(self, store) -> None:
        backend = store._b
        for name in _BACKEND_CALLS:
            if hasattr(backend, name):
                setattr(backend, name, self._wrapped(name, getattr(backend, name)))

    def _wrapped(self, name, fn):
        def call(*args, **kwargs):
            with self.lock:
                if self.dead:
                    raise Killed("already dead")
            result = fn(*args, **kwargs)
            with self.lock:
                self.calls.append((name, args[1] if name == "put_file" else args[0] if args else None))
                if self.after is not None and len(self.calls) >= self.after:
                    self.dead = True
                    raise Killed(f"killed after call {len(self.calls)}: {name}{args[:1]}")
            return result
        return call


def _job(output: str, name: str):
    return parse_job({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
                      "metadata": {"name": name, "namespace": "ml"},
                      "spec": {"stage": "sft", "model": {"source": "file:///m"},
                               "dataset": {"format": "chat", "train": [{"uri": "file:///d.jsonl"}]},
                               "adapter": {"type": "lora"}, "resources": {"gpus": 0}, "output": {"uri": output}}})


def _local_result(tmp: Path, job, run_id: str) -> tuple[Path, dict[str, bytes]]:
    """What artifacts.publish builds locally before uploading; returns the folder and every file's bytes."""
    store = runs.run_store(job, run_id)
    d = tmp / f"local-{job.metadata.name}-{run_id}"
    files = {
        "adapter/adapter_model.safetensors": f"weights of {run_id}".encode() * 50,
        "adapter/adapter_config.json": json.dumps({"r": 8, "run": run_id}).encode(),
        "adapter/tokenizer.json": b'{"tok": 1}',
        "merged/model.safetensors": f"merged {run_id}".encode() * 80,
        "merged/config.json": b"{}",
        "metrics.jsonl": json.dumps({"event": "train", "run": run_id}).encode() + b"\n",
        "curves.png": b"\x89PNG\r\n\x1a\n" + run_id.encode(),
        "README.md": f"# model card of {run_id}\n".encode(),
    }
    manifest = {"run": {"id": run_id, "specDigest": runs.spec_digest(job.spec)}, "createdAt": run_id,
                "published": {"step": 10, "reason": "best"},
                "artifacts": {"outputUri": store.root_uri, "adapterUri": store.uri("adapter"),
                              "mergedModelUri": store.uri("merged"), "manifestUri": store.uri("manifest.json")},
                "files": sorted(files)}
    files["manifest.json"] = json.dumps(manifest).encode()
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d, files


def _publish(job, run_id: str, local: Path, killer: Killer | None = None) -> None:
    store, jstore = runs.run_store(job, run_id), runs.job_store(job)
    if killer is not None:
        killer.wrap(store)
        killer.wrap(jstore)
    artifacts.upload_result(store, local, job_store=jstore)


def _reader_sees(job, expected: dict[str, dict[str, bytes]]) -> str:
    """What a reader finds through the index: the run id, after checking that every file of it is there with
    the bytes that run wrote. Also: a run whose manifest.json exists is complete, whether indexed or not."""
    jstore = runs.job_store(job)
    found = runs.latest_result(jstore)
    assert found is not None, "neither the previous result nor the new one"
    entry, man = found
    run_id = entry["runId"]
    for check in expected:
        store = runs.run_store(job, check)
        if store.read_text("manifest.json") is None:
            continue  # not final: nobody may trust it, and the index must not name it
        for rel, data in expected[check].items():
            text = store.read_text(rel) if rel.endswith((".json", ".jsonl", ".md")) else None
            got = text.encode() if text is not None else _read_bytes(store, rel)
            assert got == data, f"run {check} looks final but {rel} is {'missing' if got is None else 'wrong'}"
    assert run_id in expected and man["run"]["id"] == run_id
    return run_id


def _read_bytes(store, rel: str) -> bytes | None:
    return store._b.read_bytes(rel)


def test_kill_after_each_storage_call(output, tmp_path):
    # How many storage calls one publish makes (the previous run A already in place, as in every case below).
    probe = _job(output, "probe")
    local_a, files_a = _local_result(tmp_path, probe, "run-a")
    _publish(probe, "run-a", local_a)
    local_b, files_b = _local_result(tmp_path, probe, "run-b")
    counter = Killer(None)
    _publish(probe, "run-b", local_b, counter)
    total = len(counter.calls)
    print(f"publish: {total} storage calls: {counter.calls}")
    assert total >= 15, counter.calls  # every file, the markers, the manifest, the index read + write
    assert counter.calls[-1] == ("write_bytes", "runs.json") and ("put_file", "manifest.json") in counter.calls

    seen = []
    for n in range(1, total + 1):
        job = _job(output, f"kill-{n}")
        local_a, files_a = _local_result(tmp_path, job, "run-a")
        local_b, files_b = _local_result(tmp_path, job, "run-b")
        _publish(job, "run-a", local_a)
        killer = Killer(n)
        with pytest.raises(Killed):
            _publish(job, "run-b", local_b, killer)
        expected = {"run-a": files_a, "run-b": files_b}
        seen.append(_reader_sees(job, expected))
        # the previous run's files are never touched, whatever happened
        for rel, data in files_a.items():
            assert _read_bytes(runs.run_store(job, "run-a"), rel) == data, (n, rel)
        # the pod is retried: the same publish again completes and the index names the new run
        _publish(job, "run-b", local_b)
        assert _reader_sees(job, expected) == "run-b"
        assert [e["runId"] for e in runs.read_index(runs.job_store(job))["runs"]] == ["run-a", "run-b"]
    # the new result becomes visible exactly at the last call (the index write), not before
    assert seen == ["run-a"] * (total - 1) + ["run-b"], seen
