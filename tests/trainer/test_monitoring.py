"""RunMonitor with a real (tiny) transformers Trainer on CPU: /metrics, /progress and /healthz while and after it
trains, metrics.jsonl, the NaN guard stopping at the injected step, early stopping after `patience`
evaluations, the termination message, reference perplexity and the curve plot.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_monitoring.py -q
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from transformers import (LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainerControl,  # noqa: E402
                          TrainingArguments)

from kubetune_api.constants import ExitCode  # noqa: E402
from kubetune_api.metrics_catalog import JOB_LABEL, TRAINER_METRICS  # noqa: E402
from kubetune_api.finetunejob import parse_job  # noqa: E402
from kubetune_api.report import TrainerReport  # noqa: E402
from kubetune_trainer.errors import DataError, DivergedError  # noqa: E402
from kubetune_trainer.monitoring import RunMonitor, plot_curves, read_metrics, reference_perplexity  # noqa: E402
from kubetune_trainer.monitoring import token_perplexity  # noqa: E402

LABELS = {"namespace": "ml", JOB_LABEL: "demo", "stage": "sft", "adapter": "lora"}
SEQ, BATCH = 16, 4


def make_job(evaluation: dict | None = None, stage: str = "sft"):
    spec = {"stage": stage, "model": {"source": "file:///models/tiny"},
            "dataset": {"format": "text", "train": [{"uri": "file:///data/train.jsonl"}]},
            "output": {"uri": "file:///out"}}
    if evaluation is not None:
        spec["evaluation"] = evaluation
    return parse_job({"metadata": {"name": "demo", "namespace": "ml"}, "spec": spec})


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.ids = torch.randint(0, 64, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.ids[i]}


def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


def make_trainer(tmp_path, monitor, *, max_steps, eval_steps=None, logging_steps=2, grad_accum=1, lr=1e-3,
                 callbacks=()):
    # The settings the runner's training_args.build() uses for monitoring: NaN not filtered, tokens counted.
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=max_steps, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH, gradient_accumulation_steps=grad_accum, learning_rate=lr,
        logging_steps=logging_steps, eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps,
        save_strategy="no", report_to=[], use_cpu=True, include_num_input_tokens_seen=True,
        logging_nan_inf_filter=False, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=TokenDataset(64, 0),
                      eval_dataset=TokenDataset(8, 1), callbacks=[monitor.callback(), *callbacks])
    token_perplexity.install(trainer)  # as the cpt/sft stages do
    monitor.guard(trainer)
    return trainer


def fetch(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type"), resp.read().decode()


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


# ---------------------------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """One 6-step run (log every 2 steps, eval every 3), observed live at step 4 and after training."""
    tmp = tmp_path_factory.mktemp("run")
    monitor = RunMonitor(make_job(), tmp / "work", host="127.0.0.1", port=0)
    monitor.start()
    live = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                live["progress"] = json.loads(fetch(monitor.url + "/progress")[2])
                live["metrics"] = fetch(monitor.url + "/metrics")[2]

    trainer = make_trainer(tmp, monitor, max_steps=6, eval_steps=3, callbacks=[Probe()])
    trainer.train()
    out = {"monitor": monitor, "trainer": trainer, "live": live, "tmp": tmp,
           "metrics": fetch(monitor.url + "/metrics"), "progress": fetch(monitor.url + "/progress"),
           "healthz": fetch(monitor.url + "/healthz")}
    try:
        fetch(monitor.url + "/nope")
    except urllib.error.HTTPError as exc:
        out["missing"] = exc.code
    termination = tmp / "termination-log"
    mp = pytest.MonkeyPatch()
    mp.setenv("KUBETUNE_TERMINATION_LOG", str(termination))
    try:
        monitor.finish(monitor.report("succeeded"))
    finally:
        mp.undo()
    out["termination"] = termination.read_text()
    try:
        fetch(monitor.url + "/healthz")
        out["served_after_finish"] = True
    except (urllib.error.URLError, ConnectionError):
        out["served_after_finish"] = False
    return out


def test_metrics_expose_catalog_names_with_job_labels(sft_run):
    status, content_type, text = sft_run["metrics"]
    assert status == 200 and content_type.startswith("text/plain")
    got = samples(text)
    expected = {m.name for m in TRAINER_METRICS} - {
        # RL/preference signals, the forgetting check and checkpoints did not happen in this SFT run
        "kubetune_reward_mean", "kubetune_reward_std", "kubetune_policy_kl", "kubetune_preference_reward_margin",
        "kubetune_preference_reward_accuracy", "kubetune_eval_reward_accuracy", "kubetune_eval_reward_margin",
        "kubetune_reference_perplexity", "kubetune_forgetting_relative_change",
        "kubetune_checkpoint_last_timestamp_seconds",
        # per reward function, from its first failed call (tests/trainer/test_reward_sandbox.py)
        "kubetune_reward_errors_total"}
    assert expected <= set(got), f"missing: {sorted(expected - set(got))}"
    assert set(got) <= {m.name for m in TRAINER_METRICS}, "only catalog names (no _created series)"
    for name, ss in got.items():
        assert [s.labels for s in ss] == [LABELS], name
    value = {name: ss[0].value for name, ss in got.items()}
    assert value["kubetune_train_step"] == 6 and value["kubetune_train_total_steps"] == 6
    assert value["kubetune_train_tokens_total"] == 6 * BATCH * SEQ
    assert value["kubetune_train_tokens_per_second"] > 0
    assert value["kubetune_train_nonfinite_loss_total"] == 0
    # equal-length rows, every token labelled: the token-weighted figure equals exp(mean loss) here
    assert value["kubetune_eval_perplexity"] == pytest.approx(math.exp(value["kubetune_eval_loss"]), rel=1e-5)
    history = sft_run["trainer"].state.log_history
    assert value["kubetune_train_loss"] == [h for h in history if "loss" in h][-1]["loss"]
    assert value["kubetune_train_learning_rate"] == [h for h in history if "learning_rate" in h][-1]["learning_rate"]
    assert abs(time.time() - value["kubetune_train_last_progress_timestamp_seconds"]) < 300


def test_metrics_and_progress_are_live_during_training(sft_run):
    live = sft_run["live"]
    report = TrainerReport.model_validate(live["progress"])
    assert report.state == "running"
    assert (report.progress.step, report.progress.total_steps, report.progress.summary) == (4, 6, "4/6 (66%)")
    assert report.progress.eval_loss is not None, "evaluated at step 3"
    assert report.progress.eta_seconds is not None and report.progress.eta_seconds >= 0
    assert samples(live["metrics"])["kubetune_train_step"][0].value == 4


def test_progress_is_a_trainer_report(sft_run):
    status, content_type, body = sft_run["progress"]
    assert status == 200 and content_type == "application/json"
    raw = json.loads(body)
    assert set(raw["progress"]) >= {"step", "totalSteps", "summary", "epoch", "loss", "evalLoss", "perplexity",
                                    "learningRate", "tokensPerSecond", "etaSeconds", "lastProgressTime"}
    p = TrainerReport.model_validate(raw).progress
    assert (p.step, p.total_steps, p.summary) == (6, 6, "6/6 (100%)")
    assert p.perplexity == pytest.approx(math.exp(p.eval_loss))
    assert p.loss > 0 and p.learning_rate > 0 and p.tokens_per_second > 0 and p.epoch > 0
    assert time.strptime(p.last_progress_time, "%Y-%m-%dT%H:%M:%SZ")
    assert sft_run["healthz"][0] == 200 and sft_run["healthz"][2] == "ok\n"
    assert sft_run["missing"] == 404


def test_metrics_jsonl_has_one_line_per_log_and_eval_event(sft_run):
    path = sft_run["monitor"].metrics_path
    assert path == sft_run["tmp"] / "work" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r["time"], float) and isinstance(r["step"], int) for r in records)
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all(r["loss"] > 0 and "learning_rate" in r and r["tokens_per_second"] > 0 for r in train)
    assert [r["step"] for r in evals] == [3, 6]
    assert all(r["perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    assert records[0]["event"] == "train_begin" and records[-1] == {**records[-1], "event": "finish",
                                                                     "state": "succeeded"}


def test_finish_writes_the_termination_message_and_stops_serving(sft_run):
    report = TrainerReport.parse(sft_run["termination"])
    assert report is not None and report.state == "succeeded" and report.exit_code == 0
    assert report.progress.step == 6 and report.progress.perplexity > 1
    assert len(sft_run["termination"].encode()) <= 4096
    assert sft_run["served_after_finish"] is False


# ---------------------------------------------------------------------------------------------- NaN guard
class PoisonAt(TrainerCallback):
    """Sets the embeddings to NaN after step `after`: the next step's loss is NaN."""

    def __init__(self, after: int):
        self.after = after

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.after:
            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(float("nan"))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_nan_guard_raises_diverged_error_at_the_injected_step(tmp_path, grad_accum):
    monitor = RunMonitor(make_job(), tmp_path / "work", host="127.0.0.1", port=0)
    trainer = make_trainer(tmp_path, monitor, max_steps=8, logging_steps=1, grad_accum=grad_accum,
                           callbacks=[PoisonAt(after=2)])
    with pytest.raises(DivergedError) as info:
        trainer.train()
    err = info.value
    assert err.step == 3 and "step 3" in str(err) and "NaN" in str(err)
    assert err.exit_code == ExitCode.DIVERGED and err.reason == "LossNotFinite"
    assert trainer.state.global_step == 2, "stopped before the optimizer applied the NaN step"
    assert monitor.registry.get_sample_value("kubetune_train_nonfinite_loss_total", LABELS) == 1
    assert math.isnan(monitor.registry.get_sample_value("kubetune_train_loss", LABELS))
    events = read_metrics(monitor.metrics_path)
    assert {"event": "nonfinite_loss", "step": 3, "loss": "nan"}.items() <= events[-1].items()
    report = monitor.report("failed", error=err)
    assert (report.reason, report.exit_code) == ("LossNotFinite", 79) and "step 3" in report.message


