"""The published adapter is the best checkpoint, not the last step (runner.py, training_args.best_model,
checkpointing.CheckpointSync): chosen by transformers' metric_for_best_model / load_best_model_at_end, kept out
of pruning, restored after a restart, and named in manifest.json.

The scenario makes the best step an early one on purpose: continued pre-training on domain text while the eval
set is general text the tiny base model already knows, so eval loss rises as the adapter drifts (forgetting).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_best_model.py -q
"""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file

from kubetune_trainer import checkpointing
from tests.trainer.conftest import output_dir

STEPS = 12


def _job(make_job, tiny_data, **training):
    return make_job(stage="cpt", data="domain",
                    dataset={"eval": [{"uri": f"file://{tiny_data['general']}"}]},
                    training={"maxSteps": STEPS, "learningRate": 0.01, "maxLength": 48, "evalEverySteps": 2,
                              "checkpointEverySteps": 4, "keepCheckpoints": 1, **training})


def _evals(out) -> dict[int, float]:
    """step -> eval loss of every evaluation after step 0, from the last checkpoint's Trainer state (it spans
    every pod of the run)."""
    state = json.loads((out / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e and e["step"]}


def _weights(folder) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_best_checkpoint_is_published_and_never_pruned(make_job, run_job, tiny_data):
    job = _job(make_job, tiny_data)
    report = run_job(job)
    assert report.state == "succeeded", report.message
    out = output_dir(job)
    evals = _evals(out)
    best = min(evals, key=evals.get)  # step 0 (eval_on_start) is the untrained baseline: not a candidate
    assert best < STEPS, f"the scenario should make an early step best: {evals}"
    m = json.loads((out / "manifest.json").read_text())
    assert m["published"]["step"] == best and m["published"]["reason"] == "best"
    assert m["published"]["metric"] == "eval_loss" and m["published"]["value"] == pytest.approx(evals[best])
    assert m["published"]["lastStep"] == STEPS
    assert m["metrics"]["eval_loss"] == pytest.approx(evals[best])  # the metrics describe what was published
    # keepCheckpoints: 1 keeps the newest AND the best (a checkpoint was saved at the best evaluation although
    # the checkpoint cadence is 4 and the evaluation cadence 2)
    ckpts = sorted(checkpointing.checkpoint_step(p) for p in (out / "checkpoints").iterdir())
    assert ckpts == sorted({best, STEPS})
    published = _weights(out / "adapter")
    assert _same(published, _weights(out / "checkpoints" / f"checkpoint-{best}"))
    assert not _same(published, _weights(out / "checkpoints" / f"checkpoint-{STEPS}"))


def test_best_survives_a_restart(make_job, run_job, tiny_data):
    """SIGTERM after the best step: the restarted pod (fresh work dir) downloads the best checkpoint next to the
    one it resumes, and the Trainer still publishes the best step, not the last."""
    from transformers import TrainerCallback

    job = _job(make_job, tiny_data)

    class Preempt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                checkpointing._on_sigterm(15, None)

    first = run_job(job, callbacks=[Preempt()], work="pod1")
    assert first.state == "preempted", first.message
    checkpointing.reset_sigterm()
    out = output_dir(job)
    assert not (out / "manifest.json").exists()
    second = run_job(job, work="pod2")
    assert second.state == "succeeded", second.message
    evals = _evals(out)
    best = min(evals, key=evals.get)
    m = json.loads((out / "manifest.json").read_text())
    resumed = checkpointing.checkpoint_step(m["resumedFrom"])
    assert resumed in (7, 8) and best < resumed, (resumed, evals)  # the SIGTERM checkpoint, after the best step
    assert (m["published"]["step"], m["published"]["reason"]) == (best, "best")
    assert _same(_weights(out / "adapter"), _weights(out / "checkpoints" / f"checkpoint-{best}"))


def test_publish_last_when_the_manifest_asks(make_job, run_job, tiny_data):
    job = _job(make_job, tiny_data, checkpointEverySteps=6)
    job.spec.output.publish = "last"
    report = run_job(job)
    assert report.state == "succeeded", report.message
    out = output_dir(job)
    m = json.loads((out / "manifest.json").read_text())
    assert m["published"] == {"step": STEPS, "reason": "last", "why": "output.publish: last"}
    assert _same(_weights(out / "adapter"), _weights(out / "checkpoints" / f"checkpoint-{STEPS}"))
