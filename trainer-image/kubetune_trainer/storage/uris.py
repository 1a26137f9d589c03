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


def local_path(uri: str) -> Path:
    """file:// and pvc:// URIs -> the local path (not checked for existence)."""
    scheme = scheme_of(uri)
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
