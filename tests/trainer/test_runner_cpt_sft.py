"""runner.run end to end on CPU with the tiny model: every adapter type trains and leaves artifacts that reload to
the same model; CPT and SFT really learn; the forgetting check warns or fails (exit 80) as configured; errors end
as reports with the right exit code and field; a second run resumes; SIGTERM saves and exits 143.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_runner_cpt_sft.py -q
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest

from tests.trainer.conftest import job_dir, output_dir

IDS = [[1, 20, 31, 45, 52, 67, 80, 99]]


class Capture:
    """A TrainerCallback keeping the in-memory trained model (for comparing with what was saved)."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kwargs):
                outer.model = model

        self.model = None
        self.cb = _CB()


def logits(model):
    import torch

    model.eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float()


def manifest(job) -> dict:
    return json.loads((output_dir(job) / "manifest.json").read_text())


ADAPTERS = {
    "lora": {"type": "lora", "rank": 8},
    "qlora": {"type": "qlora", "rank": 8, "targetModules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
    "dora": {"type": "dora", "rank": 8},
    "lora-pissa": {"type": "lora", "rank": 8, "init": "pissa"},
    "galore": {"type": "galore", "rank": None, "galore": {"rank": 8, "updateProjGap": 2}},
    "full": {"type": "full", "rank": None},
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_trains_and_reloads_to_the_same_model(name, make_job, run_job, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune_trainer import modeling

    job = make_job(adapter=ADAPTERS[name], training={"maxSteps": 3, "learningRate": 5e-3},
                   output={"mergedModel": name in ("lora", "qlora")})
    cap = Capture()
    report = run_job(job, callbacks=[cap.cb])
    assert report.state == "succeeded", report.message
    assert report.exit_code == 0 and report.progress.step == 3
    out = output_dir(job)
    adapter = out / "adapter"
    assert report.artifacts.adapter_uri == f"file://{adapter}"
    assert (adapter / "_COMPLETE").exists() and (adapter / "tokenizer_config.json").exists()
    assert not (adapter / "training_args.bin").exists()
    trained = logits(cap.model)
    if name in ("full", "galore"):
        reloaded = AutoModelForCausalLM.from_pretrained(adapter)
        assert torch.allclose(logits(reloaded), trained, atol=1e-5)
        assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tiny_model)), trained, atol=1e-4)
        return
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    if name == "qlora":
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file

        # The saved tensors are exactly the trained ones...
        saved = load_file(adapter / "adapter_model.safetensors")
        in_memory = get_peft_model_state_dict(cap.model)
        assert saved.keys() == in_memory.keys() and saved
        assert all(torch.equal(saved[k].float(), in_memory[k].float()) for k in saved)
        # ...and on the same 4-bit base they give the trained model's outputs (TRL trains QLoRA adapters in
        # bf16; the reloaded adapter computes in fp32, hence the tolerance).
        base = modeling.load_model(tiny_model, job.spec)
        assert torch.allclose(logits(PeftModel.from_pretrained(base, adapter)), trained, atol=5e-2)
    else:
        # on the ORIGINAL base (pissa moved weights into the adapter in memory; the saved one is converted)
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        assert torch.allclose(logits(PeftModel.from_pretrained(base, adapter)), trained, atol=1e-4)
    if job.spec.output.merged_model:
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")
        full_precision = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
        assert torch.allclose(logits(merged), logits(full_precision), atol=1e-4)
        assert report.artifacts.merged_model_uri == f"file://{out / 'merged'}"


def test_cpt_lowers_heldout_perplexity_and_warns_on_forgetting(make_job, run_job, tiny_data):
    """CPT on operations logs: held-out perplexity of that domain falls by far more than 30 %; the general
    text the base was trained on gets worse, which onForgetting: warn records without failing the job."""
    job = make_job(stage="cpt", data="domain", adapter={"type": "lora", "rank": 8},
                   training={"maxSteps": 30, "learningRate": 5e-3, "evalEverySteps": 15, "logEverySteps": 5},
                   evaluation={"reference": [{"uri": f"file://{tiny_data['general']}"}], "referenceMaxSamples": 32,
                               "forgettingThreshold": 0.05, "onForgetting": "warn"})
    report = run_job(job)
    assert report.state == "succeeded" and report.exit_code == 0, report.message
    m = manifest(job)["metrics"]
    before, after = math.exp(m["first_eval_loss"]), m["perplexity"]
    print(f"CPT held-out perplexity {before:.1f} -> {after:.1f}")
    assert after <= 0.7 * before
    f = report.forgetting
    assert f.reference_perplexity_before > 1 and f.reference_perplexity_after > f.reference_perplexity_before
    assert f.exceeded is True and f.threshold == 0.05
    assert manifest(job)["forgettingAction"] == "warn"


