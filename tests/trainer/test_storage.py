"""The storage package against a real SeaweedFS S3 server on 127.0.0.1 and against file:// / pvc:// folders.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_storage.py -q
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from kubetune_trainer import storage
from kubetune_trainer.errors import ConfigError, StorageUnavailableError, TrainerError
from kubetune_trainer.storage import patience
from kubetune_trainer.storage import s3 as storage_s3
from tests.s3_server import s3  # noqa: F401  (session fixture: a real SeaweedFS)

_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


@pytest.fixture
def s3env(s3, monkeypatch):  # noqa: F811 - the imported fixture
    """The pod's env as the operator wires it (keys from the Secret, endpoint)."""
    for k in _AWS_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3


@pytest.fixture
def bucket(s3env):
    return s3env.new_bucket()


@pytest.fixture(params=["s3", "file"])
def store(request, tmp_path, monkeypatch):
    if request.param == "s3":
        s = request.getfixturevalue("s3env")
        b = s.new_bucket()
        return storage.OutputStore(f"s3://{b}/runs/ns1/job1")
    return storage.OutputStore(f"file://{tmp_path}/out/ns1/job1")


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


ADAPTER = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\x00" * 1000,
           "tokenizer/tokenizer.json": b"{}"}


# --------------------------------------------------------------------------------------- basic operations
def test_put_get_list_delete_roundtrip(store, tmp_path):
    src = _tree(tmp_path / "src", ADAPTER)
    assert store.root_uri.endswith("/ns1/job1/")
    assert store.put_file(src / "adapter_config.json", "manifest.json") == store.uri("manifest.json")
    assert store.read_text("manifest.json") == '{"r": 8}'
    assert store.read_text("nope.json") is None

    uri = store.put_dir(src, "things/a")
    assert uri == store.uri("things/a")
    assert store.list_files("things/a") == {k: len(v) for k, v in ADAPTER.items()}
    store.put_dir(src, "things/b")
    assert store.list_dirs("things") == ["a", "b"]
    assert store.list_dirs("") == ["things"]
    assert store.exists("things/a") and store.exists("manifest.json")
    assert not store.exists("things/c") and not store.exists("thing")

    got = store.get_dir("things/a", tmp_path / "back")
    assert _read_tree(got) == ADAPTER

    store.delete_prefix("things/a")
    assert store.list_dirs("things") == ["b"]
    assert not store.exists("things/a")
    with pytest.raises(ConfigError, match="nothing stored there"):
        store.get_dir("things/a", tmp_path / "again")
    with pytest.raises(ValueError):
        store.delete_prefix("")
    with pytest.raises(ValueError):
        store.uri("../other-job/adapter")


def test_delete_prefix_is_by_path_segment_not_string_prefix(store, tmp_path):
    src = _tree(tmp_path / "src", {"x.bin": b"1"})
    for n in (1, 10, 100):
        store.put_dir(src, f"checkpoints/checkpoint-{n}")
    store.delete_prefix("checkpoints/checkpoint-1")
    assert store.list_dirs("checkpoints") == ["checkpoint-10", "checkpoint-100"]


def test_publish_dir_writes_complete_last_and_replaces(store, tmp_path):
    v1 = _tree(tmp_path / "v1", ADAPTER)
    uri = store.publish_dir(v1, "adapter")
    assert uri == store.uri("adapter")
    assert store.is_complete("adapter")
    rec = store.read_complete("adapter")
    assert rec["files"] == {k: len(v) for k, v in ADAPTER.items()}  # the marker lists every file with its size
    assert store.list_dirs("") == ["adapter"]  # no staging prefix left behind

    v2 = _tree(tmp_path / "v2", {"adapter_model.safetensors": b"\x01" * 10})
    store.publish_dir(v2, "adapter")
    assert _read_tree(store.get_dir("adapter", tmp_path / "got")) == {
        "adapter_model.safetensors": b"\x01" * 10, storage.COMPLETE: (tmp_path / "got" / storage.COMPLETE).read_bytes()}


class Crash(RuntimeError):
    pass


