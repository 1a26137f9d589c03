"""artifacts.py: what a finished run leaves in the output store, and that manifest.json comes last.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_artifacts.py -q
"""

from __future__ import annotations

import hashlib
import json

import pytest

from kubetune_trainer import storage
from tests.trainer.conftest import job_dir, output_dir


@pytest.fixture
def finished(make_job, run_job, tiny_data, monkeypatch):
    """One SFT + LoRA run with a merged model and a forgetting check; every store write recorded in order."""
    writes: list[tuple[str, str]] = []
    for method in ("put_file", "put_dir", "publish_dir", "write_text", "mark_complete"):
        original = getattr(storage.OutputStore, method)

        def recorder(self, *args, _original=original, _method=method, **kwargs):
            rel = args[1] if _method in ("put_file", "put_dir", "publish_dir") else args[0]
            writes.append((self.root_uri, _method, rel))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(storage.OutputStore, method, recorder)
    job = make_job(training={"maxSteps": 4, "checkpointEverySteps": 2, "evalEverySteps": 2},
                   evaluation={"reference": [{"uri": f"file://{tiny_data['general']}"}], "referenceMaxSamples": 8,
                               "forgettingThreshold": 5.0},
                   output={"mergedModel": True})
    report = run_job(job)
    assert report.state == "succeeded", report.message
    return job, report, writes


