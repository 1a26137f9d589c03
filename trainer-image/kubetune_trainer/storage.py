"""Every URI a FineTuneJob names, resolved to local files; and the job's output store.

    from kubetune_trainer import storage
    path = storage.fetch("s3://models/tiny", Path("/var/lib/kubetune/cache"), endpoint="http://seaweedfs:8333")
    store = storage.OutputStore.for_job(job)                   # <spec.output.uri>/<namespace>/<name>/
    store.publish_dir(Path("out/adapter"), "adapter")          # readers never see half of it
    store.read_text("manifest.json")

URI forms (kubetune_api.common.URI_PATTERN):
- file:///abs/path        the path itself (a relative path resolves against the working directory: local runs).
- pvc://<claim>/<path>    the operator mounts each claim at /mnt/pvc/<claim>; KUBETUNE_PVC_ROOT moves the root.
- s3://bucket/key         an object -> a file; a prefix -> a folder (every object below it). Downloads land under
                          cache_dir and are kept by ETag and size, so a restarted pod whose emptyDir survived does
                          not download the model again.
- hf://org/name[@rev]     Hugging Face Hub snapshot (hf://datasets/org/name for datasets); needs internet.

S3 settings come only from the standard environment the operator wires from the job's Secret reference:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), AWS_REGION, AWS_ENDPOINT_URL(_S3);
`spec.output.endpoint` (the `endpoint` argument) overrides the endpoint. Addressing is path-style because
SeaweedFS, Ceph and MinIO-style stores do not serve virtual-hosted buckets on an IP endpoint. Credentials are
never logged or put in error messages: every message built here goes through `_scrub`.

Publishing is atomic for readers: `publish_dir` uploads under `<rel>.tmp-<id>/`, then copies into `<rel>/`
and writes `<rel>/_COMPLETE` last. A reader trusts a folder only when `_COMPLETE` is there; a crash leaves a
`.tmp-*` prefix (and at worst a `<rel>/` without `_COMPLETE`), which the next publish of `<rel>` removes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError, TrainerError

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"
TMP_INFIX = ".tmp-"
PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
HF_OFFLINE_MESSAGE = "hf:// needs internet; copy the model to s3:// or a PVC"
# Multipart above 64 MiB in 64 MiB parts: S3 allows 10,000 parts, so single files up to ~640 GB upload.
MULTIPART_BYTES = 64 * 1024 * 1024
_NEARBY_MAX = 20
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
               "Forbidden", "403", "AuthorizationHeaderMalformed", "InvalidSecurity"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


# ----------------------------------------------------------------------------------------------- helpers
def _scrub(text: str) -> str:
    """Remove any credential value the process holds from a message (botocore's messages do not contain the
    secret, but a message that ever did must not reach a log, a Kubernetes event or a termination message)."""
    for name in _SECRET_ENV:
        v = os.environ.get(name)
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    # userinfo in an endpoint URL (http://user:pass@host)
    return re.sub(r"(https?://)[^/@\s]+@", r"\1***@", text)


def _scheme(uri: str) -> str:
    m = re.match(r"^([a-z0-9]+)://", uri or "")
    if not m:
        raise ConfigError(f"{uri!r} is not a URI; use s3://, file://, pvc:// or hf://")
    return m.group(1)


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/some/key -> ("bucket", "some/key")."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{uri}: no bucket name (expected s3://bucket/key)")
    return bucket, key


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT)


def local_path(uri: str) -> Path:
    """file:// and pvc:// URIs -> the local path (not checked for existence)."""
    scheme = _scheme(uri)
    rest = uri[len(scheme) + 3:]
    if scheme == "file":
        p = Path(rest)
        return p if p.is_absolute() else Path.cwd() / p
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        if not claim:
            raise ConfigError(f"{uri}: no claim name (expected pvc://<claim>/<path>)")
        return pvc_root() / claim / sub if sub else pvc_root() / claim
    raise ConfigError(f"{uri}: not a file:// or pvc:// URI")


def _clean_rel(rel: str) -> str:
    parts = [p for p in str(rel).replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"relative store path may not contain '..': {rel!r}")
    return "/".join(parts)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _local_nearby(p: Path) -> str:
    """'<nearest existing ancestor> holds: [...]' for a missing local path."""
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    try:
        names = sorted(x.name + ("/" if x.is_dir() else "") for x in anc.iterdir())
    except OSError:
        return f"{anc} is not readable"
    shown = names[:_NEARBY_MAX] + (["..."] if len(names) > _NEARBY_MAX else [])
    return f"{anc} holds: {shown or 'nothing'}"