def test_publish_crash_between_staging_and_finalize(store, tmp_path, monkeypatch):
    """A pod killed after staging: readers see no result (fresh) or the old complete one (republish); the next
    publish removes the staging prefix."""
    v1 = _tree(tmp_path / "v1", ADAPTER)

    def crash(self, tmp, rel):
        raise Crash("killed between staging and finalize")

    with monkeypatch.context() as m:
        m.setattr(storage.OutputStore, "_finalize", crash)
        with pytest.raises(Crash):
            store.publish_dir(v1, "adapter")
    assert not store.exists("adapter")  # nothing at adapter/ at all
    assert not store.is_complete("adapter")
    staged = [d for d in store.list_dirs("") if d.startswith("adapter" + storage.TMP_INFIX)]
    assert len(staged) == 1 and store.list_files(staged[0])  # the staged copy is there, under .tmp-*

    store.publish_dir(v1, "adapter")  # the next publish cleans up
    assert store.list_dirs("") == ["adapter"]
    assert store.is_complete("adapter")

    # A crashed re-publish leaves the previous complete result untouched.
    v2 = _tree(tmp_path / "v2", {"adapter_model.safetensors": b"new"})
    with monkeypatch.context() as m:
        m.setattr(storage.OutputStore, "_finalize", crash)
        with pytest.raises(Crash):
            store.publish_dir(v2, "adapter")
    assert store.is_complete("adapter")
    assert store.list_files("adapter")["adapter_model.safetensors"] == 1000

    # A crash half-way through finalize (old result already removed, copy not finished): no _COMPLETE.
    real_move = type(store._b).move_tree

    def half_move(self, src, dst):
        files = sorted(self.list_files(src))
        self.write_bytes(f"{dst}/{files[0]}", b"partial")
        raise Crash("killed while copying")

    with monkeypatch.context() as m:
        m.setattr(type(store._b), "move_tree", half_move)
        with pytest.raises(Crash):
            store.publish_dir(v2, "adapter")
    assert store.exists("adapter") and not store.is_complete("adapter")
    assert type(store._b).move_tree is real_move
    store.publish_dir(v2, "adapter")
    assert store.is_complete("adapter") and store.list_dirs("") == ["adapter"]
    assert store.list_files("adapter") == {"adapter_model.safetensors": 3, storage.COMPLETE: store.list_files(
        "adapter")[storage.COMPLETE]}


def test_pvc_store_and_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path / "pvc"))
    (tmp_path / "pvc" / "models").mkdir(parents=True)
    src = _tree(tmp_path / "pvc" / "models" / "tiny", {"config.json": b"{}"})
    assert storage.fetch("pvc://models/tiny", tmp_path / "cache") == src
    st = storage.OutputStore("pvc://results/runs/ns/j")
    st.publish_dir(src, "adapter")
    assert (tmp_path / "pvc" / "results" / "runs" / "ns" / "j" / "adapter" / storage.COMPLETE).is_file()
    with pytest.raises(ConfigError) as ei:
        storage.fetch("pvc://models/nothere", tmp_path / "cache")
    assert "pvc://models/nothere" in str(ei.value) and "tiny/" in str(ei.value)
    with pytest.raises(ConfigError, match="claim not mounted"):
        storage.fetch("pvc://otherclaim/x", tmp_path / "cache")


def test_file_fetch_missing_names_uri_and_neighbours(tmp_path):
    _tree(tmp_path / "models", {"tiny-a/config.json": b"{}", "readme.txt": b"x"})
    assert storage.fetch(f"file://{tmp_path}/models/tiny-a", tmp_path / "c") == tmp_path / "models" / "tiny-a"
    with pytest.raises(ConfigError) as ei:
        storage.fetch(f"file://{tmp_path}/models/tiny-b", tmp_path / "c")
    msg = str(ei.value)
    assert f"file://{tmp_path}/models/tiny-b" in msg and "tiny-a/" in msg and "readme.txt" in msg


def test_output_store_refuses_hf_and_for_job_root():
    with pytest.raises(ConfigError, match="spec.output.uri"):
        storage.OutputStore("hf://org/name")
    from kubetune_api.finetunejob import parse_job

    job = parse_job({"metadata": {"name": "sft-1", "namespace": "team-a"}, "spec": {
        "stage": "sft", "model": {"source": "file:///m"},
        "dataset": {"format": "chat", "train": [{"uri": "file:///d"}]},
        "output": {"uri": "file:///tmp/kubetune-out/"}}})
    st = storage.OutputStore.for_job(job)
    assert st.root_uri == "file:///tmp/kubetune-out/team-a/sft-1/"
    assert st.uri("adapter") == "file:///tmp/kubetune-out/team-a/sft-1/adapter"


