"""Job URIs and store paths: the scheme of a URI, s3:// -> (bucket, key), file:// and pvc:// -> a local path,
and the store's layout conventions (relative keys, the `_COMPLETE` marker, `.tmp-` staging folders)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ConfigError

COMPLETE = "_COMPLETE"
TMP_INFIX = ".tmp-"
PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"


def scheme_of(uri: str) -> str:
    """"s3" for s3://..., ConfigError for something that is not a URI."""
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


def check_uri(uri: str) -> str:
    """`uri` unless it could climb out of its claim, bucket or folder ('..', an empty segment, pvc:///):
    ConfigError naming it. The same rules as the API's CEL (kubetune_api.common.URI_SAFETY_RULES), repeated
    here because a local run never meets the apiserver and code may build URIs itself."""
    from kubetune_api.common import uri_problem

    problem = uri_problem(uri)
    if problem:
        raise ConfigError(f"{uri}: {problem}")
    return uri


def safe_key_path(key: str, rel: str, uri: str) -> str:
    """The object key's part below the fetched prefix (`rel`), if it is safe to use as a relative local path;
    ConfigError naming the key otherwise. A bucket may hold keys like `models/x/../../etc/cron.d/job` or
    `models/x//abs` (AWS S3 stores them as given): joined to the download folder they would write outside it."""
    parts = rel.split("/")
    bad = ("an absolute path" if rel.startswith("/") else "an empty path segment" if "" in parts
           else f"a '{'..' if '..' in parts else '.'}' path segment" if {".", ".."} & set(parts) else None)
    if bad:
        raise ConfigError(f"{uri}: refusing object key {key!r}: it contains {bad}, which would write outside the "
                          "download folder; remove or rename that object")
    return rel


def local_path(uri: str) -> Path:
    """file:// and pvc:// URIs -> the local path (not checked for existence; unsafe URIs are refused)."""
    scheme = scheme_of(check_uri(uri))
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


def clean_rel(rel: str) -> str:
    """A store-relative path normalised to a/b/c; '..' is refused (it would leave the job's folder)."""
    parts = [p for p in str(rel).replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"relative store path may not contain '..': {rel!r}")
    return "/".join(parts)


def join_key(*parts: str) -> str:
    """Join store path segments with single slashes, dropping empty ones."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))
