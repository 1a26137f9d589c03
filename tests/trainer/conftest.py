"""Shared fixtures for the trainer tests (CPU, tiny models, nothing downloaded).

- `tiny_model`: a ~150k-parameter Llama folder built once per machine (`kubetune_trainer.tiny.cached_model()`),
  briefly pre-trained on general text so forgetting and adapter learning mean something.
- `tiny_data`: one generated .jsonl per dataset format (plus general/domain text), once per session.
- `make_job(**overrides)`: a FineTuneJob with file:// URIs for the tiny model and data and output in a tmp
  folder; overrides deep-merge into the spec (camelCase, as in a manifest), `data=` picks the dataset file.
- `run_job(job)`: runner.run with a tmp work dir and an ephemeral metrics port; returns the TrainerReport.
- `output_dir(job)`: the local folder of the run's results (runs/<run-id>/); `job_dir(job)` the job's folder.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_runner_cpt_sft.py -q
"""

from __future__ import annotations

import copy
import os

# Before torch is imported anywhere: the machine's 2 cores are shared by the whole team.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KUBETUNE_METRICS_FINAL_SCRAPE_TIMEOUT", "0")

import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# dataset name (tiny.generate_datasets) -> the format it is in
DATA_FORMATS = {
    "chat": "chat", "prompt_completion": "prompt_completion", "preference": "preference",
    "unpaired_preference": "unpaired_preference", "prompt_only": "prompt_only", "domain": "text", "general": "text",
}


def deep_merge(base: dict, overrides: dict) -> dict:
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from kubetune_trainer import tiny

    return tiny.cached_model()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    from kubetune_trainer import tiny

    return tiny.generate_datasets(tmp_path_factory.mktemp("tiny-data"), n=400)


@pytest.fixture
def make_job(tmp_path, tiny_model, tiny_data):
    from kubetune_api.finetunejob import parse_job

    def make(*, data: str = "chat", name: str = "test-job", namespace: str = "test", **spec_overrides):
        spec = {
            "stage": "sft",
            "model": {"source": f"file://{tiny_model}"},
            "dataset": {"format": DATA_FORMATS[data], "train": [{"uri": f"file://{tiny_data[data]}"}]},
            "adapter": {"type": "lora", "rank": 8},
            "training": {"maxSteps": 3, "batchSize": 4, "maxLength": 64, "learningRate": 1e-3,
                         "logEverySteps": 1, "evalEverySteps": 50, "checkpointEverySteps": 50},
            "resources": {"gpus": 0},
            "output": {"uri": f"file://{tmp_path}/out"},
        }
        deep_merge(spec, spec_overrides)
        return parse_job({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
                          "metadata": {"name": name, "namespace": namespace}, "spec": spec})

    return make


@pytest.fixture
def run_job(tmp_path):
    from kubetune_trainer import config, runner

    def run(job, *, callbacks=(), work: str = "work"):
        settings = config.RunSettings(work_dir=tmp_path / work, metrics_host="127.0.0.1", metrics_port=0)
        return runner.run(job, settings, extra_callbacks=list(callbacks), console_logs=False)

    return run


def job_dir(job) -> Path:
    """Local folder of a job's store (file:// outputs): runs.json and runs/<run-id>/."""
    return Path(job.spec.output.uri[len("file://"):]) / job.metadata.namespace / job.metadata.name


def output_dir(job, run_id: str | None = None) -> Path:
    """Local folder of one run's results (file:// outputs). Without run_id: the run `run_job(job)` makes (its id
    derives from metadata.uid, else from the spec digest; runs.identify)."""
    from kubetune_trainer import runs

    return job_dir(job) / runs.RUNS / (run_id or runs.identify(job).run_id)


@pytest.fixture(autouse=True)
def _restore_sigterm():
    """runner.run turns SIGTERM into a flag for the whole process; give pytest its handler back."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)
    checkpointing = sys.modules.get("kubetune_trainer.checkpointing")  # imported only if a run happened
    if checkpointing is not None:
        checkpointing.reset_sigterm()