def test_guard_wraps_once(tmp_path):
    monitor = RunMonitor(make_job(), tmp_path, port=0)
    trainer = make_trainer(tmp_path, monitor, max_steps=1)
    wrapped = trainer.training_step
    monitor.guard(trainer)
    assert trainer.training_step is wrapped


# ---------------------------------------------------------------------------------------------- early stopping
def test_early_stopping_stops_after_patience_evaluations(tmp_path):
    # minDelta 10 nats: no evaluation after the first counts as an improvement, so with patience 2 the run
    # must stop at the third evaluation (step 3) instead of running 10 steps.
    monitor = RunMonitor(make_job({"earlyStopping": {"patience": 2, "minDelta": 10.0}}), tmp_path / "work", port=0)
    trainer = make_trainer(tmp_path, monitor, max_steps=10, eval_steps=1, logging_steps=1)
    trainer.train()
    assert monitor.early_stopped is True
    assert trainer.state.global_step == 3
    stop = [r for r in read_metrics(monitor.metrics_path) if r["event"] == "early_stop"]
    assert len(stop) == 1 and stop[0]["step"] == 3 and stop[0]["patience"] == 2
    report = monitor.report("succeeded")
    assert report.exit_code == 0 and "stopped early at step 3" in report.message
    assert report.progress.summary == "3/3 (100%)", "after an early stop the steps reached are the plan"
    assert monitor.registry.get_sample_value("kubetune_train_total_steps", LABELS) == 3
    # the runner's final evaluation after training does not count again
    trainer.evaluate()
    assert len([r for r in read_metrics(monitor.metrics_path) if r["event"] == "early_stop"]) == 1


