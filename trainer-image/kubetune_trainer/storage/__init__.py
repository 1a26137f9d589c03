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

S3 settings come only from the standard environment the operator wires from the job's runtime (its Secret
reference, endpoint and region): AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), AWS_REGION,
AWS_ENDPOINT_URL(_S3); the `endpoint` argument (tests, tools) overrides the endpoint. Addressing is path-style because
SeaweedFS, Ceph and MinIO-style stores do not serve virtual-hosted buckets on an IP endpoint. Credentials are
never logged or put in error messages: every message built here goes through `errors.scrub`.

Publishing is atomic for readers (see `publish.py`). Modules, one job each: `uris` (parsing, store layout),
`errors` (failure taxonomy, scrubbing), `local` and `s3` (the two backends), `fetch` (downloads and the cache),
`publish` (`OutputStore`). Import the public names from here.
"""

from .errors import s3_error, scrub
from .fetch import HF_OFFLINE_MESSAGE, fetch
from .publish import OutputStore, job_output_uri
from .s3 import s3_client
from .uris import COMPLETE, DEFAULT_PVC_ROOT, PVC_ROOT_ENV, TMP_INFIX, local_path, pvc_root, split_s3

__all__ = [
    "COMPLETE", "DEFAULT_PVC_ROOT", "HF_OFFLINE_MESSAGE", "PVC_ROOT_ENV", "TMP_INFIX", "OutputStore", "fetch",
    "job_output_uri", "local_path", "pvc_root", "s3_client", "s3_error", "scrub", "split_s3",
]