def _walk_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file below root, sorted."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_file():
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- S3 client
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def s3_client(endpoint: Optional[str] = None, region: Optional[str] = None):
    """A boto3 S3 client from the standard env, `endpoint` overriding AWS_ENDPOINT_URL(_S3). Cached per
    (endpoint, region, credentials) so the many small calls of a run share one connection pool."""
    import boto3
    from botocore.config import Config

    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # The cache key carries a digest of the credentials, not the credentials.
    fp = hashlib.sha256("\0".join(os.environ.get(k, "") for k in _SECRET_ENV).encode()).hexdigest()
    key = (endpoint, region, fp, os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"))
    with _clients_lock:
        if key not in _clients:
            cfg = Config(
                s3={"addressing_style": "path"},
                # adaptive = standard retries (throttling, 5xx, connection resets) + client-side rate limiting
                retries={"mode": "adaptive", "total_max_attempts": 8},
                connect_timeout=10, read_timeout=120, max_pool_connections=16,
            )
            kwargs: dict[str, Any] = {"config": cfg, "region_name": region}
            if endpoint:
                kwargs["endpoint_url"] = endpoint
            _clients[key] = boto3.session.Session().client("s3", **kwargs)
        return _clients[key]


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                          max_concurrency=8, use_threads=True)


def _error_code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
    # boto3's S3UploadFailedError / RetriesExceededError only carry the ClientError's text
    m = re.search(r"An error occurred \((\w+)\)", str(exc))
    return m.group(1) if m else ""


def _endpoint_of(client) -> str:
    return _scrub(getattr(getattr(client, "meta", None), "endpoint_url", "") or "the default AWS endpoint")


def s3_error(exc: BaseException, uri: str, action: str, client=None) -> TrainerError:
    """A botocore/boto3 failure -> ConfigError (the spec or its Secret is wrong: the same pod would fail again)
    or TrainerError (retriable: the store was unreachable or failed). Never carries credentials."""
    from botocore import exceptions as bx

    endpoint = _endpoint_of(client) if client is not None else "the S3 endpoint"
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return ConfigError(f"no S3 credentials for {uri}: the job needs spec.output.credentials (a Secret with "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                        bx.ConnectionClosedError)):
        return TrainerError(f"cannot reach S3 at {endpoint} while {action} {uri}: {type(exc).__name__}")
    code = _error_code(exc)
    bucket = split_s3(uri)[0] if uri.startswith("s3://") else "?"
    if code in _AUTH_CODES:
        return ConfigError(f"S3 at {endpoint} refused the credentials while {action} {uri} ({code}): check the "
                           f"Secret named in spec.output.credentials and that its key may access bucket {bucket}")
    if code == "NoSuchBucket":
        return ConfigError(f"{uri}: bucket {bucket!r} does not exist at {endpoint}")
    if code in _MISSING_CODES:
        return ConfigError(f"{uri}: not found at {endpoint}")
    return TrainerError(_scrub(f"S3 error while {action} {uri} at {endpoint}: {code or type(exc).__name__}: {exc}"))


def _is_s3_failure(exc: BaseException) -> bool:
    mod = type(exc).__module__ or ""
    return mod.startswith(("botocore", "boto3", "s3transfer"))


class _S3Errors:
    """`with _S3Errors(uri, "uploading", client):` turns boto failures into TrainerErrors."""

    def __init__(self, uri: str, action: str, client=None):
        self.uri, self.action, self.client = uri, action, client

    def __enter__(self):
        return self

    def __exit__(self, et, exc, tb):
        if exc is not None and not isinstance(exc, TrainerError) and _is_s3_failure(exc):
            raise s3_error(exc, self.uri, self.action, self.client) from None
        return False


# ------------------------------------------------------------------------------------------------- fetch
def fetch(uri: str, cache_dir: Path, *, endpoint: Optional[str] = None, revision: Optional[str] = None) -> Path:
    """Resolve a job URI to a local file or folder (downloading s3:// and hf:// into cache_dir).

    A missing source raises ConfigError naming the URI and what exists nearby."""
    scheme = _scheme(uri)
    if scheme in ("file", "pvc"):
        p = local_path(uri)
        if not p.exists():
            hint = ""
            if scheme == "pvc" and not (pvc_root() / uri[6:].split("/")[0]).exists():
                hint = (f" (claim not mounted under {pvc_root()}: the operator mounts the claims a job names; "
                        f"{PVC_ROOT_ENV} moves the root for local runs)")
            raise ConfigError(f"{uri}: no such file or folder{hint}; {_local_nearby(p)}")
        return p
    if scheme == "s3":
        return _fetch_s3(uri, Path(cache_dir), endpoint)
    if scheme == "hf":
        return _fetch_hf(uri, Path(cache_dir), revision)
    raise ConfigError(f"{uri}: unsupported URI scheme {scheme}://; use s3://, file://, pvc:// or hf://")


