"""Publishing: a job's output store (S3, a local folder or a PVC) addressed by relative paths, with atomic
folder publishes for readers.

`publish_dir` uploads under `<rel>.tmp-<id>/`, then copies into `<rel>/` and writes `<rel>/_COMPLETE` last. A
reader trusts a folder only when `_COMPLETE` is there; a crash leaves a `.tmp-*` prefix (and at worst a `<rel>/`
without `_COMPLETE`), which the next publish of `<rel>` removes.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError, TrainerError
from .errors import S3Errors
from .local import LocalBackend, walk_files
from .patience import in_pool
from .s3 import S3Backend, s3_client
from .uris import COMPLETE, TMP_INFIX, clean_rel, join_key, local_path, scheme_of, split_s3

log = logging.getLogger("kubetune_trainer.storage")  # one logger for the package (its name before the split)


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
        scheme = scheme_of(uri)
        self.root_uri = uri.rstrip("/") + "/"
        self.scheme = scheme
        if scheme == "s3":
            bucket, base = split_s3(self.root_uri)
            self._client = s3_client(endpoint, region)
            self._b: Any = S3Backend(self.root_uri, bucket, base, self._client)
        elif scheme in ("file", "pvc"):
            self._client = None
            self._b = LocalBackend(local_path(self.root_uri.rstrip("/")))
        else:
            raise ConfigError(f"{uri}: outputs go to s3://, file:// or pvc://, not {scheme}://",
                              field="spec.output.uri")
        self._workers = 8 if scheme == "s3" else 1

    @classmethod
    def for_job(cls, job) -> "OutputStore":
        # endpoint, region and credentials come from the env the operator renders from the job's runtime
        return cls(job_output_uri(job))

    def __repr__(self) -> str:
        return f"OutputStore({self.root_uri!r})"

    def uri(self, rel: str) -> str:
        rel = clean_rel(rel)
        return self.root_uri + rel if rel else self.root_uri

    def _guard(self, rel: str, action: str) -> S3Errors:
        return S3Errors(self.uri(rel), action, self._client)

    # --------------------------------------------------------------------------------------------- writes
    def put_file(self, local: Path, rel: str) -> str:
        rel = clean_rel(rel)
        with self._guard(rel, "uploading"):
            self._b.put_file(Path(local), rel)
        return self.uri(rel)

    def put_dir(self, local: Path, rel: str) -> str:
        """Upload every file below `local` to `rel/` (same relative layout). Not atomic: see publish_dir."""
        rel = clean_rel(rel)
        local = Path(local)
        if not local.is_dir():
            raise TrainerError(f"cannot upload {local}: not a folder")
        files = walk_files(local)
        with self._guard(rel, "uploading"):
            if self._workers > 1 and len(files) > 1:
                with ThreadPoolExecutor(max_workers=self._workers) as pool:
                    list(pool.map(in_pool(lambda rf: self._b.put_file(rf[1], join_key(rel, rf[0]))), files))
            else:
                for r, f in files:
                    self._b.put_file(f, join_key(rel, r))
        log.info("uploaded %d files (%.1f MB) to %s", len(files), sum(f.stat().st_size for _, f in files) / 1e6,
                 self.uri(rel))
        return self.uri(rel)

    def write_text(self, rel: str, text: str) -> str:
        rel = clean_rel(rel)
        with self._guard(rel, "writing"):
            self._b.write_bytes(rel, text.encode())
        return self.uri(rel)

    def mark_complete(self, rel: str, extra: Optional[dict] = None) -> str:
        """Write `rel/_COMPLETE` listing every file below rel with its size (readers can verify a download).
        Call it only after everything below rel is uploaded."""
        rel = clean_rel(rel)
        files = {k: v for k, v in self.list_files(rel).items() if k != COMPLETE}
        body = {"files": files, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
        return self.write_text(join_key(rel, COMPLETE), json.dumps(body, indent=1, sort_keys=True))

    def publish_dir(self, local: Path, rel: str) -> str:
        """Upload a folder so that readers see all of it or none of it: stage under `rel.tmp-<id>/`, copy into
        `rel/`, write `rel/_COMPLETE` last. Leftovers of an earlier crashed publish of `rel` are removed first.
        One writer per `rel` (the job's main process)."""
        rel = clean_rel(rel)
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
                log.info("removing %s left by an interrupted publish", self.uri(join_key(parent, child)))
                self.delete_prefix(join_key(parent, child))

    def delete_prefix(self, rel: str) -> None:
        """Delete the object `rel` and everything below `rel/` (`_COMPLETE` first). `checkpoint-1` does not
        touch `checkpoint-10`: deletion is by path segments, not by string prefix."""
        rel = clean_rel(rel)
        if not rel:
            raise ValueError("refusing to delete the whole output store")
        with self._guard(rel, "deleting"):
            self._b.delete_tree(rel)

    # ---------------------------------------------------------------------------------------------- reads
    def exists(self, rel: str) -> bool:
        """An object at rel, or a folder with at least one file below it (complete or not: use is_complete)."""
        rel = clean_rel(rel)
        with self._guard(rel, "checking"):
            return self._b.is_object(rel) or bool(self._first_file(rel))

    def _first_file(self, rel: str) -> bool:
        if isinstance(self._b, S3Backend):
            return self._b._has_objects(self._b._dir(rel))
        return bool(self._b.list_files(rel))

    def is_complete(self, rel: str) -> bool:
        """A folder written by publish_dir / mark_complete whose `_COMPLETE` marker is there."""
        rel = clean_rel(rel)
        with self._guard(rel, "checking"):
            return self._b.is_object(join_key(rel, COMPLETE))

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the immediate sub-folders of rel (sorted; `.tmp-*` staging folders included)."""
        rel = clean_rel(rel)
        with self._guard(rel, "listing"):
            return self._b.list_children(rel)

    def list_files(self, rel: str) -> dict[str, int]:
        """Every file below rel: relative path -> size in bytes."""
        rel = clean_rel(rel)
        with self._guard(rel, "listing"):
            return self._b.list_files(rel)

    def get_dir(self, rel: str, local: Path) -> Path:
        """Download everything below rel into local (same layout); returns local."""
        rel = clean_rel(rel)
        local = Path(local)
        files = self.list_files(rel)
        if not files:
            raise ConfigError(f"{self.uri(rel)}: nothing stored there")
        local.mkdir(parents=True, exist_ok=True)

        def one(r: str) -> None:
            dest = local / r
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                self._b.download(join_key(rel, r), tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

        with self._guard(rel, "downloading"):
            if self._workers > 1 and len(files) > 1:
                with ThreadPoolExecutor(max_workers=self._workers) as pool:
                    list(pool.map(in_pool(one), sorted(files)))
            else:
                for r in sorted(files):
                    one(r)
        return local

    def read_text(self, rel: str) -> Optional[str]:
        rel = clean_rel(rel)
        with self._guard(rel, "reading"):
            data = self._b.read_bytes(rel)
        return None if data is None else data.decode()

    def read_complete(self, rel: str) -> Optional[dict]:
        """The parsed `rel/_COMPLETE` record ({"files": {path: size}, ...}), None when rel is not complete."""
        text = self.read_text(join_key(clean_rel(rel), COMPLETE))
        if text is None:
            return None
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return {}