def test_layout_and_reported_uris(finished):
    job, report, _ = finished
    out = output_dir(job)
    for name in ("README.md", "manifest.json", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in ("adapter", "merged"):
        assert (out / folder / "_COMPLETE").exists()
        assert (out / folder / "tokenizer.json").exists()
    assert (out / "merged" / "model.safetensors").exists()
    assert not list(out.glob("*.tmp-*"))  # no staging leftovers
    a = report.artifacts
    assert a.output_uri == f"file://{out}/" and a.run_id == out.name
    assert a.index_uri == f"file://{job_dir(job)}/runs.json"
    assert (a.adapter_uri, a.merged_model_uri, a.manifest_uri) == (
        f"file://{out}/adapter", f"file://{out}/merged", f"file://{out}/manifest.json")
    assert a.latest_checkpoint == f"file://{out}/checkpoints/checkpoint-4"


def test_manifest_then_index_are_written_last(finished):
    """The run's manifest.json comes after every file of the result; the job's runs.json after that."""
    job, _, writes = finished
    run_root, job_root = f"file://{output_dir(job)}/", f"file://{job_dir(job)}/"
    assert writes[-1] == (job_root, "write_text", "runs.json")
    assert all(root == run_root for root, _, _ in writes[:-1])  # nothing else outside the run's own prefix
    names = [rel for _, _, rel in writes[:-1]]
    result = names[names.index("adapter"):]  # after the checkpoints and run.json
    assert result[-1] == "manifest.json" and names.count("manifest.json") == 1
    assert result.index("adapter") < result.index("merged") < result.index("README.md") < len(result) - 1
    index = json.loads((job_dir(job) / "runs.json").read_text())
    assert index["latest"] == output_dir(job).name and [r["runId"] for r in index["runs"]] == [index["latest"]]


def test_manifest_fields(finished, tiny_data, tiny_model):
    job, report, _ = finished
    m = json.loads((output_dir(job) / "manifest.json").read_text())
    assert m["config"]["spec"]["stage"] == "sft" and m["config"]["metadata"]["name"] == job.metadata.name
    assert "status" not in m["config"]
    assert m["stage"] == "sft" and m["adapterType"] == "lora"
    train = m["datasets"]["train"][0]
    assert train["sha256"] == hashlib.sha256(tiny_data["chat"].read_bytes()).hexdigest()
    assert m["datasets"]["reference"][0]["sha256"] == hashlib.sha256(tiny_data["general"].read_bytes()).hexdigest()
    assert m["datasets"]["trainExamples"] + m["datasets"]["evalExamples"] == 400
    weights = next(f for f in m["baseModel"]["files"] if f["path"] == "model.safetensors")
    assert weights["sha256"] == hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    assert len(m["baseModel"]["sha256"]) == 64
    for lib in ("torch", "transformers", "peft", "trl", "datasets", "python"):
        assert m["libraries"][lib]
    metrics = m["metrics"]
    assert metrics["steps"] == 4 and metrics["eval_loss"] > 0 and metrics["perplexity"] > 1
    assert m["forgetting"]["referencePerplexityBefore"] > 1 and m["forgetting"]["exceeded"] is False
    assert m["forgetting"] == report.forgetting.to_k8s()
    assert m["wallSeconds"] > 0 and m["deviceSeconds"] == pytest.approx(m["wallSeconds"] * m["devices"])
    gpus = job.spec.resources.gpus * job.spec.resources.nodes  # GPUs the job holds, CPU or not
    assert m["gpuSeconds"] == pytest.approx(gpus * m["wallSeconds"], abs=0.01 * max(gpus, 1))
    assert m["earlyStopped"] is False and m["forgettingAction"] is None
    assert m["parameters"]["trainable"] < m["parameters"]["total"]
    assert m["artifacts"]["adapterUri"] == report.artifacts.adapter_uri
    assert m["artifacts"]["latestCheckpoint"].endswith("checkpoints/checkpoint-4")


def test_metrics_jsonl_and_model_card(finished):
    job, _, _ = finished
    out = output_dir(job)
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "train" in events and "eval" in events and "reference" in events
    card = (out / "README.md").read_text()
    for needle in (job.spec.model.source, "stage **sft**", "adapter **lora**", "eval perplexity",
                   "forgetting", "PeftModel.from_pretrained", f"{out}/adapter", f"{out}/merged", "chat.jsonl"):
        assert needle in card, needle


def test_early_stop_is_recorded(make_job, run_job):
    """patience 1 with an impossible minDelta: the second evaluation stops the run; the manifest says so."""
    job = make_job(training={"maxSteps": 20, "evalEverySteps": 2},
                   evaluation={"earlyStopping": {"patience": 1, "minDelta": 100.0}})
    report = run_job(job)
    assert report.state == "succeeded"
    m = json.loads((output_dir(job) / "manifest.json").read_text())
    assert m["earlyStopped"] is True and m["metrics"]["steps"] < 20


def test_saved_tokenizers_carry_no_training_truncation(finished, tiny_model):
    """A server reading tokenizer.json directly (the `tokenizers` library) must encode a long prompt whole, as
    the base's own tokenizer does, although the run truncated to maxLength 64 while training and measuring."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    job, _, _ = finished
    out = output_dir(job)
    prompt = " ".join(f"What is {i % 10} plus {i % 7}? The cat saw the red ball in the park." for i in range(40))
    n = len(AutoTokenizer.from_pretrained(tiny_model)(prompt, add_special_tokens=False)["input_ids"])
    assert n > 500 > job.spec.training.max_length
    for folder in ("adapter", "merged"):
        data = json.loads((out / folder / "tokenizer.json").read_text())
        assert data["truncation"] is None and data["padding"] is None, folder
        assert len(Tokenizer.from_file(str(out / folder / "tokenizer.json")).encode(prompt).ids) == n, folder


def test_adapter_and_merged_readmes_are_the_model_card(finished):
    job, report, _ = finished
    out = output_dir(job)
    for folder in ("adapter", "merged"):
        card = (out / folder / "README.md").read_text()
        assert "[More Information Needed]" not in card  # PEFT's blank template
        assert card == (out / "README.md").read_text()
        assert card.startswith("---\n") and "library_name: peft" in card
        for needle in (job.spec.model.source, "chat.jsonl", "stage **sft**", "adapter **lora** (rank 8",
                       "eval perplexity (token-weighted)", "PeftModel.from_pretrained",
                       f"{report.artifacts.adapter_uri[len('file://'):]}"):
            assert needle in card, (folder, needle)
