"""The storage error taxonomy: a botocore/boto3 failure becomes ConfigError (the spec or its Secret is wrong;
the same pod would fail again) or TrainerError (retriable: the store was unreachable or failed), and every
message is scrubbed of credentials before it can reach a log, an event or a termination message."""

from __future__ import annotations

import os
import re

from ..errors import ConfigError, TrainerError
from .uris import split_s3

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
              "Forbidden", "403", "AuthorizationHeaderMalformed", "InvalidSecurity"}
MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
NEARBY_MAX = 20  # names listed when a source is missing ("<parent> holds: [...]")


def scrub(text: str) -> str:
    """Remove any credential value the process holds from a message (botocore's messages do not contain the
    secret, but a message that ever did must not reach a log, a Kubernetes event or a termination message)."""
    for name in SECRET_ENV:
        v = os.environ.get(name)
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    # userinfo in an endpoint URL (http://user:pass@host)
    return re.sub(r"(https?://)[^/@\s]+@", r"\1***@", text)


def error_code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
    # boto3's S3UploadFailedError / RetriesExceededError only carry the ClientError's text
    m = re.search(r"An error occurred \((\w+)\)", str(exc))
    return m.group(1) if m else ""


def endpoint_of(client) -> str:
    return scrub(getattr(getattr(client, "meta", None), "endpoint_url", "") or "the default AWS endpoint")


def s3_error(exc: BaseException, uri: str, action: str, client=None) -> TrainerError:
    """A botocore/boto3 failure -> ConfigError (the spec or its Secret is wrong: the same pod would fail again)
    or TrainerError (retriable: the store was unreachable or failed). Never carries credentials."""
    from botocore import exceptions as bx

    endpoint = endpoint_of(client) if client is not None else "the S3 endpoint"
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return ConfigError(f"no S3 credentials for {uri}: the job's runtime names no credentials Secret "
                           "(storage.credentials of its FineTuneRuntime; ask the platform team)")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                        bx.ConnectionClosedError)):
        return TrainerError(f"cannot reach S3 at {endpoint} while {action} {uri}: {type(exc).__name__}")
    code = error_code(exc)
    bucket = split_s3(uri)[0] if uri.startswith("s3://") else "?"
    if code in AUTH_CODES:
        return ConfigError(f"S3 at {endpoint} refused the credentials while {action} {uri} ({code}): the "
                           f"Secret named by the job's runtime (storage.credentials) must hold a key that may access "
                           f"bucket {bucket}")
    if code == "NoSuchBucket":
        return ConfigError(f"{uri}: bucket {bucket!r} does not exist at {endpoint}")
    if code in MISSING_CODES:
        return ConfigError(f"{uri}: not found at {endpoint}")
    return TrainerError(scrub(f"S3 error while {action} {uri} at {endpoint}: {code or type(exc).__name__}: {exc}"))


def is_s3_failure(exc: BaseException) -> bool:
    mod = type(exc).__module__ or ""
    return mod.startswith(("botocore", "boto3", "s3transfer"))


class S3Errors:
    """`with S3Errors(uri, "uploading", client):` turns boto failures into TrainerErrors."""

    def __init__(self, uri: str, action: str, client=None):
        self.uri, self.action, self.client = uri, action, client

    def __enter__(self):
        return self

    def __exit__(self, et, exc, tb):
        if exc is not None and not isinstance(exc, TrainerError) and is_s3_failure(exc):
            raise s3_error(exc, self.uri, self.action, self.client) from None
        return False
