"""Online RL stages on CPU with the tiny pre-trained Llama: grpo and rloo (TRL) and ppo (our Trainer subclass).

Each stage trains with LoRA and its weights reload; GRPO's dataset columns reach reward functions and its batch
geometry is fixed up instead of failing; PPO saves and restores its value head, masks after EOS, and learns.

Learning checks:
- GRPO on a verifiable task (bench/rl_learning.py's recipe, through runner.run): addition questions, a 100-step
  SFT warm-up that teaches the answer format and EOS, then 80 GRPO steps with numeric_match + a format reward must
  raise the eval set's mean reward, sampled and greedy accuracy, without losing ground on unseen pairs.
- PPO, the whole RLHF loop: the base policy's own samples are labelled by an "annotator" with the same
  preference, the `reward` stage trains a reward model on those pairs, and PPO (loading it by URI like any job)
  must raise its held-out score and all but remove the disliked answers, at bounded KL; with klCoef 0 the KL
  runs away, which shows the penalty is what bounds it. (A reward model trained on the tiny preference pairs -
  correct statements vs nonsense - was tried first: the policy's samples sit off that distribution and the
  model's scores for them varied from -1.4 to +2.4 between training runs, too arbitrary to test against.)

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_stages_rl.py -q
"""

from __future__ import annotations

import json
import math
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from kubetune_trainer import tiny  # noqa: E402
from kubetune_trainer.errors import ConfigError, DataError  # noqa: E402
from kubetune_trainer.stages import grpo as grpo_stage  # noqa: E402
from kubetune_trainer.stages import ppo as ppo_stage  # noqa: E402
from tests.trainer import stage_helpers as H  # noqa: E402


ANNOTATOR_DISLIKES = re.compile(r"\?")  # "an answer should not be a question"


def question_prompts() -> list[dict]:
    """The preference prompts ("What is 3 plus 4?") as prompt_only rows: the tiny model answers them in its
    pre-training format ("3 plus 4 is 7. ..."), with a question mark somewhere in ~15 % of its samples."""
    return [{"prompt": r["prompt"]} for r in H.rows("preference")]


def question_rate(model, tokenizer, prompts: list[str]) -> float:
    comps = H.sample_completions(model, tokenizer, prompts, per_prompt=4, max_new_tokens=12)
    return sum(bool(ANNOTATOR_DISLIKES.search(c)) for c in comps) / len(comps)