def _state(step=0, log_history=None):
    return SimpleNamespace(global_step=step, max_steps=100, epoch=0.0, num_input_tokens_seen=0,
                           log_history=log_history or [])


def test_early_stopping_counts_only_evaluations_without_improvement(tmp_path):
    monitor = RunMonitor(make_job({"earlyStopping": {"patience": 2, "minDelta": 0.01}}), tmp_path, port=0)
    monitor._on_train_begin(_state())
    control = TrainerControl()
    for loss in (2.0, 1.995, 1.5, 1.499):  # 1.995 and 1.499 improve by less than minDelta
        monitor._on_evaluate(_state(), control, {"eval_loss": loss})
        assert not control.should_training_stop, loss
    monitor._on_evaluate(_state(), control, {"eval_loss": 1.6})
    assert control.should_training_stop and monitor.early_stopped


def test_early_stopping_resumes_from_the_restored_log_history(tmp_path):
    monitor = RunMonitor(make_job({"earlyStopping": {"patience": 3}}), tmp_path, port=0)
    history = [{"loss": 2.5, "step": 10}, {"eval_loss": 2.0, "step": 10}, {"eval_loss": 2.1, "step": 20},
               {"eval_loss": 2.2, "step": 30}]
    monitor._on_train_begin(_state(30, history))  # a restarted pod: 2 evaluations without improvement so far
    assert monitor.report().progress.eval_loss == 2.2 and monitor.report().progress.loss == 2.5
    control = TrainerControl()
    monitor._on_evaluate(_state(40), control, {"eval_loss": 2.05})
    assert control.should_training_stop, "the third evaluation without improvement stops the resumed run"


