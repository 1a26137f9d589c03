"""The s3:// backend: the cached boto3 client (path-style addressing, adaptive retries), multipart transfer
settings, listing helpers and the store operations on a bucket prefix (uploads, server-side copies, deletes).

Every request goes through `retrying` (patience.py): transient failures are waited out up to the run's patience
budget, so each operation here is written to be safe to repeat (uploads and deletes are idempotent, listings
are redone whole)."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from ..errors import TrainerError
from . import patience
from .errors import MISSING_CODES, NEARBY_MAX, SECRET_ENV, endpoint_of, error_code
from .uris import COMPLETE, join_key

# Multipart above 64 MiB in 64 MiB parts: S3 allows 10,000 parts, so single files up to ~640 GB upload.
MULTIPART_BYTES = 64 * 1024 * 1024


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def s3_client(endpoint: Optional[str] = None, region: Optional[str] = None):
    """A boto3 S3 client from the standard env, `endpoint` overriding AWS_ENDPOINT_URL(_S3). Cached per
    (endpoint, region, credentials) so the many small calls of a run share one connection pool."""
    import boto3
    from botocore.config import Config

    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # The cache key carries a digest of the credentials, not the credentials.
    fp = hashlib.sha256("\0".join(os.environ.get(k, "") for k in SECRET_ENV).encode()).hexdigest()
    key = (endpoint, region, fp, os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"))
    with _clients_lock:
        if key not in _clients:
            cfg = Config(
                s3={"addressing_style": "path"},
                # adaptive = standard retries (throttling, 5xx, connection resets) + client-side rate limiting.
                # Few attempts: they absorb a blip inside one call; longer outages are patience.py's (its budget
                # is wall-clock, and botocore's own backoff of 8 attempts could alone outlast a small budget).
                retries={"mode": "adaptive", "total_max_attempts": 3},
                connect_timeout=10, read_timeout=120, max_pool_connections=16,
            )
            kwargs: dict[str, Any] = {"config": cfg, "region_name": region}
            if endpoint:
                kwargs["endpoint_url"] = endpoint
            _clients[key] = boto3.session.Session().client("s3", **kwargs)
        return _clients[key]


def retrying(client, what: str, fn):
    """fn() under the run's patience policy for this client's endpoint (`what`: "uploading s3://b/k")."""
    return patience.call(fn, endpoint=endpoint_of(client), what=what)


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                          max_concurrency=8, use_threads=True)


def s3_nearby(client, bucket: str, key: str) -> str:
    """What the closest existing parent prefix holds ('s3://b/models/ holds: [a/, b.json]')."""
    return retrying(client, f"listing s3://{bucket}/", lambda: _nearby(client, bucket, key))


def _nearby(client, bucket: str, key: str) -> str:
    parts = [p for p in key.rstrip("/").split("/") if p][:-1]
    while True:
        prefix = "/".join(parts) + "/" if parts else ""
        resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=NEARBY_MAX + 1)
        names = [c["Prefix"][len(prefix):] for c in resp.get("CommonPrefixes", [])]
        names += [o["Key"][len(prefix):] for o in resp.get("Contents", []) if o["Key"] != prefix]
        if names or not parts:
            shown = sorted(names)[:NEARBY_MAX] + (["..."] if len(names) > NEARBY_MAX else [])
            return f"s3://{bucket}/{prefix} holds: {shown or 'nothing'}"
        parts.pop()


def list_objects(client, bucket: str, prefix: str) -> list[dict]:
    def listing() -> list[dict]:  # a listing interrupted half-way is redone whole
        out = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]  # skip folder markers
        return out

    return retrying(client, f"listing s3://{bucket}/{prefix}", listing)


def head_object(client, bucket: str, key: str) -> Optional[dict]:
    from botocore.exceptions import ClientError

    def head() -> Optional[dict]:
        try:
            return client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in MISSING_CODES:
                return None
            raise

    return retrying(client, f"checking s3://{bucket}/{key}", head)


class S3Backend:
    def __init__(self, uri: str, bucket: str, base: str, client):
        self.uri, self.bucket, self.base, self.client = uri, bucket, base.strip("/"), client
        self.tc = transfer_config()

    def _k(self, key: str) -> str:
        return join_key(self.base, key)

    def _dir(self, key: str) -> str:
        k = self._k(key)
        return k + "/" if k else ""

    def _retrying(self, action: str, key: str, fn):
        return retrying(self.client, f"{action} s3://{self.bucket}/{key}", fn)

    def put_file(self, local: Path, key: str) -> None:
        k = self._k(key)
        self._retrying("uploading", k, lambda: self.client.upload_file(str(local), self.bucket, k, Config=self.tc))

    def write_bytes(self, key: str, data: bytes) -> None:
        k = self._k(key)
        self._retrying("writing", k, lambda: self.client.put_object(Bucket=self.bucket, Key=k, Body=data))

    def read_bytes(self, key: str) -> Optional[bytes]:
        from botocore.exceptions import ClientError

        k = self._k(key)

        def read() -> Optional[bytes]:  # the body is read inside the retry: a reset mid-body is retried too
            try:
                return self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read()
            except ClientError as exc:
                if error_code(exc) in MISSING_CODES:
                    return None
                raise

        return self._retrying("reading", k, read)

    def is_object(self, key: str) -> bool:
        return bool(key) and head_object(self.client, self.bucket, self._k(key)) is not None

    def list_files(self, key: str) -> dict[str, int]:
        prefix = self._dir(key)
        return {o["Key"][len(prefix):]: o["Size"] for o in list_objects(self.client, self.bucket, prefix)}

    def list_children(self, key: str) -> list[str]:
        prefix = self._dir(key)

        def listing() -> list[str]:
            names = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                names += [c["Prefix"][len(prefix):].rstrip("/") for c in page.get("CommonPrefixes", [])]
            return names

        names = self._retrying("listing", prefix, listing)
        # Filer-backed stores (SeaweedFS) keep listing a folder after its last object is deleted: only folders
        # that still hold an object count.
        return sorted(n for n in names if n and self._has_objects(prefix + n + "/"))

    def _has_objects(self, prefix: str) -> bool:
        resp = self._retrying("listing", prefix,
                              lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=2))
        return any(not o["Key"].endswith("/") for o in resp.get("Contents", []))

    def delete_tree(self, key: str) -> None:
        keys = [self._dir(key) + rel for rel in self.list_files(key)]
        marker = self._dir(key) + COMPLETE
        if marker in keys:  # the marker goes first: a reader never trusts a half-deleted folder
            self._delete([marker])
            keys.remove(marker)
        if key and head_object(self.client, self.bucket, self._k(key)) is not None:
            keys.append(self._k(key))
        self._delete(keys)

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            resp = self._retrying(
                "deleting", batch[0], lambda b=batch: self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in b], "Quiet": True}))
            errs = resp.get("Errors") or []
            if errs:
                raise TrainerError(f"S3 refused to delete {len(errs)} objects under {self.uri} "
                                   f"(first: {errs[0].get('Key')}: {errs[0].get('Code')})")

    def move_tree(self, src: str, dst: str) -> None:
        files = self.list_files(src)
        # server-side copies (multipart copy above the threshold): nothing goes through the pod again
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(patience.in_pool(lambda rel: self._retrying(
                "copying", self._dir(dst) + rel, lambda: self.client.copy(
                    {"Bucket": self.bucket, "Key": self._dir(src) + rel}, self.bucket, self._dir(dst) + rel,
                    Config=self.tc))), sorted(files)))
        self.delete_tree(src)

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        k = self._k(key)
        self._retrying("downloading", k,
                       lambda: self.client.download_file(self.bucket, k, str(dest), Config=self.tc))
