"""Every stage x every adapter, through the real runner: a few steps each on the tiny model, and the run must
leave complete, reloadable artifacts (adapter in PEFT format, or the full model for full/galore; manifest.json
last). Learning itself is asserted per stage elsewhere (test_runner_cpt_sft.py, test_stages_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer.conftest import DATA_FORMATS

STAGES = {
    "cpt": ("domain", {}),
    "sft": ("chat", {}),
    "dpo": ("preference", {}),
    "orpo": ("preference", {}),
    "kto": ("unpaired_preference", {}),
    "reward": ("preference", {}),
    "grpo": ("prompt_only", {"grpo": {"numGenerations": 2, "maxCompletionLength": 4,
                                      "rewards": [{"name": "regex_match", "params": {"pattern": "[0-9]"}}]}}),
    "rloo": ("prompt_only", {"rloo": {"numGenerations": 2, "maxCompletionLength": 4,
                                      "rewards": [{"name": "regex_match", "params": {"pattern": "[0-9]"}}]}}),
    "ppo": ("prompt_only", {"ppo": {"maxCompletionLength": 4, "ppoEpochs": 1}}),
}
ADAPTERS = {
    "lora": {"type": "lora", "rank": 4},
    "qlora": {"type": "qlora", "rank": 4},
    "dora": {"type": "dora", "rank": 4},
    "galore": {"type": "galore", "galore": {"rank": 8, "updateProjGap": 2}},
    "full": {"type": "full"},
}


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory):
    from kubetune_trainer import tiny

    return tiny.build_reward_model(tmp_path_factory.mktemp("rm") / "reward-model", tiny_model)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_with_adapter_trains_and_leaves_reloadable_artifacts(stage, adapter, tiny_model, tiny_data,
                                                                   reward_model, run_job, tmp_path):
    from kubetune_api.finetunejob import parse_job

    data, block = STAGES[stage]
    block = json.loads(json.dumps(block))
    if stage == "ppo":
        block["ppo"]["rewardModel"] = f"file://{reward_model}"
    job = parse_job({
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": f"{stage}-{adapter}", "namespace": "matrix"},
        "spec": {
            "stage": stage, "model": {"source": f"file://{tiny_model}"},
            "dataset": {"format": DATA_FORMATS[data], "train": [{"uri": f"file://{tiny_data[data]}"}],
                        "evalFraction": 0.0, "maxSamples": 16},
            "adapter": ADAPTERS[adapter],
            "training": {"maxSteps": 2, "batchSize": 2, "maxLength": 48, "learningRate": 1e-3, "logEverySteps": 1,
                         "checkpointEverySteps": 50, **block},
            "resources": {"gpus": 0},
            "output": {"uri": f"file://{tmp_path}/out"},
        },
    })
    report = run_job(job)
    assert report.state == "succeeded", f"{report.reason}: {report.message}"
    assert report.progress.step == 2
    out = Path(report.artifacts.adapter_uri.removeprefix("file://"))
    if adapter in ("full", "galore"):
        assert (out / "config.json").exists()
        assert any(out.glob("*.safetensors"))
    else:
        assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
        if stage != "reward":
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out))
    manifest = json.loads(Path(report.artifacts.manifest_uri.removeprefix("file://")).read_text())
    assert manifest
    assert (out / "_COMPLETE").exists() or (out.parent / "manifest.json").exists()