# ------------------------------------------------------------------------------------------ s3 fetching
def test_fetch_s3_object_and_prefix_cached_by_etag(s3env, bucket, tmp_path, monkeypatch):
    c = s3env.client()
    c.put_object(Bucket=bucket, Key="models/tiny/config.json", Body=b'{"a": 1}')
    c.put_object(Bucket=bucket, Key="models/tiny/sub/w.bin", Body=b"w" * 100)
    c.put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"text": "x"}\n')
    cache = tmp_path / "cache"

    f = storage.fetch(f"s3://{bucket}/data/train.jsonl", cache)
    assert f.is_file() and f.read_bytes() == b'{"text": "x"}\n'
    d = storage.fetch(f"s3://{bucket}/models/tiny", cache)
    assert d.is_dir() and _read_tree(d) == {"config.json": b'{"a": 1}', "sub/w.bin": b"w" * 100}
    assert storage.fetch(f"s3://{bucket}/models/tiny/", cache) == d

    # A restart: nothing is downloaded again.
    client = storage.s3_client(None)
    calls = []
    real = client.download_file

    def spy(*a, **kw):
        calls.append(a[1])
        return real(*a, **kw)

    monkeypatch.setattr(client, "download_file", spy)
    storage.fetch(f"s3://{bucket}/models/tiny", cache)
    storage.fetch(f"s3://{bucket}/data/train.jsonl", cache)
    assert calls == []

    # Changed upstream: only that file is downloaded; deleted upstream: removed locally.
    c.put_object(Bucket=bucket, Key="models/tiny/config.json", Body=b'{"a": 2}')
    c.delete_object(Bucket=bucket, Key="models/tiny/sub/w.bin")
    d = storage.fetch(f"s3://{bucket}/models/tiny", cache)
    assert calls == ["models/tiny/config.json"]
    assert _read_tree(d) == {"config.json": b'{"a": 2}'}

    # A truncated local file (pod killed mid-download of an older version) is fetched again.
    (d / "config.json").write_bytes(b"{")
    storage.fetch(f"s3://{bucket}/models/tiny", cache)
    assert (d / "config.json").read_bytes() == b'{"a": 2}'


def test_fetch_missing_s3_object_names_uri_and_neighbours(s3env, bucket, tmp_path):
    c = s3env.client()
    c.put_object(Bucket=bucket, Key="models/tiny-1/config.json", Body=b"{}")
    c.put_object(Bucket=bucket, Key="models/notes.txt", Body=b"x")
    uri = f"s3://{bucket}/models/tiny-2"
    with pytest.raises(ConfigError) as ei:
        storage.fetch(uri, tmp_path / "cache")
    msg = str(ei.value)
    assert uri in msg and "tiny-1/" in msg and "notes.txt" in msg
    assert ei.value.exit_code == 78

    with pytest.raises(ConfigError) as ei:
        storage.fetch(f"s3://{bucket}/nothing/here/at/all.bin", tmp_path / "cache")
    assert f"s3://{bucket}/ holds" in str(ei.value) and "models/" in str(ei.value)

    with pytest.raises(ConfigError, match="does not exist"):
        storage.fetch("s3://no-such-bucket-kt/x", tmp_path / "cache")


def test_wrong_credentials_clear_error_without_secret(s3env, bucket, tmp_path, monkeypatch, caplog):
    s3env.client().put_object(Bucket=bucket, Key="m/config.json", Body=b"{}")
    secret = "WRONG-secret-Zq81x0-should-never-appear"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG, logger="kubetune_trainer")
    errors = []
    with pytest.raises(ConfigError) as ei:
        storage.fetch(f"s3://{bucket}/m", tmp_path / "cache")
    errors.append(ei.value)
    st = storage.OutputStore(f"s3://{bucket}/runs/ns/j")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ConfigError) as ei:
        st.put_file(tmp_path / "f.txt", "f.txt")  # upload_file wraps the 403 in S3UploadFailedError
    errors.append(ei.value)
    with pytest.raises(ConfigError) as ei:
        st.list_dirs("checkpoints")
    errors.append(ei.value)
    for e in errors:
        text = str(e)
        assert "refused the credentials" in text and "storage.credentials" in text, text
        assert secret not in text and s3env.access_key not in text
        assert e.__cause__ is None and e.__suppress_context__  # no chained botocore text in tracebacks
    # HEAD responses have no body (the code reads "403"); the others name the S3 error code
    assert "SignatureDoesNotMatch" in str(errors[1]) and "SignatureDoesNotMatch" in str(errors[2])
    assert secret not in caplog.text