def _s3_nearby(client, bucket: str, key: str) -> str:
    """What the closest existing parent prefix holds ('s3://b/models/ holds: [a/, b.json]')."""
    parts = [p for p in key.rstrip("/").split("/") if p][:-1]
    while True:
        prefix = "/".join(parts) + "/" if parts else ""
        resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=_NEARBY_MAX + 1)
        names = [c["Prefix"][len(prefix):] for c in resp.get("CommonPrefixes", [])]
        names += [o["Key"][len(prefix):] for o in resp.get("Contents", []) if o["Key"] != prefix]
        if names or not parts:
            shown = sorted(names)[:_NEARBY_MAX] + (["..."] if len(names) > _NEARBY_MAX else [])
            return f"s3://{bucket}/{prefix} holds: {shown or 'nothing'}"
        parts.pop()


def _list_objects(client, bucket: str, prefix: str) -> list[dict]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]  # skip folder markers
    return out


def _head(client, bucket: str, key: str) -> Optional[dict]:
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _error_code(exc) in _MISSING_CODES:
            return None
        raise


def _fetch_s3(uri: str, cache_dir: Path, endpoint: Optional[str]) -> Path:
    bucket, key = split_s3(uri)
    client = s3_client(endpoint)
    with _S3Errors(uri, "fetching", client):
        head = _head(client, bucket, key) if key and not key.endswith("/") else None
        base = cache_dir / "s3" / bucket / key.strip("/") if key.strip("/") else cache_dir / "s3" / bucket
        if head is not None:
            remote = {"": {"key": key, "etag": head.get("ETag", ""), "size": head.get("ContentLength", -1)}}
        else:
            prefix = key.rstrip("/") + "/" if key.strip("/") else ""
            objs = _list_objects(client, bucket, prefix)
            if not objs:
                raise ConfigError(f"{uri}: no such object or folder; {_s3_nearby(client, bucket, key)}")
            remote = {o["Key"][len(prefix):]: {"key": o["Key"], "etag": o.get("ETag", ""), "size": o["Size"]}
                      for o in objs}
        _sync_down(client, bucket, remote, base, uri)
    return base


def _sync_down(client, bucket: str, remote: dict[str, dict], base: Path, uri: str) -> None:
    """Download what is not already cached with the same ETag and size. The cache record sits next to the
    target (`<target>.kubetune-fetch.json`) so the folder itself holds only the source's files."""
    meta_path = base.with_name(base.name + ".kubetune-fetch.json")
    try:
        cached = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        cached = {}
    single = list(remote) == [""]
    if single and base.is_dir():
        shutil.rmtree(base)
    if not single and base.is_file():
        base.unlink()
    tc = _transfer_config()
    fresh, got, nbytes = {}, 0, 0
    for rel, info in sorted(remote.items()):
        dest = base / rel if rel else base
        old = cached.get(rel)
        if (old and old.get("etag") == info["etag"] and old.get("size") == info["size"] and dest.is_file()
                and dest.stat().st_size == info["size"]):
            fresh[rel] = old
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            client.download_file(bucket, info["key"], str(tmp), Config=tc)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        fresh[rel] = {"etag": info["etag"], "size": info["size"]}
        got += 1
        nbytes += info["size"]
    if not single:
        # objects deleted upstream must not linger in the local copy (a stale shard would load silently)
        for rel, p in _walk_files(base):
            if rel not in remote:
                p.unlink()
    _atomic_write(meta_path, json.dumps(fresh, sort_keys=True).encode())
    if got:
        log.info("fetched %s: %d of %d files downloaded (%.1f MB)", uri, got, len(remote), nbytes / 1e6)
    else:
        log.info("fetched %s: all %d files already cached", uri, len(remote))


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _fetch_hf(uri: str, cache_dir: Path, revision: Optional[str]) -> Path:
    if _hf_offline():
        raise ConfigError(f"{uri}: {HF_OFFLINE_MESSAGE} (HF_HUB_OFFLINE is set in this pod)")
    repo = uri[len("hf://"):].strip("/")
    repo_type = "model"
    if repo.startswith("datasets/"):
        repo_type, repo = "dataset", repo[len("datasets/"):]
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise ConfigError(f"{uri}: huggingface_hub is not installed; {HF_OFFLINE_MESSAGE}") from None
    try:
        path = snapshot_download(repo_id=repo, repo_type=repo_type, revision=revision,
                                 cache_dir=str(cache_dir / "hf"), endpoint=os.environ.get("HF_ENDPOINT") or None)
    except GatedRepoError:
        raise ConfigError(f"{uri}: the repository is gated; accept its terms and provide HF_TOKEN, or "
                          "copy the model to s3:// or a PVC") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{uri}: revision {revision!r} does not exist") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{uri}: no such {repo_type} repository on the Hugging Face Hub (or it is private)") from None
    except Exception as exc:  # noqa: BLE001 - offline/unreachable hub surfaces as many exception types
        raise ConfigError(f"{uri}: download failed ({type(exc).__name__}); {HF_OFFLINE_MESSAGE}") from None
    return Path(path)


