"""Errors that end a run with a reason the operator can act on.

Each carries the exit code the operator's Job podFailurePolicy understands (kubetune_api.constants.ExitCode):
permanent ones (bad config, bad data, NaN loss, forgetting with action fail) fail the FineTuneJob at once;
anything else is retried by the Job's backoffLimit. `field` names the spec field or file at fault, so the
condition message tells the user what to fix.
"""

from __future__ import annotations

from kubetune_api.constants import ExitCode


class TrainerError(Exception):
    exit_code = ExitCode.RETRIABLE
    reason = "TrainerFailed"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field


class ConfigError(TrainerError):
    """The spec cannot work: model not found, unknown target modules, wrong format for the stage, ..."""

    exit_code = ExitCode.CONFIG_ERROR
    reason = "InvalidConfig"


class InsufficientMemoryError(ConfigError):
    """The memory estimate (kubetune_api.memory) exceeds this GPU's memory: the job would run out of memory
    after loading, every retry. Exit 78 before any weights load; the message has the numbers and the fixes."""

    reason = "InsufficientGPUMemory"


class DataError(TrainerError):
    """The dataset is empty, malformed or lacks a column the format needs."""

    exit_code = ExitCode.DATA_ERROR
    reason = "InvalidDataset"


class DivergedError(TrainerError):
    """Loss became NaN or infinite: retrying the same config would diverge again."""

    exit_code = ExitCode.DIVERGED
    reason = "LossNotFinite"


class ForgettingError(TrainerError):
    """Reference perplexity rose past evaluation.forgettingThreshold with onForgetting: fail."""

    exit_code = ExitCode.FORGETTING
    reason = "ForgettingThresholdExceeded"


class PreemptedError(TrainerError):
    """SIGTERM arrived (preemption, suspend, node drain): a checkpoint was written and a restart resumes."""

    exit_code = ExitCode.PREEMPTED
    reason = "Preempted"


class StorageUnavailableError(TrainerError):
    """The object store stayed unreachable (connection refused/reset, timeouts, 5xx, throttling) for the whole
    patience budget (spec.output.storagePatienceSeconds, storage/patience.py). The trainer already waited
    in-process, so a restarted pod would only wait again: exit 75 fails the Job at once with this reason, and
    the message names the endpoint and the call that failed last."""

    exit_code = ExitCode.STORAGE_UNAVAILABLE
    reason = "StorageUnavailable"