def test_no_early_stopping_without_the_spec(tmp_path):
    monitor = RunMonitor(make_job(), tmp_path, port=0)
    monitor._on_train_begin(_state())
    control = TrainerControl()
    for loss in (1.0, 2.0, 3.0, 4.0, 5.0):
        monitor._on_evaluate(_state(), control, {"eval_loss": loss})
    assert not control.should_training_stop and not monitor.early_stopped


# ---------------------------------------------------------------------------------------------- log keys
@pytest.mark.parametrize("logs, expected", [
    ({"loss": 0.4, "rewards/margins": 1.5, "rewards/accuracies": 0.75, "rewards/chosen": 0.2},
     {"kubetune_train_loss": 0.4, "kubetune_preference_reward_margin": 1.5, "kubetune_preference_reward_accuracy": 0.75}),
    ({"loss": 0.01, "reward": 0.6, "reward_std": 0.2, "kl": 0.03, "completions/mean_length": 12.0},
     {"kubetune_reward_mean": 0.6, "kubetune_reward_std": 0.2, "kubetune_policy_kl": 0.03}),
    ({"objective/scores": 1.25, "objective/kl": 0.5}, {"kubetune_reward_mean": 1.25, "kubetune_policy_kl": 0.5}),
], ids=["dpo", "grpo", "ppo"])
def test_trl_log_keys_feed_the_catalog_metrics(tmp_path, logs, expected):
    monitor = RunMonitor(make_job(), tmp_path, port=0)
    monitor._on_train_begin(_state())
    monitor.callback().on_log(None, _state(step=5), TrainerControl(), logs=logs)
    for name, value in expected.items():
        assert monitor.registry.get_sample_value(name, LABELS) == value, name
    record = read_metrics(monitor.metrics_path)[-1]
    assert record["event"] == "train" and record["step"] == 5 and all(record[k] == v for k, v in logs.items())