# ---------------------------------------------------------------------------------------------- backends
class _LocalBackend:
    """file:// and pvc:// stores: a folder. Single files are replaced atomically (write + rename)."""

    def __init__(self, root: Path):
        self.root = root

    def _p(self, key: str) -> Path:
        return self.root / key if key else self.root

    def put_file(self, local: Path, key: str) -> None:
        dest = self._p(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)

    def write_bytes(self, key: str, data: bytes) -> None:
        _atomic_write(self._p(key), data)

    def read_bytes(self, key: str) -> Optional[bytes]:
        p = self._p(key)
        return p.read_bytes() if p.is_file() else None

    def is_object(self, key: str) -> bool:
        return self._p(key).is_file()

    def list_files(self, key: str) -> dict[str, int]:
        p = self._p(key)
        return {rel: f.stat().st_size for rel, f in _walk_files(p)} if p.is_dir() else {}

    def list_children(self, key: str) -> list[str]:
        p = self._p(key)
        return sorted(x.name for x in p.iterdir() if x.is_dir()) if p.is_dir() else []

    def delete_tree(self, key: str) -> None:
        p = self._p(key)
        if p.is_dir():
            (p / COMPLETE).unlink(missing_ok=True)  # the marker goes first: a reader never trusts a half-deleted folder
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def move_tree(self, src: str, dst: str) -> None:
        d = self._p(dst)
        d.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._p(src), d)  # one rename: atomic on a POSIX filesystem

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._p(key), dest)


class _S3Backend:
    def __init__(self, uri: str, bucket: str, base: str, client):
        self.uri, self.bucket, self.base, self.client = uri, bucket, base.strip("/"), client
        self.tc = _transfer_config()

    def _k(self, key: str) -> str:
        return _join(self.base, key)

    def _dir(self, key: str) -> str:
        k = self._k(key)
        return k + "/" if k else ""

    def put_file(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._k(key), Config=self.tc)

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def read_bytes(self, key: str) -> Optional[bytes]:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            raise

    def is_object(self, key: str) -> bool:
        return bool(key) and _head(self.client, self.bucket, self._k(key)) is not None

    def list_files(self, key: str) -> dict[str, int]:
        prefix = self._dir(key)
        return {o["Key"][len(prefix):]: o["Size"] for o in _list_objects(self.client, self.bucket, prefix)}

    def list_children(self, key: str) -> list[str]:
        prefix = self._dir(key)
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            names += [c["Prefix"][len(prefix):].rstrip("/") for c in page.get("CommonPrefixes", [])]
        # Filer-backed stores (SeaweedFS) keep listing a folder after its last object is deleted: only folders
        # that still hold an object count.
        return sorted(n for n in names if n and self._has_objects(prefix + n + "/"))

    def _has_objects(self, prefix: str) -> bool:
        resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=2)
        return any(not o["Key"].endswith("/") for o in resp.get("Contents", []))

    def delete_tree(self, key: str) -> None:
        keys = [self._dir(key) + rel for rel in self.list_files(key)]
        marker = self._dir(key) + COMPLETE
        if marker in keys:  # the marker goes first: a reader never trusts a half-deleted folder
            self._delete([marker])
            keys.remove(marker)
        if key and _head(self.client, self.bucket, self._k(key)) is not None:
            keys.append(self._k(key))
        self._delete(keys)

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            resp = self.client.delete_objects(Bucket=self.bucket,
                                              Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errs = resp.get("Errors") or []
            if errs:
                raise TrainerError(f"S3 refused to delete {len(errs)} objects under {self.uri} "
                                   f"(first: {errs[0].get('Key')}: {errs[0].get('Code')})")

    def move_tree(self, src: str, dst: str) -> None:
        files = self.list_files(src)
        # server-side copies (multipart copy above the threshold): nothing goes through the pod again
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda rel: self.client.copy({"Bucket": self.bucket, "Key": self._dir(src) + rel},
                                                       self.bucket, self._dir(dst) + rel, Config=self.tc),
                          sorted(files)))
        self.delete_tree(src)

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._k(key), str(dest), Config=self.tc)


