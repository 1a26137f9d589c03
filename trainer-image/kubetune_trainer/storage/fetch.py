"""Fetching: every URI a FineTuneJob names (s3://, file://, pvc://, hf://) resolved to a local file or folder.
s3:// downloads land under the cache folder and are kept by ETag and size (a restarted pod whose emptyDir
survived does not download the model again); objects deleted upstream are removed from the local copy."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .errors import S3Errors
from .local import atomic_write, local_nearby, walk_files
from .s3 import head_object, list_objects, retrying, s3_client, s3_nearby, transfer_config
from .uris import PVC_ROOT_ENV, check_uri, local_path, pvc_root, safe_key_path, scheme_of, split_s3

log = logging.getLogger("kubetune_trainer.storage")  # one logger for the package (its name before the split)

HF_OFFLINE_MESSAGE = "hf:// needs internet; copy the model to s3:// or a PVC"


def fetch(uri: str, cache_dir: Path, *, endpoint: Optional[str] = None, revision: Optional[str] = None) -> Path:
    """Resolve a job URI to a local file or folder (downloading s3:// and hf:// into cache_dir).

    A missing source raises ConfigError naming the URI and what exists nearby; a URI or an object key that
    would resolve outside its folder raises ConfigError naming it (uris.check_uri, uris.safe_key_path)."""
    uri = resolve_latest(check_uri(uri), endpoint=endpoint)
    scheme = scheme_of(uri)
    if scheme in ("file", "pvc"):
        p = local_path(uri)
        if not p.exists():
            hint = ""
            if scheme == "pvc" and not (pvc_root() / uri[6:].split("/")[0]).exists():
                hint = (f" (claim not mounted under {pvc_root()}: the operator mounts the claims a job names; "
                        f"{PVC_ROOT_ENV} moves the root for local runs)")
            raise ConfigError(f"{uri}: no such file or folder{hint}; {local_nearby(p)}")
        return p
    if scheme == "s3":
        return _fetch_s3(uri, Path(cache_dir), endpoint)
    if scheme == "hf":
        return _fetch_hf(uri, Path(cache_dir), revision)
    raise ConfigError(f"{uri}: unsupported URI scheme {scheme}://; use s3://, file://, pvc:// or hf://")


LATEST = "latest"


def resolve_latest(uri: str, *, endpoint: Optional[str] = None) -> str:
    """`<output>/<namespace>/<job>/latest/<rest>` names <rest> of that job's newest successful run: the `latest`
    segment becomes `runs/<run-id>` as the job's runs.json index names it (runs.py writes the index last, after
    the run's manifest, so the run it names is complete). This is how one job's manifest chains from another's
    result (a DPO job's model.source: `.../sft-support-bot/latest/merged`) while every run keeps its own
    immutable prefix. Other URIs are returned unchanged. No finished run yet: a ConfigError naming the index."""
    head, sep, rest = uri.partition(f"/{LATEST}/")
    if not sep and uri.rstrip("/").endswith(f"/{LATEST}"):
        head, sep, rest = uri.rstrip("/")[: -len(LATEST) - 1], "/", ""
    if not sep or scheme_of(uri) not in ("s3", "file", "pvc"):
        return uri
    from ..runs import INDEX, RUNS, read_index  # the run layout lives in runs.py (which imports this package)
    from .publish import OutputStore

    run_id = read_index(OutputStore(head, endpoint=endpoint)).get("latest")
    if not run_id:
        raise ConfigError(f"{uri}: '{LATEST}' names the newest successful run of the job at {head}/, but "
                          f"{head}/{INDEX} names none yet (that job has not succeeded, or the URI is wrong)")
    resolved = f"{head}/{RUNS}/{run_id}" + (f"/{rest}" if rest else "")
    log.info("%s -> %s", uri, resolved)
    return resolved


def _fetch_s3(uri: str, cache_dir: Path, endpoint: Optional[str]) -> Path:
    bucket, key = split_s3(uri)
    client = s3_client(endpoint)
    with S3Errors(uri, "fetching", client):
        head = head_object(client, bucket, key) if key and not key.endswith("/") else None
        base = cache_dir / "s3" / bucket / key.strip("/") if key.strip("/") else cache_dir / "s3" / bucket
        if head is not None:
            remote = {"": {"key": key, "etag": head.get("ETag", ""), "size": head.get("ContentLength", -1)}}
        else:
            prefix = key.rstrip("/") + "/" if key.strip("/") else ""
            objs = list_objects(client, bucket, prefix)
            if not objs:
                raise ConfigError(f"{uri}: no such object or folder; {s3_nearby(client, bucket, key)}")
            remote = {safe_key_path(o["Key"], o["Key"][len(prefix):], uri):
                      {"key": o["Key"], "etag": o.get("ETag", ""), "size": o["Size"]} for o in objs}
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
    tc = transfer_config()
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
            retrying(client, f"downloading s3://{bucket}/{info['key']}",
                     lambda: client.download_file(bucket, info["key"], str(tmp), Config=tc))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        fresh[rel] = {"etag": info["etag"], "size": info["size"]}
        got += 1
        nbytes += info["size"]
    if not single:
        # objects deleted upstream must not linger in the local copy (a stale shard would load silently)
        for rel, p in walk_files(base):
            if rel not in remote:
                p.unlink()
    atomic_write(meta_path, json.dumps(fresh, sort_keys=True).encode())
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
