"""Retries do not re-download: with a cache volume (spec.resources.cacheClaim -> KUBETUNE_CACHE_DIR), a retried pod
(restartPolicy Never: a new pod, a new emptyDir) reuses the model and data the previous pod fetched. Measured in
bytes the S3 server sent, on a real SeaweedFS, through the runner's own fetch step.

    .venv/bin/python -m pytest tests/trainer/test_fetch_cache.py -q -s
"""

from __future__ import annotations

from pathlib import Path

from kubetune_api.finetunejob import parse_job
from kubetune_trainer import config, runner, storage, tiny
from tests.s3_server import s3  # noqa: F401  (session fixture: a real SeaweedFS)


def _upload(client, bucket: str, local: Path, prefix: str) -> int:
    total = 0
    for p in sorted(local.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local)}")
            total += p.stat().st_size
    return total


def test_a_retried_pod_with_a_cache_volume_fetches_nothing_again(s3, tmp_path, monkeypatch):  # noqa: F811
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3.new_bucket()
    client = s3.client()
    model_bytes = _upload(client, bucket, tiny.cached_model(), "models/tiny")
    data = tiny.generate_datasets(tmp_path / "data", n=50)
    client.upload_file(str(data["chat"]), bucket, "data/chat.jsonl")
    total = model_bytes + data["chat"].stat().st_size
    job = parse_job({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
                     "metadata": {"name": "cache", "namespace": "t", "uid": "u1"},
                     "spec": {"stage": "sft", "model": {"source": f"s3://{bucket}/models/tiny"},
                              "dataset": {"format": "chat", "train": [{"uri": f"s3://{bucket}/data/chat.jsonl"}]},
                              "resources": {"gpus": 0}, "output": {"uri": f"s3://{bucket}/out"}}})
    served: list[int] = []
    storage.s3_client(None).meta.events.register(
        "after-call.s3.GetObject", lambda parsed, **_: served.append(int(parsed.get("ContentLength") or 0)))

    def pod(name: str, env: dict) -> int:
        """One pod's fetch step (runner._fetch_all, what every pod runs first); bytes the S3 server sent."""
        served.clear()
        settings = config.RunSettings.from_env({"KUBETUNE_WORK_DIR": str(tmp_path / name), **env})
        fetched = runner._fetch_all(job, settings)
        assert (fetched.model_path / "config.json").is_file()
        return sum(served)

    # before: every pod has its own emptyDir, so the retry downloads everything again
    first, retry = pod("pod-1", {}), pod("pod-2", {})
    # after: both pods mount the same cache volume
    cache = {"KUBETUNE_CACHE_DIR": str(tmp_path / "cache-volume")}
    first_cached, retry_cached = pod("pod-3", cache), pod("pod-4", cache)
    print(f"bytes fetched: first pod {first}, retry without cache volume {retry}, "
          f"first pod with cache volume {first_cached}, retry with cache volume {retry_cached} (sources {total})")
    assert first == retry == first_cached == total
    assert retry_cached == 0