# ------------------------------------------------------------------------------------------- OutputStore
def job_output_uri(job) -> str:
    """<spec.output.uri>/<namespace>/<name>/ : where one FineTuneJob's results live."""
    return f"{job.spec.output.uri.rstrip('/')}/{job.metadata.namespace}/{job.metadata.name}/"


class OutputStore:
    """A job's output folder in S3, on a local path or on a PVC, addressed by relative paths ("adapter",
    "checkpoints/checkpoint-10/trainer_state.json").

    `uri` is the store's root as given (normally `job_output_uri(job)`: `OutputStore.for_job(job)` does that).
    Methods raise ConfigError when the spec or its Secret is wrong and TrainerError (retriable) when the store
    failed; messages never contain credentials.
    """

    def __init__(self, uri: str, *, endpoint: Optional[str] = None, region: Optional[str] = None):
        scheme = _scheme(uri)
        self.root_uri = uri.rstrip("/") + "/"
        self.scheme = scheme
        if scheme == "s3":
            bucket, base = split_s3(self.root_uri)
            self._client = s3_client(endpoint, region)
            self._b: Any = _S3Backend(self.root_uri, bucket, base, self._client)
        elif scheme in ("file", "pvc"):
            self._client = None
            self._b = _LocalBackend(local_path(self.root_uri.rstrip("/")))
        else:
            raise ConfigError(f"{uri}: outputs go to s3://, file:// or pvc://, not {scheme}://",
                              field="spec.output.uri")
        self._workers = 8 if scheme == "s3" else 1

    @classmethod
    def for_job(cls, job) -> "OutputStore":
        out = job.spec.output
        return cls(job_output_uri(job), endpoint=out.endpoint, region=out.region)

    def __repr__(self) -> str:
        return f"OutputStore({self.root_uri!r})"

    def uri(self, rel: str) -> str:
        rel = _clean_rel(rel)
        return self.root_uri + rel if rel else self.root_uri

    def _guard(self, rel: str, action: str) -> _S3Errors:
        return _S3Errors(self.uri(rel), action, self._client)

    # --------------------------------------------------------------------------------------------- writes
    def put_file(self, local: Path, rel: str) -> str:
        rel = _clean_rel(rel)
        with self._guard(rel, "uploading"):
            self._b.put_file(Path(local), rel)
        return self.uri(rel)

    def put_dir(self, local: Path, rel: str) -> str:
        """Upload every file below `local` to `rel/` (same relative layout). Not atomic: see publish_dir."""
        rel = _clean_rel(rel)
        local = Path(local)
        if not local.is_dir():
            raise TrainerError(f"cannot upload {local}: not a folder")
        files = _walk_files(local)
        with self._guard(rel, "uploading"):
            if self._workers > 1 and len(files) > 1:
                with ThreadPoolExecutor(max_workers=self._workers) as pool:
                    list(pool.map(lambda rf: self._b.put_file(rf[1], _join(rel, rf[0])), files))
            else:
                for r, f in files:
                    self._b.put_file(f, _join(rel, r))
        log.info("uploaded %d files (%.1f MB) to %s", len(files), sum(f.stat().st_size for _, f in files) / 1e6,
                 self.uri(rel))
        return self.uri(rel)

    def write_text(self, rel: str, text: str) -> str:
        rel = _clean_rel(rel)
        with self._guard(rel, "writing"):
            self._b.write_bytes(rel, text.encode())
        return self.uri(rel)

    def mark_complete(self, rel: str, extra: Optional[dict] = None) -> str:
        """Write `rel/_COMPLETE` listing every file below rel with its size (readers can verify a download).
        Call it only after everything below rel is uploaded."""
        rel = _clean_rel(rel)
        files = {k: v for k, v in self.list_files(rel).items() if k != COMPLETE}
        body = {"files": files, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
        return self.write_text(_join(rel, COMPLETE), json.dumps(body, indent=1, sort_keys=True))

    def publish_dir(self, local: Path, rel: str) -> str:
        """Upload a folder so that readers see all of it or none of it: stage under `rel.tmp-<id>/`, copy into
        `rel/`, write `rel/_COMPLETE` last. Leftovers of an earlier crashed publish of `rel` are removed first.
        One writer per `rel` (the job's main process)."""
        rel = _clean_rel(rel)
        if not rel:
            raise ValueError("publish_dir needs a folder below the store root")
        self._clean_staging(rel)
        tmp = f"{rel}{TMP_INFIX}{uuid.uuid4().hex[:10]}"
        self.put_dir(Path(local), tmp)
        self._finalize(tmp, rel)
        log.info("published %s", self.uri(rel))
        return self.uri(rel)

    def _finalize(self, tmp: str, rel: str) -> None:
        with self._guard(rel, "publishing"):
            self._b.delete_tree(rel)  # an older result: its _COMPLETE disappears first
            self._b.move_tree(tmp, rel)
        self.mark_complete(rel)

    def _clean_staging(self, rel: str) -> None:
        parent, _, name = rel.rpartition("/")
        for child in self.list_dirs(parent):
            if child.startswith(name + TMP_INFIX):
                log.info("removing %s left by an interrupted publish", self.uri(_join(parent, child)))
                self.delete_prefix(_join(parent, child))

    def delete_prefix(self, rel: str) -> None:
        """Delete the object `rel` and everything below `rel/` (`_COMPLETE` first). `checkpoint-1` does not
        touch `checkpoint-10`: deletion is by path segments, not by string prefix."""
        rel = _clean_rel(rel)
        if not rel:
            raise ValueError("refusing to delete the whole output store")
        with self._guard(rel, "deleting"):
            self._b.delete_tree(rel)

    # ---------------------------------------------------------------------------------------------- reads
    def exists(self, rel: str) -> bool:
        """An object at rel, or a folder with at least one file below it (complete or not: use is_complete)."""
        rel = _clean_rel(rel)
        with self._guard(rel, "checking"):
            return self._b.is_object(rel) or bool(self._first_file(rel))

    def _first_file(self, rel: str) -> bool:
        if isinstance(self._b, _S3Backend):
            return self._b._has_objects(self._b._dir(rel))
        return bool(self._b.list_files(rel))

    def is_complete(self, rel: str) -> bool:
        """A folder written by publish_dir / mark_complete whose `_COMPLETE` marker is there."""
        rel = _clean_rel(rel)
        with self._guard(rel, "checking"):
            return self._b.is_object(_join(rel, COMPLETE))

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the immediate sub-folders of rel (sorted; `.tmp-*` staging folders included)."""
        rel = _clean_rel(rel)
        with self._guard(rel, "listing"):
            return self._b.list_children(rel)

    def list_files(self, rel: str) -> dict[str, int]:
        """Every file below rel: relative path -> size in bytes."""
        rel = _clean_rel(rel)
        with self._guard(rel, "listing"):
            return self._b.list_files(rel)

    def get_dir(self, rel: str, local: Path) -> Path:
        """Download everything below rel into local (same layout); returns local."""
        rel = _clean_rel(rel)
        local = Path(local)
        files = self.list_files(rel)
        if not files:
            raise ConfigError(f"{self.uri(rel)}: nothing stored there")
        local.mkdir(parents=True, exist_ok=True)

        def one(r: str) -> None:
            dest = local / r
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                self._b.download(_join(rel, r), tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

        with self._guard(rel, "downloading"):
            if self._workers > 1 and len(files) > 1:
                with ThreadPoolExecutor(max_workers=self._workers) as pool:
                    list(pool.map(one, sorted(files)))
            else:
                for r in sorted(files):
                    one(r)
        return local

    def read_text(self, rel: str) -> Optional[str]:
        rel = _clean_rel(rel)
        with self._guard(rel, "reading"):
            data = self._b.read_bytes(rel)
        return None if data is None else data.decode()

    def read_complete(self, rel: str) -> Optional[dict]:
        """The parsed `rel/_COMPLETE` record ({"files": {path: size}, ...}), None when rel is not complete."""
        text = self.read_text(_join(_clean_rel(rel), COMPLETE))
        if text is None:
            return None
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return {}

