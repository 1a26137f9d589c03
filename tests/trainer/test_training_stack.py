"""The training-stack demonstration's parts (bench/training_stack.py runs them; it is not run here):

- bench/stack_data.py: the synthetic domain is deterministic in its seed, and held-out rows come only from
  held-out problems (no training file contains them);
- bench/stack_eval.py: each held-out metric computes what it claims, checked on the tiny model against an
  independent computation or an identity the metric must satisfy;
- examples/stack/pipeline.yaml: a valid FineTunePipeline cpt -> sft -> dpo -> grpo (weights, merge, merge) with
  the documented gates, whose grpo stage rewards the same answer format the data's DPO pairs prefer;
- bench/training_stack.py reads each stage's model and gate verdict from the local pipeline runner's state file,
  and reports a gate that stopped the pipeline.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_training_stack.py -q
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import stack_data  # noqa: E402
import stack_eval  # noqa: E402

SIZES = {"train_rows": {"cpt": 200, "sft": 200, "dpo": 100, "grpo": 100},
         "held_out_rows": {"cpt": 40, "sft": 40, "dpo": 40, "grpo": 40, "reference": 20}}
QUESTION = re.compile(r"^(\w+) has (\d) (\w+) and gets (\d) more \. how many \3 does \1 have \?$")
NARRATIVE = re.compile(r"(\w+) has (\d) (\w+) and \w+ (\d) more , so \1 has (\d+) \3 \.")


def _problems(rows: list[dict]) -> set[tuple]:
    out = set()
    for r in rows:
        if "prompt" in r:
            m = QUESTION.match(r["prompt"])
            assert m, r["prompt"]
            out.add((m[1], m[3], int(m[2]), int(m[4])))
        else:
            for m in NARRATIVE.finditer(r["text"]):
                assert int(m[5]) == int(m[2]) + int(m[4]), r["text"]
                out.add((m[1], m[3], int(m[2]), int(m[4])))
    return out


def test_data_is_deterministic_in_its_seed():
    a, b, c = stack_data.generate(0, **SIZES), stack_data.generate(0, **SIZES), stack_data.generate(1, **SIZES)
    assert a == b
    assert a["sft"] != c["sft"] and a["grpo_held_out"] != c["grpo_held_out"]
    assert {k: len(v) for k, v in a.items()} == {
        **SIZES["train_rows"], **{f"{k}_held_out": v for k, v in SIZES["held_out_rows"].items() if k != "reference"},
        "reference": 20}


def test_held_out_problems_never_appear_in_training_files():
    d = stack_data.generate(0, **SIZES)
    train, held = stack_data.split_problems(0)
    assert not set(train) & set(held)
    for stage in ("cpt", "sft", "dpo", "grpo"):
        seen, unseen = _problems(d[stage]), _problems(d[f"{stage}_held_out"])
        assert seen and unseen, stage
        assert seen <= set(train), stage
        assert unseen <= set(held) and not unseen & seen, stage
    assert len({r["prompt"] for r in d["grpo_held_out"]}) == len(d["grpo_held_out"])  # distinct questions


def test_each_stage_has_something_to_learn():
    d = stack_data.generate(0, **SIZES)
    # cpt: a quarter of the rows is general text (replay), the held-out domain text has none
    replay = sum(not NARRATIVE.search(r["text"]) for r in d["cpt"]) / len(d["cpt"])
    assert 0.1 < replay < 0.4
    assert all(NARRATIVE.search(r["text"]) for r in d["cpt_held_out"])
    # sft: both answer styles; dpo: chosen is the sentence, rejected the terse answer, both with the right sum
    sentence = [bool(re.search(stack_data.SENTENCE, r["completion"])) for r in d["sft"]]
    assert 0.3 < sum(sentence) / len(sentence) < 0.7
    assert all(re.fullmatch(r" \d+", r["completion"]) for r, s in zip(d["sft"], sentence) if not s)
    for r in d["dpo"]:
        m = QUESTION.match(r["prompt"])
        total = int(m[2]) + int(m[4])
        assert re.search(stack_data.SENTENCE, r["chosen"]) and f" {total} " in r["chosen"]
        assert not re.search(stack_data.SENTENCE, r["rejected"]) and int(r["rejected"]) == total
    for r in d["grpo"]:
        m = QUESTION.match(r["prompt"])
        assert r["answer"] == str(int(m[2]) + int(m[4]))


# ------------------------------------------------------------------------------------------------ metrics
@pytest.fixture(scope="module")
def model_tok():
    pytest.importorskip("torch")
    from kubetune_trainer import tiny

    return stack_eval.load(tiny.cached_model())


@pytest.fixture(scope="module")
def rows():
    return stack_data.generate(0, **SIZES)


def test_completion_loss_is_the_mean_nll_of_completion_and_eos(model_tok, rows):
    import torch

    model, tok = model_tok
    sample = rows["sft_held_out"][:6]
    # independently: transformers' own loss with the prompt masked out, token-weighted over the rows
    total, count = 0.0, 0
    for r in sample:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        labels = ids.clone()
        labels[0, :len(p)] = -100
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * len(c)
        count += len(c)
    assert stack_eval.completion_loss(model, tok, sample) == pytest.approx(total / count, rel=1e-4)


def test_reward_accuracy_is_chance_against_itself_and_antisymmetric(model_tok, rows, tmp_path):
    import torch

    model, tok = model_tok
    pairs = rows["dpo_held_out"][:16]
    same = stack_eval.reward_accuracy(model, model, tok, pairs)
    assert same == {"accuracy": 0.5, "margin": 0.0}  # policy = reference: every pair ties
    other, _ = stack_eval.load(model.name_or_path)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ab = stack_eval.reward_accuracy(other, model, tok, pairs, beta=0.1)
    ba = stack_eval.reward_accuracy(model, other, tok, pairs, beta=0.1)
    ab2 = stack_eval.reward_accuracy(other, model, tok, pairs, beta=0.2)
    assert ab["accuracy"] == pytest.approx(1 - ba["accuracy"])
    assert ab["margin"] == pytest.approx(-ba["margin"], rel=1e-5) and ab["margin"] != 0
    assert ab2["margin"] == pytest.approx(2 * ab["margin"], rel=1e-5)


def test_preference_accuracy_flips_with_the_pair(model_tok, rows):
    model, tok = model_tok
    pairs = rows["dpo_held_out"][:16]
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in pairs]
    a = stack_eval.preference_accuracy(model, tok, pairs)
    assert a + stack_eval.preference_accuracy(model, tok, swapped) == pytest.approx(1.0)


def test_mean_reward_weights_the_jobs_built_in_rewards(model_tok, rows):
    model, tok = model_tok
    prompts = rows["grpo_held_out"][:4]
    always = {"name": "regex_match", "weight": 0.3, "params": {"pattern": "^"}}
    never = {"name": "regex_match", "weight": 1.0, "params": {"pattern": "(?!)"}}
    r = stack_eval.mean_reward(model, tok, prompts, [never, always], samples=2, max_new_tokens=3)
    # two rewards of one name: each counts with its own weight
    assert r["mean_reward"] == pytest.approx(0.3)
    exact = stack_eval.mean_reward(model, tok, prompts, [{"name": "numeric_match"}], samples=2, max_new_tokens=3)
    again = stack_eval.mean_reward(model, tok, prompts, [{"name": "numeric_match"}], samples=2, max_new_tokens=3)
    assert exact == again  # fixed seed: the same samples
    assert 0.0 <= exact["mean_reward"] <= 1.0 and not math.isnan(exact["greedy_accuracy"])


# ------------------------------------------------------------------------------------------------ the pipeline
def _stack_pipeline(tmp_path, monkeypatch):
    from kubetune_trainer import config
    from kubetune_trainer.cli import expand_local_vars
    from kubetune_trainer.pipeline import load_pipeline

    monkeypatch.setenv("KUBETUNE_STACK_BASE", "/models/base")
    monkeypatch.setenv("KUBETUNE_STACK_DATA", "/data")
    monkeypatch.setenv("KUBETUNE_STACK_SEED", "3")
    text = (REPO / "examples" / "stack" / "pipeline.yaml").read_text()
    return load_pipeline(config.parse_yaml(expand_local_vars(text, tmp_path), "pipeline.yaml"), "pipeline.yaml")


def test_stack_pipeline_is_valid_and_hands_each_stage_the_previous_model(tmp_path, monkeypatch):
    from kubetune_api.finetunepipeline import handover, stage_job_spec

    p = _stack_pipeline(tmp_path, monkeypatch)  # parse + validate_pipeline (the CRD's CEL rules in Python)
    spec = p.spec
    assert p.metadata.name == "stack" and [s.name for s in spec.stages] == ["cpt", "sft", "dpo", "grpo"]
    assert [str(s.job.stage) for s in spec.stages] == ["cpt", "sft", "dpo", "grpo"]
    assert [str(s.job.adapter.type) for s in spec.stages] == ["full", "lora", "lora", "lora"]
    assert [handover(spec, i) for i in range(4)] == [None, "weights", "merge", "merge"]
    assert spec.model.source == "file:///models/base"
    jobs = [stage_job_spec(spec, i, "file:///prev") for i in range(4)]
    assert all(j.training.seed == 3 for j in jobs)
    # sft and dpo hand over merged models (the merged SFT model is also DPO's reference); grpo writes one to serve
    assert [bool(j.output.merged_model) for j in jobs] == [False, True, True, True]
    # the gates docs/training-stack.md derives from the hand-chained runs; forgetting judged at every stage
    gates = {s.name: s.gate.model_dump(exclude_none=True, exclude_defaults=True) for s in spec.stages}
    assert gates == {"cpt": {"max_perplexity": 3.0, "max_forgetting_rise": 0.3},
                     "sft": {"max_eval_loss": 1.3, "max_forgetting_rise": 0.3},
                     "dpo": {"min_reward_accuracy": 0.9, "max_forgetting_rise": 0.3},
                     "grpo": {"min_mean_reward": 0.3, "max_forgetting_rise": 0.3}}
    assert all(s.job.evaluation.reference[0].uri == "file:///data/reference.jsonl" for s in spec.stages)
    patterns = [r.params["pattern"] for r in spec.stages[3].job.training.grpo.rewards if r.name == "regex_match"]
    assert patterns == [stack_data.SENTENCE]  # grpo rewards the answer format the DPO pairs prefer


def test_bench_reads_each_stage_and_gate_from_a_pipeline_run_stopped_by_a_gate(tmp_path, monkeypatch):
    """bench/training_stack.py finds each stage's model and gate verdict in the state file the local pipeline
    runner writes; a failed gate (here dpo's reward accuracy) is reported, with the stages that did not run.
    The stages' training is stood in for (the bench itself runs it; minutes)."""
    import json

    import training_stack as bench
    from kubetune_api.report import TrainerReport
    from kubetune_trainer.pipeline import GATE_FAILED_EXIT, run_pipeline

    pipeline = _stack_pipeline(tmp_path, monkeypatch)
    out = tmp_path / "out"
    reported = {"cpt": {"perplexity": 2.7, "evalLoss": 0.99}, "sft": {"evalLoss": 1.2},
                "dpo": {"rewardAccuracy": 0.5, "rewardMargin": 0.0}}

    def run_stage(job):
        stage = str(job.spec.stage)
        run = out / "default" / job.metadata.name / "runs" / "r1"
        (run / "adapter").mkdir(parents=True)
        (run / "manifest.json").write_text(json.dumps({"wallSeconds": 12.5, "metrics": reported[stage]}))
        arts = {"runId": "r1", "adapterUri": f"file://{run}/adapter", "manifestUri": f"file://{run}/manifest.json"}
        if job.spec.output.merged_model:
            arts["mergedModelUri"] = f"file://{run}/merged"
        return TrainerReport.model_validate({
            "state": "succeeded", "progress": reported[stage], "artifacts": arts,
            "forgetting": {"referencePerplexityBefore": 2.0, "referencePerplexityAfter": 2.1, "relativeChange": 0.05}})

    result = run_pipeline(pipeline, out, run_stage=run_stage, say=lambda m: None)
    assert result.exit_code == GATE_FAILED_EXIT

    recs = bench.pipeline_stages(out)
    assert [r["name"] for r in recs] == ["cpt", "sft", "dpo"]
    stages = {r["name"]: bench.stage_record(r) for r in recs}
    run = out / "default"
    assert stages["cpt"]["model"] == str(run / "stack-cpt" / "runs" / "r1" / "adapter")  # full: the whole model
    assert stages["sft"]["model"] == str(run / "stack-sft" / "runs" / "r1" / "merged")
    assert stages["dpo"]["model_source"] == f"file://{run}/stack-sft/runs/r1/merged"  # trained on the merged SFT
    assert stages["sft"]["seconds"] == 12.5 and stages["sft"]["job_metrics"] == {"evalLoss": 1.2}

    result = {"pipeline_exit_code": GATE_FAILED_EXIT, "stages": stages}
    gates = bench.gate_table(result)
    assert "| cpt | Passed | perplexity 2.7 <= 3: passed; forgettingRise 0.05 <= 0.3: passed |" in gates
    assert "| dpo | Failed | forgettingRise 0.05 <= 0.3: passed; rewardAccuracy 0.5 >= 0.9: FAILED |" in gates
    assert "| grpo | not run | - |" in gates
    verdict = bench.verdict(result)
    assert verdict.startswith("PIPELINE STOPPED (kubetune run exit 3) at stage dpo: gate failed: rewardAccuracy 0.5 < 0.9")
    assert verdict.endswith("stages not run: grpo")

    # the before/after table covers the stages that were measured, and stops where the pipeline stopped
    row = {"reference_ppl": 2.0, "domain_ppl": 3.0, "sft_loss": 1.0, "dpo_reward_accuracy": 1.0,
           "grpo_mean_reward": 0.1}
    table = bench.table({"matrix": {"base": row, "cpt": row, "sft": row}})
    assert [line.split(" |")[0] for line in table.splitlines()[2:]] == ["| cpt", "| sft"]