@pytest.fixture(scope="session")
def annotated_pairs() -> list[dict]:
    """RLHF's data step at tiny scale: four samples of the base policy per prompt, labelled by an "annotator" who
    prefers answers that are not questions; one (chosen, rejected) pair per prompt where both kinds occurred."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.cached_model()
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prompts = [r["prompt"] for r in question_prompts()]
    samples = H.sample_completions(model, tok, prompts, per_prompt=4, max_new_tokens=12, seed=1)
    pairs = []
    for i, prompt in enumerate(prompts):
        group = samples[4 * i:4 * i + 4]
        bad = [c for c in group if ANNOTATOR_DISLIKES.search(c)]
        good = [c for c in group if not ANNOTATOR_DISLIKES.search(c)]
        if bad and good:
            pairs.append({"prompt": prompt, "chosen": good[0], "rejected": bad[0]})
    return pairs


@pytest.fixture(scope="session")
def reward_model(tmp_path_factory, annotated_pairs) -> dict:
    """A reward model trained by the `reward` stage on the annotated pairs (40 held out), saved like a job's
    output and handed to rloo/ppo by URI."""
    out = tmp_path_factory.mktemp("reward-model")
    _, ctx, trainer = H.build("reward", "full", out / "run", train_rows=annotated_pairs,
                              n_train=len(annotated_pairs) - 40, n_eval=40,
                              training={"learningRate": 1e-3, "maxSteps": 60, "batchSize": 8,
                                        "evalEverySteps": 1000})
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(str(out / "model"))
    ctx.tokenizer.save_pretrained(str(out / "model"))
    return {"uri": f"file://{out / 'model'}", "before": before, "after": after}


@pytest.fixture(scope="session")
def reward_model_uri(reward_model) -> str:
    return reward_model["uri"]


def test_reward_model_learns_the_annotators_preference(reward_model, annotated_pairs):
    before, after = reward_model["before"], reward_model["after"]
    print(f"{len(annotated_pairs)} annotated pairs; reward model held-out accuracy {before['eval_accuracy']:.2f} -> "
          f"{after['eval_accuracy']:.2f}, margin {before['eval_margin']:.2f} -> {after['eval_margin']:.2f}")
    assert len(annotated_pairs) >= 120
    assert after["eval_accuracy"] >= 0.9 and after["eval_margin"] >= 2.0 and abs(before["eval_margin"]) < 0.5


# ------------------------------------------------------------------------------------------------ grpo
def test_generation_sizes_hold_whole_groups():
    base = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "per_device_eval_batch_size": 8}
    assert grpo_stage.generation_kwargs(base, 4, has_eval=False) == {}
    odd = {**base, "per_device_train_batch_size": 2}
    assert grpo_stage.generation_kwargs(odd, 4, has_eval=False) == {"generation_batch_size": 4}
    assert grpo_stage.generation_kwargs({**base, "per_device_train_batch_size": 6}, 4, has_eval=False) == \
        {"generation_batch_size": 12}
    assert grpo_stage.generation_kwargs({**odd, "per_device_eval_batch_size": 2}, 4, has_eval=True) == \
        {"generation_batch_size": 4, "per_device_eval_batch_size": 4}
    assert grpo_stage.generation_kwargs({**base, "per_device_eval_batch_size": 5}, 4, has_eval=True) == \
        {"per_device_eval_batch_size": 8}


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_grpo_trains_with_an_odd_batch_and_its_weights_reload(tmp_path, adapter):
    # batchSize 2 with 4 generations per prompt fails in TRL as is; the stage sizes the generation batch.
    st, ctx, trainer = H.build(
        "grpo", adapter, tmp_path / "run", n_train=16, n_eval=4,
        training={"batchSize": 2, "maxSteps": 4, "evalEverySteps": 4},
        # Character length varies between any two completions: every group has reward variance to learn from.
        stage_block={"numGenerations": 4, "maxCompletionLength": 8,
                     "rewards": [{"name": "length_penalty", "params": {"target": "0", "unit": "chars"},
                                  "weight": 2.0},
                                 {"name": "exact_match"}]})
    assert trainer.args.generation_batch_size == 4 and trainer.args.per_device_eval_batch_size == 4
    assert trainer.args.reward_weights == [2.0, 1.0]
    start = H.trainable_snapshot(trainer.model)
    trainer.train()
    assert {"reward", "rewards/length_penalty/mean", "rewards/exact_match/mean"} <= set(trainer.state.log_history[0])
    assert any("eval_reward" in e for e in trainer.state.log_history)
    assert H.changed(start, trainer.model)
    trained, reloaded = H.reload_trained(trainer, ctx, tiny.cached_model(), tmp_path / "out")
    inputs = H.sample_inputs(ctx.tokenizer)
    assert torch.allclose(H.output_of(reloaded, inputs), H.output_of(trained, inputs), atol=1e-5)


def test_grpo_hands_extra_columns_to_custom_rewards(tmp_path):
    # The reward runs in the sandbox (it can write only its scratch folder), so it reports through its scores:
    # 1.0 for a row whose `answer` belongs to its own prompt, -1.0 for a neighbour's.
    src = tmp_path / "recorder.py"
    src.write_text(
        "import re\n"
        "def record(completions, prompts, answer, offset):\n"
        "    assert len(completions) == len(prompts) == len(answer)\n"
        "    out = []\n"
        "    for prompt, a in zip(prompts, answer):\n"
        "        x, y = map(int, re.search(r'What is (\\d+) plus (\\d+)', prompt).groups())\n"
        "        out.append(float(offset) + (1.0 if a == str(x + y) else -1.0))\n"
        "    return out\n")
    _, _, trainer = H.build(
        "grpo", "lora", tmp_path / "run", n_train=8, training={"batchSize": 4, "maxSteps": 1},
        stage_block={"numGenerations": 2, "maxCompletionLength": 4,
                     "rewards": [{"name": "recorder:record", "source": f"file://{src}", "params": {"offset": "1"}}]})
    trainer.train()
    means = [e["rewards/recorder.record/mean"] for e in trainer.state.log_history
             if "rewards/recorder.record/mean" in e]
    assert means and all(m == 2.0 for m in means)  # every row's own answer, and the param arrived


def test_grpo_refuses_a_reward_whose_column_is_missing(tmp_path):
    with pytest.raises(DataError) as err:
        H.build("grpo", "lora", tmp_path, n_train=4,
                stage_block={"rewards": [{"name": "exact_match", "params": {"column": "solution"}}]})
    assert "spec.training.grpo.rewards[0]" in err.value.message and "'solution'" in err.value.message


def test_grpo_bad_reward_is_a_config_error_naming_the_entry(tmp_path):
    with pytest.raises(ConfigError) as err:
        H.build("grpo", "lora", tmp_path, n_train=4,
                stage_block={"rewards": [{"name": "exact_match"}, {"name": "nope:fn", "source": "file:///no/such.py"}]})
    assert err.value.field == "spec.training.grpo.rewards[1].source"


def _rl_recipe():
    """bench/rl_learning.py: the arithmetic task, the warm-up and RL jobs (through runner.run) and the evaluation."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "rl_learning.py"
    spec = importlib.util.spec_from_file_location("kubetune_bench_rl_learning", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~25 s of CPU (warm-up 100 steps, GRPO 80 steps, evaluations)
def test_grpo_learns_arithmetic_from_numeric_match(tmp_path):
    R = _rl_recipe()
    unseen, seen = R.split_pairs()
    data = R.write_task_data(tmp_path / "data", seen)
    warm = R.warm_up(tiny.cached_model(), data["sft"], tmp_path, steps=100)
    before = {"eval": R.evaluate(warm, seen), "unseen": R.evaluate(warm, unseen)}
    model, logs = R.train_rl("grpo", warm, data["rl"], tmp_path / "grpo", steps=80)
    after = {"eval": R.evaluate(model, seen), "unseen": R.evaluate(model, unseen)}
    reward, kl = R.by_quarter(logs, "reward"), R.by_quarter(logs, "kl")
    print(f"GRPO eval reward {before['eval']['mean_reward']:.3f} -> {after['eval']['mean_reward']:.3f}, accuracy "
          f"{before['eval']['sampled_accuracy']:.3f} -> {after['eval']['sampled_accuracy']:.3f} (greedy "
          f"{before['eval']['greedy_accuracy']:.2f} -> {after['eval']['greedy_accuracy']:.2f}); unseen pairs reward "
          f"{before['unseen']['mean_reward']:.3f} -> {after['unseen']['mean_reward']:.3f}; train reward by quarter "
          f"{[round(x, 3) for x in reward]}, KL {[round(x, 3) for x in kl]}")
    # The warm-up taught the format and EOS: completions end instead of running to the length cap (issue 13).
    assert before["eval"]["stopped"] >= 0.95 and after["eval"]["stopped"] >= 0.95
    assert 0.4 <= before["eval"]["sampled_accuracy"] <= 0.75  # room to learn, and a base that can
    # Measured on this task: +0.11 to +0.12 reward and accuracy. The margins are half of that. (The logged
    # training reward by quarter is too noisy to assert on: 8 prompts per step.)
    assert after["eval"]["mean_reward"] - before["eval"]["mean_reward"] >= 0.06
    assert after["eval"]["sampled_accuracy"] - before["eval"]["sampled_accuracy"] >= 0.06
    assert after["eval"]["greedy_accuracy"] > before["eval"]["greedy_accuracy"]
    # RL did not buy the gain by unlearning the questions it never saw, and stayed near the reference.
    assert after["unseen"]["mean_reward"] >= before["unseen"]["mean_reward"] - 0.02
    assert max(kl) < 1.0


# ------------------------------------------------------------------------------------------------ rloo
def test_rloo_trains_against_a_reward_model_plus_functions(tmp_path, reward_model_uri):
    st, ctx, trainer = H.build(
        "rloo", "lora", tmp_path / "run", train_rows=question_prompts(), n_train=16,
        training={"batchSize": 4, "maxSteps": 3},
        stage_block={"numGenerations": 4, "maxCompletionLength": 8, "rewardModel": reward_model_uri,
                     "rewards": [{"name": "length_penalty", "params": {"target": "4", "scale": "0.1"}}]})
    assert trainer.args.reward_weights == [1.0, 1.0]
    start = H.trainable_snapshot(trainer.model)
    trainer.train()
    first = trainer.state.log_history[0]
    assert {"rewards/reward_model/mean", "rewards/length_penalty/mean", "kl"} <= set(first)
    assert first["rewards/length_penalty/mean"] == pytest.approx(-0.4)  # 8 tokens, 4 over the target
    assert H.changed(start, trainer.model)
    trained, reloaded = H.reload_trained(trainer, ctx, tiny.cached_model(), tmp_path / "out")
    inputs = H.sample_inputs(ctx.tokenizer)
    assert torch.allclose(H.output_of(reloaded, inputs), H.output_of(trained, inputs), atol=1e-5)


def test_rloo_reward_model_uri_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        H.build("rloo", "lora", tmp_path, n_train=4,
                stage_block={"rewardModel": f"file://{tmp_path}/missing"})
    assert err.value.field == "spec.training.rloo.rewardModel"


# ------------------------------------------------------------------------------------------------ ppo
def ppo_build(tmp_path, reward_model_uri, adapter="lora", **kwargs):
    block = {"rewardModel": reward_model_uri, "maxCompletionLength": 8, **kwargs.pop("stage_block", {})}
    return H.build("ppo", adapter, tmp_path, train_rows=kwargs.pop("train_rows", question_prompts()),
                   stage_block=block, **kwargs)


def test_gae_matches_the_recursion_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th token is past EOS: ignored
    adv, ret = ppo_stage.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.1
    d1 = 0.0 + 0.9 * 0.1 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2, a1 = d2, d1 + 0.72 * d2
    expected = torch.tensor([[d0 + 0.72 * a1, a1, a2, 0.0]])
    assert torch.allclose(adv, expected) and torch.allclose(ret, (expected + values) * mask)
    w = ppo_stage.masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), mask)
    assert w[0, 3] == 0 and torch.allclose(w[0, :3].mean(), torch.tensor(0.0), atol=1e-6)


