"""`kubetune run pipeline.yaml`: the local FineTunePipeline runner on the real trainer (tiny model, a few steps).
A gate that fails stops the pipeline naming metric, value and threshold (the next stage never runs); fixing the
threshold and re-running `--from` the next stage reuses the earlier stage's run (no new run of it) and trains
the next stage on its merged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune_trainer.cli import main

PIPELINE = """
apiVersion: kubetune.dev/v1alpha1
kind: FineTunePipeline
metadata: {name: two-stage}
spec:
  model: {source: "file://${KUBETUNE_TINY_MODEL}"}
  stages:
    - name: sft
      job:
        stage: sft
        dataset: {format: chat, train: [{uri: "file://${KUBETUNE_TINY_DATA}/chat.jsonl"}], evalFraction: 0.1}
        adapter: {type: lora, rank: 4}
        training: {maxSteps: 6, batchSize: 8, learningRate: 0.002, maxLength: 48, evalEverySteps: 6,
                   checkpointEverySteps: 6}
        resources: {gpus: 0}
        output: {uri: "file:///unused"}
      gate: {maxEvalLoss: 0.001}
    - name: dpo
      job:
        stage: dpo
        dataset: {format: preference, train: [{uri: "file://${KUBETUNE_TINY_DATA}/preference.jsonl"}],
                  evalFraction: 0.1}
        adapter: {type: lora, rank: 4}
        training: {maxSteps: 3, batchSize: 4, learningRate: 0.001, maxLength: 48, evalEverySteps: 3,
                   checkpointEverySteps: 3}
        resources: {gpus: 0}
        output: {uri: "file:///unused"}
      gate: {minRewardAccuracy: 0.0}
"""


def _runs(out: Path, job: str) -> list[str]:
    d = out / "default" / job / "runs"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.mark.slow
def test_failed_gate_stops_and_retry_from_next_stage_reuses_the_earlier_run(tmp_path, capsys):
    manifest, out = tmp_path / "pipeline.yaml", tmp_path / "out"
    manifest.write_text(PIPELINE)
    code = main(["run", str(manifest), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 3, err[-2000:]
    assert "stage sft gate failed: evalLoss" in err and "> 0.001 (gate.maxEvalLoss)" in err
    assert "--from dpo" in err  # the fix is named
    sft_runs = _runs(out, "two-stage-sft")
    assert len(sft_runs) == 1 and _runs(out, "two-stage-dpo") == []  # dpo never started
    state = json.loads((out / "default" / "two-stage" / "pipeline.json").read_text())
    assert [s["gate"]["state"] for s in state["stages"]] == ["Failed"]
    (check,) = state["stages"][0]["gate"]["checks"]
    assert check["metric"] == "evalLoss" and check["threshold"] == 0.001 and check["value"] > 0.001

    doc = yaml.safe_load(PIPELINE)
    doc["spec"]["stages"][0]["gate"]["maxEvalLoss"] = 100.0  # the fix
    manifest.write_text(yaml.safe_dump(doc))
    code = main(["run", str(manifest), "--output", str(out), "--from", "dpo"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert _runs(out, "two-stage-sft") == sft_runs, "sft must not run again"
    (dpo_run,) = _runs(out, "two-stage-dpo")
    state = json.loads((out / "default" / "two-stage" / "pipeline.json").read_text())
    sft, dpo = state["stages"]
    assert sft["state"] == "skipped" and sft["runId"] == sft_runs[0]
    assert sft["gate"]["state"] == "Passed" and dpo["gate"]["state"] == "Passed"
    # dpo trained on sft's merged model, and its adapter loads on top of exactly that
    assert dpo["modelSource"] == sft["artifacts"]["mergedModelUri"]
    assert Path(dpo["modelSource"][len("file://"):], "config.json").is_file()
    assert dpo["runId"] == dpo_run
    assert "pipeline succeeded" in captured.out


CONTINUE = """
apiVersion: kubetune.dev/v1alpha1
kind: FineTunePipeline
metadata: {name: cont}
spec:
  model: {source: "file://${KUBETUNE_TINY_MODEL}"}
  stages:
    - name: cpt
      job:
        stage: cpt
        dataset: {format: text, train: [{uri: "file://${KUBETUNE_TINY_DATA}/domain.jsonl"}], evalFraction: 0}
        adapter: {type: lora, rank: 4}
        training: {maxSteps: 2, batchSize: 4, learningRate: 0.01, maxLength: 48, checkpointEverySteps: 2}
        resources: {gpus: 0}
        output: {uri: "file:///unused"}
    - name: sft
      handover: continue
      job:
        stage: sft
        dataset: {format: chat, train: [{uri: "file://${KUBETUNE_TINY_DATA}/chat.jsonl"}], evalFraction: 0}
        adapter: {type: lora}
        training: {maxSteps: 2, batchSize: 4, learningRate: 0.01, maxLength: 48, checkpointEverySteps: 2}
        resources: {gpus: 0}
        output: {uri: "file:///unused"}
"""


def test_continue_trains_the_first_stages_adapter_on_the_same_base(tmp_path, capsys):
    """cpt -> sft with handover continue: sft's run trains the pipeline's own base starting from cpt's adapter
    (no merged model is written or used), and the final adapter loads with PEFT on that base."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    manifest, out = tmp_path / "pipeline.yaml", tmp_path / "out"
    manifest.write_text(CONTINUE)
    code = main(["run", str(manifest), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    state = json.loads((out / "default" / "cont" / "pipeline.json").read_text())
    cpt, sft = state["stages"]
    from kubetune_trainer import tiny

    base = f"file://{tiny.cached_model()}"
    assert cpt["modelSource"] == sft["modelSource"] == base
    assert sft["modelAdapter"] == cpt["artifacts"]["adapterUri"] and "mergedModelUri" not in cpt["artifacts"]
    sft_run = Path(sft["artifacts"]["adapterUri"][len("file://"):]).parent
    assert json.loads((sft_run / "manifest.json").read_text())["startAdapter"] == cpt["artifacts"]["adapterUri"]
    first = load_file(str(Path(cpt["artifacts"]["adapterUri"][len("file://"):], "adapter_model.safetensors")))
    final = load_file(str(sft_run / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == first.keys() and any(not torch.equal(final[k], first[k]) for k in final)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base[len("file://"):]),
                                      str(sft_run / "adapter"))
    assert model.peft_config["default"].r == 4  # cpt's adapter, continued (sft's spec left the rank out)
    assert "from adapter" in captured.err and "pipeline succeeded" in captured.out
