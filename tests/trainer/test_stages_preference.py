"""Preference stages on CPU with the tiny pre-trained Llama: dpo, orpo, kto and reward-model training.

Every stage x adapter cell trains a few steps, its weights change, and what `trainer.save_model` writes loads
back (PeftModel.from_pretrained for adapters, from_pretrained for full/galore) with the same outputs. Learning is
checked where it is the point of the stage: DPO raises the held-out implicit-reward accuracy and margin, and
the reward model goes from chance to separating held-out pairs.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_stages_preference.py -q
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from kubetune_trainer import tiny  # noqa: E402
from kubetune_trainer.errors import ConfigError  # noqa: E402
from kubetune_trainer.stages import get_stage  # noqa: E402
from kubetune_trainer.stages.kto import unpair  # noqa: E402
from tests.trainer import stage_helpers as H  # noqa: E402

CELLS = [
    ("dpo", "lora"), ("dpo", "qlora"), ("dpo", "dora"), ("dpo", "full"), ("dpo", "galore"),
    ("orpo", "lora"), ("orpo", "qlora"), ("orpo", "full"),
    ("kto", "lora"), ("kto", "full"),
    ("reward", "lora"), ("reward", "qlora"), ("reward", "dora"), ("reward", "full"), ("reward", "galore"),
]


def galore_extra(adapter: str) -> dict:
    # GaLore's default rank (128) is larger than the tiny model's matrices; a rank that fits keeps it meaningful.
    return {"adapter_extra": {"galore": {"rank": 16, "updateProjGap": 2}}} if adapter == "galore" else {}


@pytest.mark.parametrize("stage,adapter", CELLS, ids=[f"{s}-{a}" for s, a in CELLS])
def test_stage_trains_and_its_weights_reload(tmp_path, stage, adapter):
    st, ctx, trainer = H.build(stage, adapter, tmp_path / "run", n_train=24, training={"maxSteps": 3},
                               **galore_extra(adapter))
    # Snapshot parameters, not outputs: an eval-mode forward on a 4-bit CPU model before training would
    # switch bitsandbytes to its inference-only packed kernel (see stage_helpers.trainable_snapshot).
    start = H.trainable_snapshot(trainer.model)
    initial = {n: p.detach().clone() for n, p in ctx.model.named_parameters()} if adapter in ("full", "galore") \
        else None
    trainer.train()

    losses = H.logged(trainer, "loss")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert H.changed(start, trainer.model), "training did not change the trainable weights"
    trained, reloaded = H.reload_trained(trainer, ctx, tiny.cached_model(), tmp_path / "out", st.model_kind)
    inputs = H.sample_inputs(ctx.tokenizer)
    assert torch.allclose(H.output_of(reloaded, inputs), H.output_of(trained, inputs), atol=1e-5), \
        "the saved weights do not reproduce the trained model"
    if stage in ("dpo", "kto"):
        # PEFT: the reference is the adapter-disabled base; full/galore: a frozen copy of the starting weights.
        if initial is None:
            assert trainer.ref_model is None
        else:
            ref = dict(trainer.ref_model.named_parameters())
            assert all(torch.equal(ref[n], initial[n]) for n in initial)
            assert not any(p.requires_grad for p in ref.values())


def test_dpo_params_reach_the_trl_config(tmp_path):
    _, _, trainer = H.build("dpo", "lora", tmp_path, n_train=8,
                            stage_block={"beta": 0.3, "lossType": "ipo", "labelSmoothing": 0.0})
    assert trainer.args.beta == 0.3 and trainer.args.loss_type == ["ipo"] and trainer.args.max_length == 64
    assert trainer.args.use_cpu and not trainer.args.bf16  # the common kwargs won over TRL's GPU defaults
    _, _, default = H.build("dpo", "lora", tmp_path / "d", n_train=8)
    assert default.args.beta == 0.1 and default.args.loss_type == ["sigmoid"]


def test_dpo_learns_to_prefer_the_chosen_answers_on_held_out_pairs(tmp_path):
    """Implicit reward beta*log(pi/ref): 0 for every pair before training (policy == reference); after 30 steps
    the held-out chosen answers must out-score the clearly wrong rejected ones."""
    _, _, trainer = H.build("dpo", "lora", tmp_path, n_train=120, n_eval=32,
                            training={"maxSteps": 30, "evalEverySteps": 1000, "logEverySteps": 5})
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = H.logged(trainer, "loss")
    print(f"DPO eval accuracy {before['eval_rewards/accuracies']:.2f} -> {after['eval_rewards/accuracies']:.2f}, "
          f"margin {before['eval_rewards/margins']:.3f} -> {after['eval_rewards/margins']:.3f}, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert after["eval_rewards/accuracies"] >= 0.9
    assert after["eval_rewards/margins"] >= 1.0
    assert losses[0] == pytest.approx(math.log(2), abs=0.02) and losses[-1] < 0.3


def test_reward_model_learns_to_rank_held_out_pairs(tmp_path):
    _, ctx, trainer = H.build("reward", "full", tmp_path, n_train=320, n_eval=64,
                              training={"learningRate": 1e-3, "maxSteps": 40, "batchSize": 8,
                                        "evalEverySteps": 1000, "logEverySteps": 10})
    assert get_stage("reward").model_kind == "reward"
    assert trainer.model.config.num_labels == 1
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"reward model eval accuracy {before['eval_accuracy']:.2f} -> {after['eval_accuracy']:.2f}, "
          f"margin {before['eval_margin']:.3f} -> {after['eval_margin']:.3f}")
    # A fresh random head on pre-trained features already ranks some pairs, but with no margin to speak of.
    assert abs(before["eval_margin"]) < 0.5
    assert after["eval_accuracy"] >= 0.95 and after["eval_accuracy"] > before["eval_accuracy"]
    assert after["eval_margin"] >= 2.0


def test_reward_qlora_keeps_the_score_head_in_the_hidden_states_dtype(tmp_path):
    _, _, trainer = H.build("reward", "qlora", tmp_path, n_train=8, training={"maxSteps": 1})
    head = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert head and all(p.dtype == torch.float32 for _, p in head), head
    assert any(p.dtype == torch.bfloat16 for n, p in trainer.model.named_parameters() if "lora_A" in n)
    trainer.train()
    assert math.isfinite(H.logged(trainer, "loss")[-1])


def test_kto_unpairs_preference_pairs_into_a_shuffled_balanced_stream():
    pairs = H.dataset(H.rows("preference")[:40])
    rows = unpair(pairs, seed=0)
    assert len(rows) == 80 and sorted(rows.column_names) == ["completion", "label", "prompt"]
    assert sum(rows["label"]) == 40
    by_prompt_completion = {(r["prompt"], r["completion"]): r["label"] for r in rows}
    for p in pairs:
        assert by_prompt_completion[(p["prompt"], p["chosen"])] is True
        assert by_prompt_completion[(p["prompt"], p["rejected"])] is False
    # KTO reads its data in order: the first micro-batches must not be all desirable (TRL's own unpairing is).
    first = rows["label"][:16]
    assert 0 < sum(first) < 16
    assert unpair(H.dataset(H.rows("unpaired_preference")[:4]), seed=0)["completion"] == \
        [r["completion"] for r in H.rows("unpaired_preference")[:4]]


def test_kto_trains_on_preference_pairs(tmp_path):
    _, ctx, trainer = H.build("kto", "lora", tmp_path, fmt="preference", n_train=16, training={"maxSteps": 2})
    assert set(trainer.train_dataset.column_names) >= {"prompt", "completion"}
    assert trainer.args.beta == 0.1 and trainer.args.desirable_weight == 1.0
    trainer.train()
    assert all(math.isfinite(x) for x in H.logged(trainer, "loss"))


def test_kto_needs_two_examples_per_micro_batch(tmp_path):
    with pytest.raises(ConfigError) as err:
        H.build("kto", "lora", tmp_path, n_train=4, training={"batchSize": 1})
    assert err.value.field == "spec.training.batchSize"