def test_ppo_sampler_serves_each_rollout_batch_ppo_epochs_times():
    sampler = ppo_stage.RepeatedChunkSampler(10, chunk=4, repeats=2, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 20
    assert order[0:4] == order[4:8] and order[8:12] == order[12:16] and order[16:18] == order[18:20]
    assert sorted(set(order)) == list(range(10))
    sampler.set_epoch(1)
    assert list(sampler) != order  # reshuffled per epoch


@pytest.mark.parametrize("adapter", ["lora", "dora", "full"])
def test_ppo_trains_logs_and_saves_policy_and_value_head_apart(tmp_path, reward_model_uri, adapter):
    st, ctx, trainer = ppo_build(tmp_path / "run", reward_model_uri, adapter, n_train=16, n_eval=4,
                                 training={"maxSteps": 4, "evalEverySteps": 4})
    head = trainer.model.v_head
    assert head.weight.abs().sum() == 0  # zero-initialised: values start at 0
    assert (trainer.ref_model is None) == (adapter != "full")
    if adapter == "full":
        initial = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    start = H.trainable_snapshot(trainer.model)
    trainer.train()

    keys = set().union(*(e.keys() for e in trainer.state.log_history))
    assert {"loss", "objective/scores", "objective/kl", "loss/policy", "loss/value", "val/clipfrac",
            "policy/clipfrac", "eval_objective/scores", "eval_objective/kl"} <= keys
    assert all(math.isfinite(x) for x in H.logged(trainer, "loss"))
    # The rollout's log-probs and the first update's come from the same function: the first ratio is exactly 1.
    assert H.logged(trainer, "policy/approxkl")[0] == 0.0 and H.logged(trainer, "policy/clipfrac")[0] == 0.0
    assert H.changed(start, trainer.model) and head.weight.abs().sum() > 0
    if adapter == "full":
        assert all(torch.equal(p, initial[n]) for n, p in trainer.ref_model.named_parameters())

    out = tmp_path / "out"
    trained, reloaded = H.reload_trained(trainer, ctx, tiny.cached_model(), out)
    inputs = H.sample_inputs(ctx.tokenizer)
    assert torch.allclose(H.output_of(reloaded, inputs), H.output_of(trained, inputs), atol=1e-5)
    from safetensors.torch import load_file

    weights = out / ("model.safetensors" if adapter == "full" else "adapter_model.safetensors")
    assert not any(k.startswith("v_head") or ".v_head." in k for k in load_file(str(weights)))
    saved = ppo_stage.load_value_head(out, ctx.model.config.hidden_size)
    assert torch.equal(saved.weight, head.weight.detach().cpu()) and torch.equal(saved.bias, head.bias.detach().cpu())


def test_ppo_checkpoint_resume_restores_the_value_head(tmp_path, reward_model_uri):
    _, _, trainer = ppo_build(tmp_path / "a", reward_model_uri, n_train=16, training={"maxSteps": 2},
                              save_steps=2)
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    assert (ckpt / ppo_stage.VALUE_HEAD_FILE).exists() and (ckpt / "optimizer.pt").exists()
    trained_head = trainer.model.v_head.weight.detach().clone()

    _, _, resumed = ppo_build(tmp_path / "b", reward_model_uri, n_train=16, training={"maxSteps": 3})
    resumed._load_from_checkpoint(str(ckpt))
    assert torch.equal(resumed.model.v_head.weight.detach(), trained_head)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 3


def test_ppo_masks_everything_after_the_first_eos(tmp_path, reward_model_uri):
    _, ctx, trainer = ppo_build(tmp_path, reward_model_uri, n_train=8, stage_block={"maxCompletionLength": 10})
    # Make a frequent token the EOS so that most completions stop early.
    stop = ctx.tokenizer(" is")["input_ids"][0]
    trainer._eos_ids = [stop]
    trainer._generation_config.eos_token_id = [stop]
    batch = trainer._prepare_inputs(trainer.data_collator([{"prompt": r["prompt"]} for r in question_prompts()[:8]]))
    torch.manual_seed(0)
    s = trainer._sample(trainer.model, batch)
    response, mask = s["response"], s["response_mask"]
    stopped = 0
    for row, m in zip(response.tolist(), mask.tolist()):
        if stop in row:
            stopped += 1
            first = row.index(stop)
            assert m == [1] * (first + 1) + [0] * (len(row) - first - 1)  # the EOS itself is scored
            assert all(t == ctx.tokenizer.pad_token_id for t in row[first + 1:])
        else:
            assert all(m)
    assert stopped >= 4
    assert torch.all(s["logprobs"].isfinite())


def test_ppo_refuses_zero3(tmp_path, reward_model_uri):
    with pytest.raises(ConfigError) as err:
        ppo_build(tmp_path, reward_model_uri, n_train=4,
                  spec_extra={"distributed": {"deepspeed": {"zeroStage": 3}}})
    assert err.value.field == "spec.distributed.deepspeed.zeroStage"


def ppo_run(tmp_path, reward_model_uri, kl_coef: float):
    items = question_prompts()
    _, ctx, trainer = ppo_build(
        tmp_path, reward_model_uri, train_rows=items, n_train=320, n_eval=64,
        training={"learningRate": 5e-3, "batchSize": 16, "maxSteps": 40, "evalEverySteps": 1000,
                  "logEverySteps": 2},
        stage_block={"maxCompletionLength": 12, "klCoef": kl_coef})
    held_out = [r["prompt"] for r in items[:64]]
    torch.manual_seed(0)
    before = {**trainer.evaluate(), "rate": question_rate(trainer.model, ctx.tokenizer, held_out)}
    trainer.train()
    torch.manual_seed(0)
    after = {**trainer.evaluate(), "rate": question_rate(trainer.model, ctx.tokenizer, held_out)}
    return trainer, before, after


def test_ppo_raises_the_reward_model_score_with_bounded_kl(tmp_path, reward_model_uri):
    trainer, before, after = ppo_run(tmp_path, reward_model_uri, kl_coef=0.2)
    scores, kls = H.logged(trainer, "objective/scores"), H.logged(trainer, "objective/kl")
    print(f"PPO held-out score {before['eval_objective/scores']:.3f} -> {after['eval_objective/scores']:.3f}, "
          f"KL {after['eval_objective/kl']:.2f} (max train KL {max(kls):.2f}); '?' rate {before['rate']:.3f} -> "
          f"{after['rate']:.3f}; train score {scores[0]:.2f} -> {scores[-1]:.2f}")
    assert before["eval_objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert after["eval_objective/scores"] - before["eval_objective/scores"] >= 0.6
    assert sum(scores[-5:]) / 5 - sum(scores[:5]) / 5 >= 0.4
    # What the reward model stands for moved too: the annotator's dislike all but disappeared.
    assert before["rate"] >= 0.08 and after["rate"] <= min(0.05, before["rate"] / 3)
    assert after["eval_objective/kl"] <= 15.0 and max(kls) <= 20.0


def test_ppo_kl_coefficient_holds_the_policy_near_the_reference(tmp_path, reward_model_uri):
    free, _, free_after = ppo_run(tmp_path / "free", reward_model_uri, kl_coef=0.0)
    held, _, held_after = ppo_run(tmp_path / "held", reward_model_uri, kl_coef=0.2)
    free_kl, held_kl = H.logged(free, "objective/kl"), H.logged(held, "objective/kl")
    print(f"PPO final KL with klCoef 0: {free_after['eval_objective/kl']:.2f} (train {free_kl[-1]:.2f}), with "
          f"0.2: {held_after['eval_objective/kl']:.2f} (train {held_kl[-1]:.2f})")
    assert sum(held_kl[-5:]) / 5 < 0.5 * sum(free_kl[-5:]) / 5
    assert held_after["eval_objective/kl"] < 0.5 * free_after["eval_objective/kl"]
