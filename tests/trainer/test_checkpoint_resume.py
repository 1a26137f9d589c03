"""Preemption safety, for real: HF Trainer + LoRA on the tiny model, checkpoints to SeaweedFS, SIGKILL / SIGTERM.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_checkpoint_resume.py -q

The training runs in subprocesses (this module is also the worker: `python -m tests.trainer.test_checkpoint_resume
train ...`), so a kill is a real kill. The resume must be exact: same data order and RNG state, so the loss at the
first step after the resume equals an uninterrupted run's loss at that step, and the final adapter is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune_trainer import checkpointing, storage
from tests.s3_server import s3  # noqa: F401  (session fixture: a real SeaweedFS)

REPO = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 20, 5


# ------------------------------------------------------------------------------------------------- worker
def _jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _callbacks(args):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                _jsonl(args.events, {"event": "loss", "step": state.global_step, "loss": logs["loss"]})

    class Pacer(TrainerCallback):
        """Slows steps down (--step-sleep) or parks the run at one step (--pause-at-step) so the test can kill
        it at a known point. The park ends early on SIGTERM, like real work would."""

        def on_step_end(self, a, state, control, **kw):
            if args.step_sleep:
                time.sleep(args.step_sleep)

        def on_log(self, a, state, control, logs=None, **kw):
            # on_log (after LossLog wrote the step's loss), not on_step_end, which runs before the step is logged
            if state.global_step == args.pause_at_step and logs and "loss" in logs:
                _jsonl(args.events, {"event": "paused", "step": state.global_step})
                deadline = time.monotonic() + args.pause_seconds
                while time.monotonic() < deadline and not checkpointing.sigterm_received():
                    time.sleep(0.05)

    return [LossLog(), Pacer()]


class FileMonitor:
    """Stands in for RunMonitor: what the callback reports lands in the events file."""

    def __init__(self, path: Path):
        self.path = path

    def record_checkpoint(self, uri: str) -> None:
        _jsonl(self.path, {"event": "checkpoint", "uri": uri})


def build_model_and_data(work: Path, *, lora: bool = True, n: int = 160, max_length: int = 40):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer import tiny

    model_dir = tiny.cached_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        # LoRA's A matrices are initialised from the global RNG before the Trainer seeds it: seed here so the
        # reference run and the killed run start from the same adapter
        set_seed(7)

        # dropout > 0 on purpose: the loss then depends on the torch RNG, which the resume must restore
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    paths = tiny.generate_datasets(work / "data", n=n, seed=3)
    texts = [json.loads(line)["text"] for line in paths["general"].read_text().splitlines()]
    enc = tok(texts, max_length=max_length, truncation=True, padding="max_length")
    labels = [[t if m else -100 for t, m in zip(ids, mask)]
              for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return model, tok, ds


def train_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--events", type=Path, required=True)
    ap.add_argument("--max-steps", type=int, default=STEPS)
    ap.add_argument("--save-steps", type=int, default=SAVE_EVERY)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--pause-at-step", type=int, default=-1)
    ap.add_argument("--pause-seconds", type=float, default=0.0)
    args = ap.parse_args(argv)
    checkpointing.install_sigterm_handler()

    import torch
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    store = storage.OutputStore(args.store)
    model, _tok, ds = build_model_and_data(args.work)
    resume = checkpointing.prepare_resume(store, args.work)
    _jsonl(args.events, {"event": "start", "resume": str(resume) if resume else None})
    targs = TrainingArguments(
        output_dir=str(args.work / "checkpoints"), max_steps=args.max_steps, per_device_train_batch_size=4,
        learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1,
        save_strategy="steps", save_steps=args.save_steps, save_total_limit=args.keep, save_only_model=False,
        seed=7, data_seed=7, use_cpu=True, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        logging_nan_inf_filter=False,
    )
    sync = checkpointing.CheckpointSync(store, FileMonitor(args.events), keep=args.keep)
    trainer = Trainer(model=model, args=targs, train_dataset=ds, callbacks=[*_callbacks(args), sync])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if sync.preempted:
        _jsonl(args.events, {"event": "preempted", "step": trainer.state.global_step})
        return 143
    final = args.work / "final"
    trainer.save_model(str(final))
    uri = store.publish_dir(final, "adapter")
    _jsonl(args.events, {"event": "done", "step": trainer.state.global_step, "adapter": uri})
    return 0


# ------------------------------------------------------------------------------------------------ helpers
def _env(s3server) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3server.env())
    env.update({"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "operator"), str(REPO / "trainer-image")]),
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    return env


def _start(s3server, tmp: Path, name: str, store_uri: str, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    work, events = tmp / name, tmp / f"{name}.events.jsonl"
    log = open(tmp / f"{name}.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "tests.trainer.test_checkpoint_resume", "train", "--work", str(work),
                          "--store", store_uri, "--events", str(events), *extra],
                         cwd=REPO, env=_env(s3server), stdout=log, stderr=subprocess.STDOUT)
    return p, work, events


def _events(path: Path, kind: str | None = None) -> list[dict]:
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in out if kind is None or e["event"] == kind]


def _losses(path: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in _events(path, "loss")}


def _wait(p: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"worker did not finish in {timeout}s; log:\n{log.read_text()[-3000:]}")


def _wait_for(cond, timeout: float, p: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if p.poll() is not None:
            pytest.fail(f"worker exited ({p.returncode}) before {what}; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    p.kill()
    pytest.fail(f"timed out waiting for {what}; log:\n{log.read_text()[-3000:]}")


def _adapter_tensors(store: storage.OutputStore, dest: Path) -> dict:
    from safetensors.torch import load_file

    local = store.get_dir("adapter", dest)
    return load_file(str(local / "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def reference(s3, tmp_path_factory):  # noqa: F811 - the imported fixture
    """One uninterrupted run (20 steps, checkpoint every 5, keep 2): the yardstick for the resumed one."""
    tmp = tmp_path_factory.mktemp("reference")
    bucket = s3.new_bucket()
    store_uri = f"s3://{bucket}/runs/ns/ref"
    p, work, events = _start(s3, tmp, "ref", store_uri)
    rc = _wait(p, 600, tmp / "ref.log")
    assert rc == 0, (tmp / "ref.log").read_text()[-3000:]
    return {"store_uri": store_uri, "events": events, "losses": _losses(events), "tmp": tmp, "bucket": bucket}


def test_uninterrupted_run_uploads_complete_checkpoints_and_prunes(s3, reference, monkeypatch):  # noqa: F811
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    store = storage.OutputStore(reference["store_uri"])
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    # every 5 steps a checkpoint was reported complete; keep=2 leaves the newest two
    reported = [checkpointing.checkpoint_step(e["uri"]) for e in _events(reference["events"], "checkpoint")]
    assert reported == [5, 10, 15, 20]
    assert store.list_dirs("checkpoints") == ["checkpoint-15", "checkpoint-20"]
    assert checkpointing.complete_checkpoints(store) == [15, 20]
    assert checkpointing.latest_checkpoint(store) == "checkpoints/checkpoint-20"
    files = store.list_files("checkpoints/checkpoint-20")
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                 storage.COMPLETE):
        assert name in files, sorted(files)
    assert store.read_complete("checkpoints/checkpoint-20")["files"] == {
        k: v for k, v in files.items() if k != storage.COMPLETE}
    state = json.loads(store.read_text("checkpoints/checkpoint-20/trainer_state.json"))
    assert state["global_step"] == 20
    assert store.is_complete("adapter")


def test_sigkill_then_resume_continues_exactly(s3, reference, tmp_path, monkeypatch):  # noqa: F811
    """Killed (SIGKILL) at step 12, after checkpoint-10 reached S3; a half-uploaded checkpoint-15 is planted
    (a pod that died mid-upload). The restarted pod (fresh disk) resumes from 10, not 15, and the loss at step
    11 equals the uninterrupted run's."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    store_uri = f"s3://{reference['bucket']}/runs/ns/killed"
    store = storage.OutputStore(store_uri)
    p, _work, events = _start(s3, tmp_path, "first", store_uri, "--pause-at-step", "12", "--pause-seconds", "300")
    log = tmp_path / "first.log"
    _wait_for(lambda: _events(events, "paused"), 600, p, log, "step 12")
    # checkpoints upload in the background while training goes on: checkpoint-10 lands shortly after step 10
    _wait_for(lambda: checkpointing.latest_checkpoint(store), 30, p, log, "checkpoint-10 in the store")
    assert checkpointing.latest_checkpoint(store) == "checkpoints/checkpoint-10"
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert max(_losses(events)) == 12  # steps 11 and 12 were done, and are lost

    # a dead pod's partial upload of a later checkpoint: files but no _COMPLETE
    ck10 = store.get_dir("checkpoints/checkpoint-10", tmp_path / "ck10")
    for name in ("adapter_model.safetensors", "optimizer.pt"):
        store.put_file(ck10 / name, f"checkpoints/checkpoint-15/{name}")
    assert store.exists("checkpoints/checkpoint-15") and not store.is_complete("checkpoints/checkpoint-15")
    assert checkpointing.latest_checkpoint(store) == "checkpoints/checkpoint-10"

    p2, _work2, events2 = _start(s3, tmp_path, "second", store_uri)  # a new pod: new emptyDir
    rc = _wait(p2, 600, tmp_path / "second.log")
    assert rc == 0, (tmp_path / "second.log").read_text()[-3000:]
    start = _events(events2, "start")[0]
    assert Path(start["resume"]).name == "checkpoint-10"
    resumed, ref = _losses(events2), reference["losses"]
    assert min(resumed) == 11 and max(resumed) == STEPS  # global_step continued at 10
    delta = abs(resumed[11] - ref[11])
    print(f"loss at step 11: resumed {resumed[11]:.6f} vs uninterrupted {ref[11]:.6f} (|delta| {delta:.2e})")
    assert delta < 1e-4
    assert max(abs(resumed[s] - ref[s]) for s in range(11, STEPS + 1)) < 1e-3
    # the partial checkpoint-15 was replaced by the real one; pruning kept 15 and 20
    assert checkpointing.complete_checkpoints(store) == [15, 20]
    assert store.list_dirs("checkpoints") == ["checkpoint-15", "checkpoint-20"]
    # the final adapter is complete and equals the uninterrupted run's
    assert store.is_complete("adapter")
    a = _adapter_tensors(store, tmp_path / "adapter-resumed")
    b = _adapter_tensors(storage.OutputStore(reference["store_uri"]), tmp_path / "adapter-ref")
    assert a.keys() == b.keys() and len(a) > 0
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_resumed_adapter_loads_with_peft(s3, reference, tmp_path, monkeypatch):  # noqa: F811
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer import tiny

    local = storage.fetch(reference["store_uri"].rstrip("/") + "/adapter", tmp_path / "cache")
    base = AutoModelForCausalLM.from_pretrained(tiny.cached_model(), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(local))
    tok = AutoTokenizer.from_pretrained(tiny.cached_model())
    enc = tok(["the cat saw the red ball in the park ."], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, labels=enc["input_ids"])
    assert torch.isfinite(out.loss)