# ---------------------------------------------------------------------------------------------- the rest of the API
def test_forgetting_and_checkpoints(tmp_path):
    monitor = RunMonitor(make_job({"forgettingThreshold": 0.1}), tmp_path, port=0)
    monitor.record_reference("before", 10.0)
    assert monitor.report().forgetting.reference_perplexity_after is None
    monitor.record_reference("after", 12.0)
    when = {**LABELS, "when": "after"}
    assert monitor.registry.get_sample_value("kubetune_reference_perplexity", when) == 12.0
    assert monitor.registry.get_sample_value("kubetune_forgetting_relative_change", LABELS) == pytest.approx(0.2)
    f = monitor.report().forgetting
    assert (f.reference_perplexity_before, f.reference_perplexity_after, f.threshold, f.exceeded) == (10.0, 12.0, 0.1, True)
    assert f.relative_change == pytest.approx(0.2)
    with pytest.raises(ValueError):
        monitor.record_reference("during", 1.0)
    monitor.record_checkpoint("s3://b/runs/ml/demo/checkpoints/checkpoint-20")
    assert monitor.registry.get_sample_value("kubetune_checkpoints_saved_total", LABELS) == 1
    assert monitor.registry.get_sample_value("kubetune_checkpoint_last_timestamp_seconds", LABELS) > 0
    assert monitor.report().artifacts.latest_checkpoint.endswith("checkpoint-20")


def test_only_rank_zero_serves_and_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monitor = RunMonitor(make_job(), tmp_path / "work", host="127.0.0.1", port=0, rank=1)
    monitor.start()
    assert monitor._server is None
    monitor._on_train_begin(_state())
    monitor.callback().on_log(None, _state(step=1), TrainerControl(), logs={"loss": 1.0})
    monitor.finish(monitor.report("succeeded"))
    assert not (tmp_path / "work").exists() and not (tmp_path / "termination-log").exists()