def test_scrub_removes_credentials_from_any_message(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    out = storage.scrub("key AKIAEXAMPLE secret s3cr3t-value at http://user:pw@host:9000/b")
    assert "s3cr3t-value" not in out and "AKIAEXAMPLE" not in out and "user:pw" not in out


def test_no_credentials_is_a_config_error(s3env, tmp_path, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="storage.credentials"):
        storage.fetch("s3://any-bucket/x", tmp_path / "cache")


def test_endpoint_argument_overrides_env(s3env, bucket, tmp_path, monkeypatch):
    s3env.client().put_object(Bucket=bucket, Key="k.txt", Body=b"v")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    p = storage.fetch(f"s3://{bucket}/k.txt", tmp_path / "c", endpoint=s3env.endpoint)
    assert p.read_bytes() == b"v"
    st = storage.OutputStore(f"s3://{bucket}/runs", endpoint=s3env.endpoint)
    assert st.read_text("nothing") is None


def test_multipart_upload_publish_and_download(s3env, bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage_s3, "MULTIPART_BYTES", 5 * 1024 * 1024)  # S3's minimum part size
    big = tmp_path / "src" / "model.safetensors"
    big.parent.mkdir()
    data = bytes(range(256)) * (12 * 1024 * 1024 // 256 + 7)
    big.write_bytes(data)
    st = storage.OutputStore(f"s3://{bucket}/runs/ns/j")
    st.publish_dir(big.parent, "merged")
    head = s3env.client().head_object(Bucket=bucket, Key="runs/ns/j/merged/model.safetensors")
    assert head["ContentLength"] == len(data)
    assert "-" in head["ETag"]  # multipart ETag ("<md5>-<parts>"), from the server-side multipart copy
    got = st.get_dir("merged", tmp_path / "back")
    assert (got / "model.safetensors").read_bytes() == data
    f = storage.fetch(f"s3://{bucket}/runs/ns/j/merged/model.safetensors", tmp_path / "cache")
    assert f.read_bytes() == data


# ------------------------------------------------------------------------------------------------ hf://
def test_hf_offline_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as ei:
        storage.fetch("hf://org/some-model", tmp_path / "cache")
    assert "hf:// needs internet; copy the model to s3:// or a PVC" in str(ei.value)
    assert "hf://org/some-model" in str(ei.value)


def test_hf_unreachable_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{dead}")
    with pytest.raises(ConfigError, match="copy the model to s3:// or a PVC"):
        storage.fetch("hf://org/some-model@main", tmp_path / "cache")


def test_unknown_scheme_and_bad_uri(tmp_path):
    with pytest.raises(ConfigError, match="unsupported URI scheme"):
        storage.fetch("gs://bucket/x", tmp_path)
    with pytest.raises(ConfigError, match="not a URI"):
        storage.fetch("/abs/path", tmp_path)


def test_retriable_error_when_store_unreachable(tmp_path, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "x-" + k)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setattr(storage_s3, "_clients", {})
    import botocore.config

    real = botocore.config.Config

    def fast(**kw):  # one attempt: this test is about the error class, not the retry schedule
        kw["retries"] = {"mode": "standard", "total_max_attempts": 1}
        return real(**kw)

    monkeypatch.setattr(botocore.config, "Config", fast)
    st = storage.OutputStore("s3://b/runs", endpoint=f"http://127.0.0.1:{dead}")
    # one attempt (best-effort calls such as pruning): the plain retriable error
    with patience.once(), pytest.raises(TrainerError) as ei:
        st.read_text("manifest.json")
    assert type(ei.value) is TrainerError and ei.value.exit_code == 1
    assert "cannot reach S3" in str(ei.value)
    # otherwise the patience budget is waited out first (0 here), then exit 75 naming the endpoint and the call
    patience.configure(0)
    try:
        with pytest.raises(StorageUnavailableError) as ei:
            st.read_text("manifest.json")
    finally:
        patience.configure(None)
    assert ei.value.exit_code == 75 and f"127.0.0.1:{dead}" in str(ei.value)
    assert "reading s3://b/runs/manifest.json" in str(ei.value)
