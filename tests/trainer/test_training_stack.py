"""The training-stack demonstration's parts (bench/training_stack.py runs them; it is not run here):

- bench/stack_data.py: the synthetic domain is deterministic in its seed, and held-out rows come only from
  held-out problems (no training file contains them);
- bench/stack_eval.py: each held-out metric computes what it claims, checked on the tiny model against an
  independent computation or an identity the metric must satisfy;
- examples/stack/*.yaml: valid FineTuneJobs that chain cpt -> sft -> dpo -> grpo through '<job>/latest/...'
  URIs, and the grpo job rewards the same answer format the data's DPO pairs prefer.

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


# ------------------------------------------------------------------------------------------------ manifests
def test_stack_manifests_are_valid_jobs_chained_stage_to_stage(tmp_path, monkeypatch):
    from kubetune_api.finetunejob import parse_job, validate_spec
    from kubetune_trainer.cli import expand_local_vars

    monkeypatch.setenv("KUBETUNE_STACK_BASE", "/models/base")
    monkeypatch.setenv("KUBETUNE_STACK_DATA", "/data")
    monkeypatch.setenv("KUBETUNE_STACK_SEED", "3")
    jobs = {}
    for stage in ("cpt", "sft", "dpo", "grpo"):
        text = (REPO / "examples" / "stack" / f"{stage}.yaml").read_text()
        jobs[stage] = parse_job(yaml.safe_load(expand_local_vars(text, tmp_path)))
        assert jobs[stage].spec.stage == stage and jobs[stage].spec.training.seed == 3
        assert validate_spec(jobs[stage].spec) == [], stage
    assert jobs["cpt"].spec.model.source == "file:///models/base"
    for prev, stage in (("cpt", "sft"), ("sft", "dpo"), ("dpo", "grpo")):
        folder = "adapter" if jobs[prev].spec.adapter.type == "full" else "merged"
        assert jobs[prev].spec.adapter.type == "full" or jobs[prev].spec.output.merged_model
        assert jobs[stage].spec.model.source == f"file://{tmp_path}/default/stack-{prev}/latest/{folder}"
    patterns = [r.params["pattern"] for r in jobs["grpo"].spec.training.grpo.rewards if r.name == "regex_match"]
    assert patterns == [stack_data.SENTENCE]