def test_sigterm_saves_current_step_and_exits_143(s3, tmp_path, monkeypatch):  # noqa: F811
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3.new_bucket()
    store_uri = f"s3://{bucket}/runs/ns/term"
    store = storage.OutputStore(store_uri)
    p, _work, events = _start(s3, tmp_path, "term", store_uri, "--max-steps", "200", "--step-sleep", "0.2")
    log = tmp_path / "term.log"
    _wait_for(lambda: max(_losses(events), default=0) >= 7, 600, p, log, "step 7")
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = _wait(p, 60, log)
    elapsed = time.monotonic() - t0
    print(f"SIGTERM -> exit {rc} in {elapsed:.2f} s")
    assert rc == 143, log.read_text()[-3000:]
    assert elapsed < 10
    step = _events(events, "preempted")[0]["step"]
    assert step >= 7
    assert checkpointing.latest_checkpoint(store) == f"checkpoints/checkpoint-{step}"
    state = json.loads(store.read_text(f"checkpoints/checkpoint-{step}/trainer_state.json"))
    assert state["global_step"] == step
    assert "rng_state.pth" in store.list_files(f"checkpoints/checkpoint-{step}")
    reported = [e["uri"] for e in _events(events, "checkpoint")]
    assert reported[-1] == store.uri(f"checkpoints/checkpoint-{step}")


