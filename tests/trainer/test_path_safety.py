"""Path safety: nothing a job names, and no object a bucket holds, may make the trainer read or write outside the
folder it means (storage.uris.check_uri / safe_key_path; the API refuses the same URIs at admission, see
tests/api_cases.py).

The hostile-key test uses a real SeaweedFS bucket, but SeaweedFS itself refuses to store keys with '..' or '.'
segments and collapses '//' (checked below), while AWS S3 stores them as given: so the listing the trainer gets
is the real one plus the hostile keys a less careful server would return.

    .venv/bin/python -m pytest tests/trainer/test_path_safety.py -q
"""

from __future__ import annotations

import importlib

import pytest

from kubetune_trainer import storage
from kubetune_trainer.errors import ConfigError
from tests.s3_server import s3  # noqa: F401  (session fixture: a real SeaweedFS)

fetch_module = importlib.import_module("kubetune_trainer.storage.fetch")  # the package's `fetch` is the function

HOSTILE = ["models/tiny/../../escape.txt", "models/tiny//etc/cron.d/x", "models/tiny/./dot.txt",
           "models/tiny/a/.."]


@pytest.fixture
def bucket(s3, monkeypatch):  # noqa: F811
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    name = s3.new_bucket()
    client = s3.client()
    for key in ("models/tiny/config.json", "models/tiny/model.safetensors"):
        client.put_object(Bucket=name, Key=key, Body=b"{}")
    return name


def test_seaweedfs_itself_refuses_or_normalises_hostile_keys(s3, bucket):  # noqa: F811
    client = s3.client()
    for key in HOSTILE:
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"x")
        except Exception:  # noqa: BLE001 - InvalidRequest: refused, as it should
            continue
    assert not set(HOSTILE) & set(s3.keys(bucket))  # whatever was stored, it is not a hostile key


@pytest.mark.parametrize("hostile", HOSTILE)
def test_a_hostile_key_is_refused_by_name_and_nothing_is_written(bucket, hostile, tmp_path, monkeypatch):
    real = fetch_module.list_objects

    def listing(client, b, prefix):
        return real(client, b, prefix) + [{"Key": hostile, "Size": 1, "ETag": '"x"'}]

    monkeypatch.setattr(fetch_module, "list_objects", listing)
    cache = tmp_path / "work" / "cache"
    with pytest.raises(ConfigError) as err:
        storage.fetch(f"s3://{bucket}/models/tiny", cache)
    assert repr(hostile) in err.value.message and "refusing object key" in err.value.message
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], written  # refused before the first download, inside the cache or outside it


@pytest.mark.parametrize("uri", ["pvc://claim/../other/x", "file:///data/../etc/passwd", "s3://b//k",
                                 "pvc:///etc/passwd", "s3://b/models/.."])
def test_unsafe_uris_are_refused_in_code(uri, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path / "pvc"))
    with pytest.raises(ConfigError) as err:
        storage.fetch(uri, tmp_path / "cache")
    assert uri in err.value.message
    if uri.startswith(("file", "pvc")):
        with pytest.raises(ConfigError):
            storage.local_path(uri)