def test_metrics_port_from_environment_and_fallback_when_taken(tmp_path, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setenv("KUBETUNE_METRICS_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBETUNE_METRICS_PORT", str(taken))
        monitor = RunMonitor(make_job(), tmp_path)
        assert (monitor.host, monitor.port) == ("127.0.0.1", taken)
        monitor.start()
        try:
            assert monitor.port != taken, "a taken port must not fail the training run"
            assert fetch(monitor.url + "/healthz")[0] == 200
        finally:
            monitor.finish(monitor.report("succeeded"))


def test_finish_waits_for_one_more_scrape_only_when_scraped(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_METRICS_FINAL_SCRAPE_TIMEOUT", "20")
    quiet = RunMonitor(make_job(), tmp_path / "a", host="127.0.0.1", port=0)
    quiet.start()
    t0 = time.monotonic()
    quiet.finish(quiet.report("succeeded"))
    assert time.monotonic() - t0 < 2, "nobody scrapes: no waiting"

    scraped = RunMonitor(make_job(), tmp_path / "b", host="127.0.0.1", port=0)
    scraped.start()
    for _ in range(2):
        fetch(scraped.url + "/metrics")
        time.sleep(0.2)
    done = threading.Event()
    finisher = threading.Thread(target=lambda: (scraped.finish(scraped.report("failed")), done.set()))
    finisher.start()
    assert not done.wait(0.5), "finish returned before the final scrape"
    body = fetch(scraped.url + "/metrics")[2]
    assert "kubetune_train_step" in body
    assert done.wait(5), "finish did not return after the final scrape"
    finisher.join()


# ---------------------------------------------------------------------------------------------- perplexity
@pytest.fixture(scope="module")
def tokenizer():
    from kubetune_trainer import tiny

    return tiny.build_tokenizer(vocab_size=300)


def test_reference_perplexity_is_token_weighted_and_batch_size_independent(tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id))
    texts = ["the cat saw the red ball in the park and smiled .", "a bird .",
             "scheduler evicted pod web-3 on node-2 status ok . kubelet pulled image web-1 on node-5 latency high ."]
    model.train()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        model.eval()
        for t in texts:
            ids = tokenizer(t, return_tensors="pt", truncation=True, max_length=24)["input_ids"]
            nll += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
        model.train()
    expected = math.exp(nll / tokens)
    one = reference_perplexity(model, tokenizer, texts, max_length=24, batch_size=1)
    three = reference_perplexity(model, tokenizer, texts, max_length=24, batch_size=3)
    assert one == pytest.approx(expected, rel=1e-4) and three == pytest.approx(expected, rel=1e-4)
    assert model.training, "the model's train/eval mode is restored"
    with pytest.raises(DataError):
        reference_perplexity(model, tokenizer, [], max_length=24)


# ---------------------------------------------------------------------------------------------- plot
def test_plot_curves_draws_a_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"event": "train_begin", "step": 0, "time": 1.0}]
    for step in range(1, 21):
        lines.append({"event": "train", "step": step, "time": 1.0 + step, "loss": 3.0 / step, "reward": step / 20,
                      "reward_std": 0.1})
        if step % 5 == 0:
            lines.append({"event": "eval", "step": step, "time": 1.0 + step, "eval_loss": 3.2 / step,
                          "perplexity": math.exp(3.2 / step)})
    lines.append({"event": "nonfinite_loss", "step": 21, "time": 30.0, "loss": "nan"})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{truncated")
    png = plot_curves(path, tmp_path / "out" / "curve.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_curves(empty, tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------- follow / plot
from kubetune_cli import follow as follow_mod  # noqa: E402
from kubetune_cli import plot as plot_mod  # noqa: E402


def ftj(phase, step=None, total=100, conditions=None, rv="1", **progress):
    status = {"phase": phase}
    if step is not None:
        status["progress"] = {"step": step, "totalSteps": total, **progress}
    if conditions:
        status["conditions"] = conditions
    return {"metadata": {"name": "bot", "namespace": "ml", "resourceVersion": rv},
            "spec": {"stage": "sft", "adapter": {"type": "lora"}, "output": {"uri": "s3://results/runs"}},
            "status": status}


def test_follow_prints_each_change_and_exits_0_on_success():
    import io

    out = io.StringIO()
    objs = [ftj("Pending"), ftj("Running", 0), ftj("Running", 50, loss=1.2843, evalLoss=1.31, perplexity=3.7065,
                                                 tokensPerSecond=5120.4, etaSeconds=1630),
            ftj("Running", 50, loss=1.2843, evalLoss=1.31, perplexity=3.7065, tokensPerSecond=5120.4, etaSeconds=1630),
            ftj("Succeeded", 100, loss=1.1)]
    assert follow_mod.follow_objects(objs, out, tty=False) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, "an unchanged status is not printed again"
    assert lines[2].startswith("ml/bot  Running") and "50/100  50%" in lines[2]
    for text in ("loss 1.284", "eval 1.31", "ppl 3.707", "5.1k tok/s", "ETA 27m10s"):
        assert text in lines[2], text
    assert "Succeeded" in lines[3] and "100/100 100%" in lines[3] and "ETA -" in lines[3]


def test_follow_shows_the_stages_own_headline_instead_of_a_perplexity():
    import io

    out = io.StringIO()
    objs = [ftj("Running", 20, loss=0.41, evalLoss=0.52, rewardAccuracy=0.8, rewardMargin=1.5,
                metric="acc 0.80 margin 1.5")]
    assert follow_mod.follow_objects(objs, out, tty=False) is not None
    line = out.getvalue().splitlines()[0]
    assert "acc 0.80 margin 1.5" in line and "ppl" not in line


def test_follow_exits_1_on_failure_with_the_reason_and_draws_a_bar_on_a_tty():
    import io

    failed = ftj("Failed", 3, conditions=[{"type": "Failed", "status": "True", "reason": "LossNotFinite",
                                           "message": "training loss became NaN at step 3"}])
    out = io.StringIO()
    assert follow_mod.follow_objects([ftj("Running", 2, loss=2.5), failed], out, tty=True) == 1
    text = out.getvalue()
    # a terminal gets rich's progress bar redrawn in place (cursor movements), then the reason
    assert "\x1b[" in text and "━" in text and "3/100" in text and "ml/bot" in text and "loss 2.5" in text
    assert "Failed: LossNotFinite: training loss became NaN at step 3" in text
    assert follow_mod.follow_objects([ftj("Running", 2), {"_deleted": True}], io.StringIO(), tty=False) == 1
    assert follow_mod.follow_objects([ftj("Running", 2), {"_deleted": True}], io.StringIO(), tty=True) == 1


def test_watch_job_reconnects_after_the_resource_version_expires():
    from kubernetes.client.exceptions import ApiException

    gets = iter([ftj("Running", 1, rv="1"), ftj("Running", 5, rv="7")])
    calls = []

    def stream(resource_version=None):
        calls.append(resource_version)
        if len(calls) == 1:
            yield {"type": "MODIFIED", "object": ftj("Running", 2, rv="2")}
            raise ApiException(status=410, reason="Gone")
        yield {"type": "MODIFIED", "object": ftj("Succeeded", 100, rv="9")}

    import io
    import itertools

    objs = list(itertools.islice(follow_mod.watch_job("bot", "ml", lambda: next(gets), stream), 4))
    assert [o["status"]["progress"]["step"] for o in objs] == [1, 2, 5, 100]
    assert calls == ["1", "7"]
    gets = iter([ftj("Running", 1, rv="1"), ftj("Running", 5, rv="7")])
    calls.clear()
    assert follow_mod.follow_objects(follow_mod.watch_job("bot", "ml", lambda: next(gets), stream), io.StringIO(),
                                     tty=False) == 0, "follow stops at Succeeded"


def _metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"event": e, "step": s, "time": 1.0, k: v}) for e, s, k, v in [
        ("train", 1, "loss", 3.0), ("train", 2, "loss", 2.5), ("eval", 2, "eval_loss", 2.6)]) + "\n")
    return path