def test_sft_lowers_eval_loss_and_stays_within_the_forgetting_threshold(make_job, run_job, tiny_data):
    job = make_job(data="chat", adapter={"type": "lora", "rank": 8,
                                         "targetModules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
                   training={"maxSteps": 40, "batchSize": 8, "learningRate": 2e-3, "evalEverySteps": 20},
                   evaluation={"reference": [{"uri": f"file://{tiny_data['general']}"}], "referenceMaxSamples": 32,
                               "forgettingThreshold": 0.5})
    report = run_job(job)
    assert report.state == "succeeded", report.message
    m = manifest(job)["metrics"]
    print(f"SFT eval loss {m['first_eval_loss']:.3f} -> {m['eval_loss']:.3f}")
    assert m["eval_loss"] <= 0.6 * m["first_eval_loss"]
    assert report.progress.eval_loss == pytest.approx(m["eval_loss"])
    assert report.forgetting.exceeded is False and report.forgetting.relative_change is not None


def test_forgetting_with_action_fail_exits_80_after_writing_artifacts(make_job, run_job, tiny_data):
    job = make_job(stage="cpt", data="domain", training={"maxSteps": 8, "learningRate": 1e-2},
                   evaluation={"reference": [{"uri": f"file://{tiny_data['general']}"}], "referenceMaxSamples": 16,
                               "forgettingThreshold": 0.01, "onForgetting": "fail"})
    report = run_job(job)
    assert report.state == "failed" and report.exit_code == 80
    assert report.reason == "ForgettingThresholdExceeded" and report.field == "spec.evaluation.forgettingThreshold"
    assert report.forgetting.exceeded is True
    assert report.artifacts is not None and report.artifacts.adapter_uri
    m = manifest(job)
    assert m["forgettingAction"] == "fail" and m["forgetting"]["exceeded"] is True
    assert (output_dir(job) / "adapter" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ errors
def test_model_not_found_fails_with_78_naming_the_source(make_job, run_job, tmp_path):
    report = run_job(make_job(model={"source": f"file://{tmp_path}/no-model"}))
    assert report.state == "failed" and report.exit_code == 78 and report.reason == "InvalidConfig"
    assert report.field == "spec.model.source" and "no-model" in report.message


def test_missing_column_fails_with_65_naming_the_file(make_job, run_job, tiny_data):
    job = make_job(data="chat", dataset={"format": "prompt_completion"})
    report = run_job(job)
    assert report.exit_code == 65 and report.reason == "InvalidDataset"
    assert report.field == f"file://{tiny_data['chat']}" and "'prompt'" in report.message


def test_unknown_target_module_fails_before_training(make_job, run_job):
    report = run_job(make_job(adapter={"targetModules": ["c_attn"]}))
    assert report.exit_code == 78 and report.field == "spec.adapter.targetModules"
    assert "q_proj" in report.message and (report.progress.step or 0) == 0


def test_stage_format_mismatch_is_caught_before_anything_loads(make_job, run_job):
    report = run_job(make_job(stage="dpo"))
    assert report.exit_code == 78 and report.field == "spec.dataset.format"


def test_termination_message_carries_the_failure(make_job, run_job, tmp_path, monkeypatch):
    from kubetune_api.report import TrainerReport

    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    run_job(make_job(model={"source": f"file://{tmp_path}/missing"}))
    parsed = TrainerReport.parse(log.read_text())
    assert parsed.exit_code == 78 and parsed.field == "spec.model.source"


# ------------------------------------------------------------------------------------------------ resume
def _preempt_at(step: int):
    from transformers import TrainerCallback

    class Preempt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)  # what kubelet sends on preemption / suspend

    return Preempt()


def test_a_restarted_pod_resumes_its_own_run(make_job, run_job):
    from kubetune_trainer import checkpointing

    job = make_job(training={"maxSteps": 6, "checkpointEverySteps": 2})
    job.metadata.uid = "uid-1"
    first = run_job(job, callbacks=[_preempt_at(3)])
    assert first.state == "preempted"
    checkpointing.reset_sigterm()
    step = first.progress.step
    assert (output_dir(job) / "checkpoints" / f"checkpoint-{step}" / "_COMPLETE").exists()
    # A restarted pod of the same FineTuneJob: fresh work dir, same uid, same run prefix.
    report = run_job(job, work="work-2")
    assert report.state == "succeeded" and report.progress.step == 6
    m = manifest(job)
    assert m["resumedFrom"].endswith(f"runs/uid-1/checkpoints/checkpoint-{step}") and m["metrics"]["steps"] == 6
    assert report.artifacts.latest_checkpoint.endswith("runs/uid-1/checkpoints/checkpoint-6")


def test_a_recreated_job_starts_fresh_beside_the_old_run(make_job, run_job):
    """Delete + re-apply with another learning rate (a new uid): step 0, a new result next to the old one; the
    old run's checkpoints and result untouched; the index names the new run."""
    old = make_job(training={"maxSteps": 4, "checkpointEverySteps": 2})
    old.metadata.uid = "uid-old"
    assert run_job(old).state == "succeeded"
    before = {p.relative_to(output_dir(old)): p.read_bytes() for p in output_dir(old).rglob("*") if p.is_file()}
    new = make_job(training={"maxSteps": 4, "checkpointEverySteps": 2, "learningRate": 5e-3})
    new.metadata.uid = "uid-new"
    report = run_job(new, work="work-2")
    assert report.state == "succeeded"
    m = manifest(new)
    assert m["resumedFrom"] is None and m["run"]["id"] == "uid-new"
    assert m["config"]["spec"]["training"]["learningRate"] == 5e-3
    after = {p.relative_to(output_dir(old)): p.read_bytes() for p in output_dir(old).rglob("*") if p.is_file()}
    assert after == before  # nothing of the old run was read-modified, pruned or deleted
    index = json.loads((job_dir(new) / "runs.json").read_text())
    assert [r["runId"] for r in index["runs"]] == ["uid-old", "uid-new"] and index["latest"] == "uid-new"
    assert report.artifacts.adapter_uri == f"file://{output_dir(new)}/adapter"


def test_sigterm_saves_a_checkpoint_and_exits_143(make_job, run_job):
    from transformers import TrainerCallback

    class Preempt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # what kubelet sends on preemption / suspend

    job = make_job(training={"maxSteps": 50, "checkpointEverySteps": 100})
    report = run_job(job, callbacks=[Preempt()])
    assert report.state == "preempted" and report.exit_code == 143 and report.reason == "Preempted"
    # the flag is checked at each step end: the run stops at step 2 or 3 (callback order), never runs on
    step = report.progress.step
    assert step in (2, 3)
    assert (output_dir(job) / "checkpoints" / f"checkpoint-{step}" / "_COMPLETE").exists()
    assert report.artifacts.latest_checkpoint.endswith(f"checkpoint-{step}")
    assert not (output_dir(job) / "manifest.json").exists()  # no result for an unfinished run


def test_resume_from_continues_another_run_only_when_compatible(make_job, run_job):
    """spec.resumeFrom: the explicit way to continue an old run's weights, optimizer and step; another adapter
    configuration is refused with the field named, before any training."""
    old = make_job(training={"maxSteps": 4, "checkpointEverySteps": 2})
    old.metadata.uid = "uid-old"
    assert run_job(old).state == "succeeded"
    refused = make_job(training={"maxSteps": 6, "checkpointEverySteps": 2}, adapter={"rank": 4},
                       resumeFrom="uid-old")
    refused.metadata.uid = "uid-refused"
    report = run_job(refused, work="work-refused")
    assert report.state == "failed" and report.exit_code == 78 and report.field == "spec.resumeFrom"
    assert "adapter settings differ (rank)" in report.message
    new = make_job(training={"maxSteps": 6, "checkpointEverySteps": 2}, resumeFrom="uid-old")
    new.metadata.uid = "uid-new"
    report = run_job(new, work="work-2")
    assert report.state == "succeeded" and report.progress.step == 6
    m = manifest(new)
    assert m["resumedFrom"] == f"file://{output_dir(old)}/checkpoints/checkpoint-4" and m["run"]["id"] == "uid-new"
    assert (output_dir(new) / "checkpoints" / "checkpoint-6" / "_COMPLETE").exists()
    assert not (output_dir(old) / "checkpoints" / "checkpoint-6").exists()  # the old run is only read
