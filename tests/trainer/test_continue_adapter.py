"""spec.model.adapter (a pipeline's handover continue) on the real runner: stage 2 starts from stage 1's saved
adapter (not a fresh one), trains it further, publishes an adapter that loads with PEFT on the same base; a
restarted pod resumes from the run's own checkpoint, not from spec.model.adapter; an adapter that does not fit
fails before training with the config exit code and a message naming the field.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_continue_adapter.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_api.constants import ExitCode
from kubetune_trainer import checkpointing
from tests.trainer.conftest import output_dir


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _local(uri: str) -> Path:
    assert uri.startswith("file://"), uri
    return Path(uri[len("file://"):])


class Snapshot:
    """A TrainerCallback recording the adapter weights (in saved-file form) when training begins (after a resume
    loaded its checkpoint) and after chosen steps; optionally preempts (SIGTERM) after one step."""

    def __new__(cls, *, at_steps=(), preempt_at=None):
        from peft import get_peft_model_state_dict
        from transformers import TrainerCallback

        class _Snapshot(TrainerCallback):
            def __init__(self):
                self.begin, self.steps = None, {}

            def _take(self, model):
                return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

            def on_train_begin(self, args, state, control, model=None, **kw):
                self.begin = self._take(model)

            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step in at_steps:
                    self.steps[state.global_step] = self._take(model)
                if state.global_step == preempt_at:
                    checkpointing._on_sigterm(15, None)

        return _Snapshot()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_model, tiny_data):
    """A finished lora stage (sft, 3 steps): its adapter is what stage 2 continues."""
    from kubetune_api.finetunejob import parse_job
    from kubetune_trainer import config, runner

    out = tmp_path_factory.mktemp("stage1")
    job = parse_job({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
                     "metadata": {"name": "stage1", "namespace": "test"}, "spec": {
                         "stage": "sft", "model": {"source": f"file://{tiny_model}"},
                         "dataset": {"format": "chat", "train": [{"uri": f"file://{tiny_data['chat']}"}]},
                         "adapter": {"type": "lora", "rank": 4},
                         "training": {"maxSteps": 3, "batchSize": 4, "maxLength": 64, "learningRate": 1e-2,
                                      "logEverySteps": 1, "evalEverySteps": 50, "checkpointEverySteps": 50},
                         "resources": {"gpus": 0}, "output": {"uri": f"file://{out}/out"}}})
    settings = config.RunSettings(work_dir=out / "work", metrics_host="127.0.0.1", metrics_port=0)
    report = runner.run(job, settings, console_logs=False)
    assert report.state == "succeeded", report.message
    return report.artifacts.adapter_uri


def _stage2(make_job, adapter_uri: str, **overrides):
    spec = {"model": {"adapter": adapter_uri}, "adapter": {"type": "lora", "rank": None},
            "training": {"maxSteps": 4, "learningRate": 1e-2}}
    for k, v in overrides.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    return make_job(name="stage2", **spec)


def test_stage2_starts_from_stage1s_adapter_trains_it_and_publishes_a_loadable_adapter(
        make_job, run_job, stage1, tiny_model):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    start = _weights(_local(stage1))
    snap = Snapshot()
    report = run_job(_stage2(make_job, stage1), callbacks=[snap])
    assert report.state == "succeeded", report.message
    assert _same(snap.begin, start), "stage 2 must start from stage 1's adapter, not a fresh initialisation"
    published = _local(report.artifacts.adapter_uri)
    trained = _weights(published)
    assert trained.keys() == start.keys()  # the same adapter (rank, modules), trained further
    assert not _same(trained, start), "training must change the continued adapter"
    assert all(not torch.equal(trained[k], start[k]) for k in trained if "lora_B" in k)

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        plain = base(ids).logits
    model = PeftModel.from_pretrained(base, str(published))
    assert _same({k: v for k, v in get_peft_model_state_dict(model).items()}, trained)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain)  # the adapter changes the base's outputs
    manifest = json.loads((published.parent / "manifest.json").read_text())
    assert manifest["startAdapter"] == stage1
    assert f"| started from adapter | `{stage1}`" in (published.parent / "README.md").read_text()


def test_restarted_pod_resumes_its_own_checkpoint_not_the_start_adapter(make_job, run_job, stage1):
    job = _stage2(make_job, stage1, training={"checkpointEverySteps": 2})
    first = Snapshot(at_steps=(1, 2, 3), preempt_at=2)  # the SIGTERM checkpoint lands at the end of a step
    report = run_job(job, callbacks=[first], work="pod1")
    assert report.state == "preempted", report.message
    checkpointing.reset_sigterm()
    second = Snapshot()
    report = run_job(job, callbacks=[second], work="pod2")  # a new pod: fresh work dir, same run
    assert report.state == "succeeded", report.message
    manifest = json.loads((output_dir(job) / "manifest.json").read_text())
    resumed = checkpointing.checkpoint_step(manifest["resumedFrom"])
    assert resumed in (2, 3), manifest["resumedFrom"]
    assert _same(second.begin, first.steps[resumed]), "the restarted pod must continue from its own checkpoint"
    assert not _same(second.begin, _weights(_local(stage1)))
    assert manifest["config"]["spec"]["model"]["adapter"] == stage1


@pytest.mark.parametrize("case,needle,field", [
    ("dora-for-lora", "is a plain LoRA adapter (use_dora: false) but spec.adapter.type is dora: set "
                      "spec.adapter.type: lora (or qlora) to continue it", "spec.model.adapter"),
    ("missing", "no such file or folder", "spec.model.adapter"),
    ("not-an-adapter", "no PEFT adapter at", "spec.model.adapter"),
    ("other-rank", "rank 8 differs from the adapter spec.model.adapter starts from (rank 4)", "spec.adapter.rank"),
], ids=["dora-for-lora", "missing", "not-an-adapter", "other-rank"])
def test_an_adapter_that_does_not_fit_fails_before_training_naming_the_field(
        make_job, run_job, stage1, tiny_model, case, needle, field):
    overrides = {
        "dora-for-lora": ({"type": "dora"}, stage1),
        "missing": ({}, stage1.replace("/adapter", "/no-such-adapter")),
        "not-an-adapter": ({}, f"file://{tiny_model}"),  # a model folder, not an adapter
        "other-rank": ({"rank": 8}, stage1),
    }
    adapter, uri = overrides[case]
    report = run_job(_stage2(make_job, uri, adapter=adapter))
    assert report.state == "failed"
    assert report.exit_code == ExitCode.CONFIG_ERROR and report.reason == "InvalidConfig"
    assert report.field == field and needle in report.message, report.message
    assert report.progress is None or not report.progress.step  # nothing trained


@pytest.mark.parametrize("kind", ["qlora", "dora"])
def test_qlora_and_dora_continue_as_their_own_type(make_job, run_job, kind):
    """qlora -> qlora: the base is quantized as usual (4-bit) and the saved adapter loaded onto it, trainable;
    dora -> dora: the magnitude vectors come back and keep training with the low-rank matrices."""
    import bitsandbytes as bnb
    from transformers import TrainerCallback

    first = run_job(make_job(name="s1", adapter={"type": kind, "rank": 4}, training={"maxSteps": 2}), work="s1")
    assert first.state == "succeeded", first.message
    start = _weights(_local(first.artifacts.adapter_uri))
    seen = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            from peft import get_peft_model_state_dict

            q = model.base_model.model.model.layers[0].self_attn.q_proj
            seen["4bit"] = isinstance(q.base_layer, bnb.nn.Linear4bit)
            seen["weights"] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            seen["trainable"] = sorted({n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad})

    second = run_job(make_job(name="s2", model={"adapter": first.artifacts.adapter_uri},
                              adapter={"type": kind, "rank": None}, training={"maxSteps": 2}),
                     callbacks=[Look()], work="s2")
    assert second.state == "succeeded", second.message
    assert seen["4bit"] is (kind == "qlora") and _same(seen["weights"], start)
    # only the adapter trains; the (4-bit) base stays frozen
    assert seen["trainable"] == (["lora_A", "lora_B"] if kind == "qlora" else
                                 ["lora_A", "lora_B", "lora_magnitude_vector"]), seen["trainable"]
    assert not _same(_weights(_local(second.artifacts.adapter_uri)), start)