@pytest.mark.slow
def test_pod_entrypoint_sigterm_then_resume(s3, tmp_path, monkeypatch):  # noqa: F811
    """The same through the pod's entry point (`python -m kubetune_trainer --config job.yaml`, runner.py): SIGTERM
    -> checkpoint + exit 143 + a 'preempted' termination message; the next pod resumes and succeeds, and the
    published metrics.jsonl and manifest.json cover both pods (attempts.py); the step-0 evaluation runs once."""
    import yaml

    from kubetune_trainer import tiny

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3.new_bucket()
    data = tiny.generate_datasets(tmp_path / "data", n=200)
    steps = 150
    job = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "cpt-term", "namespace": "t"},
           "spec": {"stage": "cpt", "model": {"source": f"file://{tiny.cached_model()}"},
                    "dataset": {"format": "text", "train": [{"uri": f"file://{data['domain']}"}], "evalFraction": 0.05},
                    "adapter": {"type": "lora", "rank": 8},
                    "training": {"maxSteps": steps, "batchSize": 4, "maxLength": 48, "checkpointEverySteps": 50,
                                 "evalEverySteps": 50,
                                 "keepCheckpoints": 2, "logEverySteps": 1, "learningRate": 0.005},
                    "resources": {"gpus": 0},
                    "output": {"uri": f"s3://{bucket}/runs"}}}
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job))
    # No uid and no KUBETUNE_RUN_ID: the run id derives from the spec, so the second pod finds the first's run.
    from kubetune_trainer import runs
    from kubetune_api.finetunejob import parse_job

    store = runs.run_store(parse_job(job), runs.identify(parse_job(job)).run_id)
    assert store.root_uri.startswith(f"s3://{bucket}/runs/t/cpt-term/runs/spec-")

    def launch(name: str):
        env = _env(s3)
        # the endpoint reaches the trainer only as the operator renders it from the runtime: AWS_ENDPOINT_URL
        env["KUBETUNE_TERMINATION_LOG"] = str(tmp_path / f"{name}.termination.json")
        log = open(tmp_path / f"{name}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "kubetune_trainer", "--config", str(cfg), "--work-dir",
                              str(tmp_path / name)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        return p, tmp_path / name / "metrics.jsonl", tmp_path / f"{name}.log"

    def last_step(metrics: Path) -> int:
        return max([e.get("step", 0) for e in _events(metrics) if e.get("event") == "train"], default=0)

    p, metrics, log = launch("pod1")
    _wait_for(lambda: last_step(metrics) >= 7, 600, p, log, "step 7")
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = _wait(p, 60, log)
    print(f"runner: SIGTERM -> exit {rc} in {time.monotonic() - t0:.2f} s")
    assert rc == 143, log.read_text()[-3000:]
    term = json.loads((tmp_path / "pod1.termination.json").read_text())
    assert term["state"] == "preempted" and term["exitCode"] == 143
    rel = checkpointing.latest_checkpoint(store)
    step = checkpointing.checkpoint_step(rel)
    assert 7 <= step < steps and step % 50 != 0  # the SIGTERM checkpoint, not a scheduled one
    assert not store.exists("manifest.json")

    p2, metrics2, log2 = launch("pod2")
    assert _wait(p2, 600, log2) == 0, log2.read_text()[-3000:]
    assert "resuming at step" in log2.read_text()
    # the run tells its whole story: pod 1's steps (up to its checkpoint) then pod 2's, each step once
    events = _events(metrics2)
    trained = [e["step"] for e in events if e.get("event") == "train"]
    assert trained == list(range(1, steps + 1)), trained
    resumed = [e for e in events if e.get("event") == "resumed"]
    assert [(e["step"], e["attempt"]) for e in resumed] == [(step, 2)]
    evals = [e["step"] for e in events if e.get("event") == "eval"]
    assert evals.count(0) == 1, f"the step-0 baseline is not evaluated again on resume: {evals}"
    published = store.read_text("metrics.jsonl").splitlines()
    assert published == metrics2.read_text().splitlines()[:len(published)], "published: the run's lines so far"
    assert [e["step"] for e in map(json.loads, published) if e.get("event") == "train"] == trained
    manifest = json.loads(store.read_text("manifest.json"))
    assert manifest["resumedFrom"] == store.uri(f"checkpoints/checkpoint-{step}")
    attempts = manifest["attempts"]
    assert [(a["fromStep"], a["toStep"]) for a in attempts] == [(0, step), (step, steps)]
    assert manifest["wallSeconds"] == pytest.approx(sum(a["wallSeconds"] for a in attempts), abs=0.01)
    assert attempts[0]["wallSeconds"] > 0 and attempts[1]["wallSeconds"] > 0
    assert store.is_complete("adapter")
    assert checkpointing.latest_checkpoint(store) == f"checkpoints/checkpoint-{steps}"


# ------------------------------------------------------------------------------ store-level (no training)
def _fake_checkpoint(store: storage.OutputStore, step: int, tmp: Path, *, complete: bool) -> None:
    d = tmp / f"ck-{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    store.put_dir(d, f"checkpoints/checkpoint-{step}")
    if complete:
        store.mark_complete(f"checkpoints/checkpoint-{step}", {"step": step})


@pytest.fixture(params=["s3", "file"])
def store(request, tmp_path, monkeypatch):
    if request.param == "s3":
        server = request.getfixturevalue("s3")
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        return storage.OutputStore(f"s3://{server.new_bucket()}/runs/ns/j")
    return storage.OutputStore(f"file://{tmp_path}/out/ns/j")


def test_latest_skips_incomplete_and_prune_keeps_newest_complete(store, tmp_path):
    assert checkpointing.latest_checkpoint(store) is None
    for step, complete in ((3, False), (5, True), (10, True), (12, False), (15, True), (25, False)):
        _fake_checkpoint(store, step, tmp_path, complete=complete)
    assert checkpointing.latest_checkpoint(store) == "checkpoints/checkpoint-15"  # 25 is half-uploaded
    deleted = checkpointing.prune(store, keep=2)
    # complete 5 is beyond keep; partial 3 and 12 are older than the newest complete one; partial 25 may still
    # be in flight (or will be rewritten when training gets there)
    assert deleted == [3, 5, 12]
    assert store.list_dirs("checkpoints") == ["checkpoint-10", "checkpoint-15", "checkpoint-25"]
    assert checkpointing.complete_checkpoints(store) == [10, 15]


def test_download_checkpoint_verifies_against_marker(store, tmp_path):
    _fake_checkpoint(store, 5, tmp_path, complete=True)
    got = checkpointing.download_checkpoint(store, "checkpoints/checkpoint-5", tmp_path / "work")
    assert got == tmp_path / "work" / "resume" / "checkpoint-5"
    assert json.loads((got / "trainer_state.json").read_text()) == {"global_step": 5}
    # a file the marker lists has vanished from the store: refuse rather than resume from half a checkpoint
    store.delete_prefix("checkpoints/checkpoint-5/trainer_state.json")
    with pytest.raises(Exception, match="incompletely|nothing stored"):
        checkpointing.download_checkpoint(store, "checkpoints/checkpoint-5", tmp_path / "work")
    _fake_checkpoint(store, 7, tmp_path, complete=False)
    with pytest.raises(Exception, match="not a complete checkpoint"):
        checkpointing.download_checkpoint(store, "checkpoints/checkpoint-7", tmp_path / "work")


def test_prepare_resume_none_without_checkpoints(store, tmp_path):
    assert checkpointing.prepare_resume(store, tmp_path / "work") is None


def test_checkpoint_step_parsing():
    assert checkpointing.checkpoint_step("checkpoints/checkpoint-10") == 10
    assert checkpointing.checkpoint_step("s3://b/x/checkpoints/checkpoint-7/") == 7
    assert checkpointing.checkpoint_step("checkpoint-10.tmp-ab") is None


def test_raise_if_preempted():
    from kubetune_trainer.errors import PreemptedError

    checkpointing.reset_sigterm()
    checkpointing.raise_if_preempted()
    old = signal.getsignal(signal.SIGTERM)
    try:
        assert checkpointing.install_sigterm_handler()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert checkpointing.sigterm_received()
        with pytest.raises(PreemptedError) as ei:
            checkpointing.raise_if_preempted(step=3)
        assert ei.value.exit_code == 143
    finally:
        signal.signal(signal.SIGTERM, old)
        checkpointing.reset_sigterm()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        sys.exit(train_main(sys.argv[2:]))
    sys.exit(f"usage: python -m {__spec__.name if __spec__ else __name__} train --work W --store URI --events F")