def test_plot_command_from_a_file_or_folder(tmp_path, capsys):
    src = _metrics_file(tmp_path)
    assert plot_mod.plot_command(str(src), str(tmp_path / "a.png")) == 0
    assert plot_mod.plot_command(str(tmp_path), str(tmp_path / "b.png")) == 0
    assert (tmp_path / "a.png").read_bytes()[:4] == (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert str(tmp_path / "a.png") in capsys.readouterr().out


def test_plot_command_fetches_from_the_jobs_output(tmp_path, monkeypatch):
    import sys
    import types

    src = _metrics_file(tmp_path)
    fetched = []
    fake_storage = types.ModuleType("kubetune_trainer.storage")
    fake_storage.fetch = lambda uri, cache_dir, endpoint=None: fetched.append((uri, endpoint)) or src
    monkeypatch.setitem(sys.modules, "kubetune_trainer.storage", fake_storage)
    import kubetune_trainer

    monkeypatch.setattr(kubetune_trainer, "storage", fake_storage, raising=False)
    job = ftj("Succeeded", 100)
    # the endpoint the job's runtime named, as recorded in status.runtime
    job["status"]["runtime"] = {"kind": "ClusterFineTuneRuntime", "name": "default",
                                "spec": {"template": {"image": "t:1"}, "storage": {"endpoint": "http://seaweed:8333"}}}
    job["status"]["artifacts"] = {"outputUri": "s3://results/runs/ml/bot/"}
    monkeypatch.setattr(plot_mod, "get_job", lambda name, ns, kubeconfig=None: job)
    assert plot_mod.plot_command("bot", str(tmp_path / "job.png"), namespace="ml") == 0
    assert plot_mod.plot_command("s3://results/runs/ml/bot", str(tmp_path / "uri.png"),
                                   endpoint="http://other:9000") == 0
    assert fetched == [("s3://results/runs/ml/bot/metrics.jsonl", "http://seaweed:8333"),
                       ("s3://results/runs/ml/bot/metrics.jsonl", "http://other:9000")]
    del job["status"]["artifacts"]  # not published yet: this run's prefix, <output.uri>/<ns>/<name>/runs/<uid>/
    job["metadata"]["uid"] = "uid-1"
    assert plot_mod.plot_command("bot", str(tmp_path / "job2.png"), namespace="ml") == 0
    assert fetched[-1][0] == "s3://results/runs/ml/bot/runs/uid-1/metrics.jsonl"


def test_cli_plot_and_follow_subcommands(tmp_path, capsys):
    import subprocess
    import sys

    from kubetune_cli import app as cli

    src = _metrics_file(tmp_path)
    assert cli.main(["plot", str(src), "-o", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "kubeconfig"
    bad.write_text("not: a kubeconfig\n")
    assert cli.main(["follow", "bot", "-n", "ml", "--kubeconfig", str(bad)]) == 2
    assert "kubeconfig" in capsys.readouterr().err
    # Parsing the command line (and --help) loads neither torch nor the kubernetes client.
    code = ("import sys; from kubetune_cli import app as cli; cli.build_parser().parse_args(['plot', 'x']); "
            "cli.build_parser().parse_args(['follow', 'x']); "
            "assert 'torch' not in sys.modules and 'kubernetes' not in sys.modules, sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_plot_command_reads_a_file_uri_through_storage(tmp_path):
    out = tmp_path / "results" / "ml" / "bot"
    out.mkdir(parents=True)
    _metrics_file(out)
    assert plot_mod.plot_command(f"file://{out}", str(tmp_path / "uri.png")) == 0
    assert (tmp_path / "uri.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_mod.plot_command(f"file://{tmp_path}/missing", str(tmp_path / "none.png")) == 1


# ---------------------------------------------------------------------------------------------- headline per stage
@pytest.mark.parametrize("stage, logs, fields, metric", [
    ("sft", [{"eval_loss": 2.0, "eval_perplexity": 7.0}],
     {"perplexity": 7.0}, "ppl 7"),
    ("dpo", [{"loss": 0.6, "rewards/accuracies": 0.5, "rewards/margins": 0.1},
             {"eval_loss": 0.5, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 1.25},
             {"loss": 0.4, "rewards/accuracies": 1.0, "rewards/margins": 3.0}],  # training batches: eval wins
     {"reward_accuracy": 0.75, "reward_margin": 1.25}, "acc 0.75 margin 1.25"),
    ("kto", [{"loss": 0.5, "rewards/margins": 0.5, "kl": 0.2}],
     {"reward_margin": 0.5}, "margin 0.5"),
    ("reward", [{"loss": 0.7, "accuracy": 0.5}, {"eval_loss": 0.3, "eval_accuracy": 0.9, "eval_margin": 2.0}],
     {"reward_accuracy": 0.9, "reward_margin": 2.0}, "acc 0.90 margin 2"),
    ("grpo", [{"loss": 0.0, "reward": 0.25, "kl": 0.01}, {"loss": 0.0, "reward": 0.5, "kl": 0.02}],
     {"mean_reward": 0.5, "kl": 0.02}, "reward 0.5 kl 0.02"),
    ("ppo", [{"objective/scores": 1.5, "objective/kl": 0.125}],
     {"mean_reward": 1.5, "kl": 0.125}, "reward 1.5 kl 0.125"),
])
def test_each_stage_reports_its_own_headline_and_perplexity_only_for_lm_stages(tmp_path, stage, logs, fields,
                                                                                 metric):
    monitor = RunMonitor(make_job(stage=stage), tmp_path, port=0)
    monitor._on_train_begin(_state())
    for i, entry in enumerate(logs, 1):
        monitor.callback().on_log(None, _state(step=i), TrainerControl(), logs=dict(entry))
    progress = monitor.report().progress
    for name in ("perplexity", "reward_accuracy", "reward_margin", "mean_reward", "kl"):
        assert getattr(progress, name) == fields.get(name), name
    assert progress.metric == metric
    labels = {**LABELS, "stage": stage}
    ppl = monitor.registry.get_sample_value("kubetune_eval_perplexity", labels)
    assert ppl == fields.get("perplexity")  # a dpo/reward eval loss never becomes a "perplexity"
    if "reward_accuracy" in fields:
        assert monitor.registry.get_sample_value("kubetune_eval_reward_accuracy", labels) == fields["reward_accuracy"]
