"""Bad inputs the trainer detects up front: every invalid setting exits 78 naming the field, every data problem
exits 65 naming the file and row, anything unexpected stays retriable (exit 1). Local manifests are parsed the
way the API server would parse them.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_bad_inputs.py -q
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kubetune_api.constants import ExitCode
from kubetune_trainer import config, data
from kubetune_trainer.errors import ConfigError, DataError

HEAD = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: m}
"""
SPEC = """\
spec:
  stage: sft
  model: {source: file:///models/x}
  dataset: {format: chat, train: [{uri: file:///data/chat.jsonl}]}
  output: {uri: file:///tmp/out}
"""


# ------------------------------------------------------------------------------------------------ YAML
@pytest.mark.parametrize("text, line, words", [
    (HEAD + SPEC + "  stage: dpo\n", 9, "duplicate key 'stage' (first at line 5)"),
    (HEAD + SPEC.replace("  output:", "  training: {seed: 1, seed: 2}\n  output:"), 8, "duplicate key 'seed'"),
    (HEAD.replace("metadata: {name: m}", "metadata: {name: m}\nmetadata: {name: n}"), 4, "duplicate key 'metadata'"),
])
def test_duplicate_keys_are_refused_with_the_line(text, line, words):
    with pytest.raises(ConfigError) as e:
        config.load_job_text(text, "job.yaml")
    assert words in str(e.value) and e.value.field == f"job.yaml line {line}", str(e.value)
    assert e.value.exit_code == ExitCode.CONFIG_ERROR


def test_an_alias_bomb_is_refused_quickly_and_small_aliases_work():
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    bomb = HEAD + SPEC + "x-bomb:\n" + "\n".join("  " + ln for ln in levels) + "\n"
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        config.load_job_text(bomb, "bomb.yaml")
    assert time.monotonic() - started < 2, "refused before expanding"
    assert "alias bomb" in str(e.value) and e.value.field.startswith("bomb.yaml line ")
    ok = HEAD + SPEC.replace("  output:", "  evaluation: {reference: &ref [{uri: file:///r.txt}]}\n  output:")
    assert config.load_job_text(ok).spec.evaluation.reference[0].uri == "file:///r.txt"


def test_recursive_alias_is_refused():
    with pytest.raises(ConfigError, match="recursive alias"):
        config.parse_yaml("a: &x\n  b: *x\n")


@pytest.mark.parametrize("text, field, words", [
    (HEAD.replace("v1alpha1", "v1") + SPEC, "apiVersion", "apiVersion is 'kubetune.dev/v1'"),
    (HEAD.replace("apiVersion: kubetune.dev/v1alpha1\n", "") + SPEC, "apiVersion", "apiVersion is None"),
    (HEAD.replace("FineTuneJob", "FinetuneJob") + SPEC, None, "holds no FineTuneJob"),
    (HEAD + SPEC + "  - oops\n", "job.yaml line 9", "not valid YAML"),
])
def test_api_version_kind_and_syntax(text, field, words):
    with pytest.raises(ConfigError) as e:
        config.load_job_text(text, "job.yaml")
    assert words in str(e.value) and e.value.field == field, str(e.value)


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("training, adapter, field", [
    ("{seed: 4294967296}", "", "spec.training.seed"),
    ("{seed: 100000000000000000000}", "", "spec.training.seed"),
    ("{}", "alpha: 0", "spec.adapter.alpha"),
    ("{}", "alpha: -8", "spec.adapter.alpha"),
    ("{}", "targetModules: []", "spec.adapter.targetModules"),
])
def test_settings_that_cannot_train_are_config_errors_naming_the_field(training, adapter, field):
    """Formerly accepted and failed late (a seed numpy refuses: a retriable ValueError, 4 pods) or never (an
    adapter with alpha 0 changes nothing; [] silently meant all-linear)."""
    text = HEAD + SPEC.replace("  output:", f"  training: {training}\n  adapter: {{type: lora, {adapter}}}\n  output:")
    with pytest.raises(ConfigError) as e:
        config.load_job_text(text, "job.yaml")
    assert e.value.field == field and e.value.exit_code == ExitCode.CONFIG_ERROR, str(e.value)


def test_a_bad_setting_in_the_pod_exits_78_with_the_field(tmp_path):
    """The pod's entry point: exit 78 (podFailurePolicy fails the Job at once), the field in the report."""
    import subprocess
    import sys

    from kubetune_api.report import TrainerReport

    job = tmp_path / "job.yaml"
    job.write_text(HEAD + SPEC.replace("  output:", "  training: {seed: 4294967296}\n  output:"))
    log = tmp_path / "termination-log"
    out = subprocess.run([sys.executable, "-m", "kubetune_trainer", "--config", str(job)], capture_output=True,
                         text=True, env={**__import__("os").environ, "KUBETUNE_TERMINATION_LOG": str(log)},
                         timeout=120)
    assert out.returncode == ExitCode.CONFIG_ERROR, out.stderr
    report = TrainerReport.parse(log.read_text())
    assert report.field == "spec.training.seed" and report.reason == "InvalidConfig"
    assert "Traceback" not in out.stderr


def test_largest_seed_is_fine():
    job = config.load_job_text(HEAD + SPEC.replace("  output:", f"  training: {{seed: {2 ** 32 - 1}}}\n  output:"))
    config.validate_job(job)


def test_unwritable_output_is_a_config_error(make_job, run_job, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    report = run_job(make_job(output={"uri": f"file://{blocker}/out"}))
    assert report.exit_code == ExitCode.CONFIG_ERROR and report.field == "spec.output.uri"
    assert f"cannot write to {blocker}/out" in report.message


def test_deepspeed_without_a_process_group_and_nccl_without_gpus(make_job, run_job, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    report = run_job(make_job(distributed={"deepspeed": {"zeroStage": 2}}))
    assert report.exit_code == ExitCode.CONFIG_ERROR and report.field == "spec.distributed.deepspeed"
    assert "torchrun" in report.message
    from kubetune_trainer import distributed

    if distributed.has_cuda():
        pytest.skip("this machine has GPUs: nccl is available")
    report = run_job(make_job(distributed={"backend": "nccl"}))
    assert report.exit_code == ExitCode.CONFIG_ERROR and report.field == "spec.distributed.backend"


def test_unexpected_errors_stay_retriable(make_job, run_job, monkeypatch):
    from kubetune_trainer import runner

    def boom(*a, **k):
        raise ValueError("something nobody foresaw")

    monkeypatch.setattr(runner, "_fetch_all", boom)
    report = run_job(make_job())
    assert report.exit_code == ExitCode.RETRIABLE and "something nobody foresaw" in report.message


@pytest.mark.parametrize("arg, expected", [("file:///abs/dir", Path("/abs/dir")), ("rel", Path("rel").resolve())])
def test_local_output_accepts_file_uris(arg, expected):
    assert config.local_output(arg) == expected


def test_local_output_refuses_remote_uris():
    with pytest.raises(ConfigError) as e:
        config.local_output("s3://bucket/x")
    assert e.value.field == "--output"


# ------------------------------------------------------------------------------------------------ data
def _chat(tmp_path: Path, rows: list) -> data.Source:
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data.Source("s3://bucket/chat.jsonl", f)


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("bad, words", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "row 3 has no assistant turn (roles: ['user'])"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}, "row 3 has no assistant"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     "row 3, message 1: role and content must be strings"),
])
def test_chat_rows_without_an_assistant_turn_are_data_errors(tmp_path, bad, words):
    from kubetune_api.finetunejob import DatasetSpec

    spec = DatasetSpec.model_validate({"format": "chat", "train": [{"uri": "s3://bucket/chat.jsonl"}]})
    with pytest.raises(DataError) as e:
        data.prepare(spec, [_chat(tmp_path, [GOOD, GOOD, bad, GOOD])])
    assert words in str(e.value) and e.value.field == "s3://bucket/chat.jsonl"
    assert e.value.exit_code == ExitCode.DATA_ERROR


# ------------------------------------------------------------------------------------------------ kubetune run
def _kubetune(*args: str, cwd: Path) -> "subprocess.CompletedProcess":
    import os
    import subprocess

    exe = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "kubetune"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KUBETUNE_METRICS_FINAL_SCRAPE_TIMEOUT": "0"}
    env.pop("KUBETUNE_WORK_DIR", None)
    return subprocess.run([str(exe), "run", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_kubetune_run_bad_manifest_last_line_names_the_line(tmp_path):
    bad = tmp_path / "dup.yaml"
    bad.write_text(HEAD + SPEC + "  stage: dpo\n")
    out = _kubetune(str(bad), "--output", f"file://{tmp_path}/out", cwd=tmp_path)
    assert out.returncode == ExitCode.CONFIG_ERROR
    last = out.stderr.strip().splitlines()[-1]
    assert f"{bad} line 9" in last and "duplicate key 'stage'" in last and "Traceback" not in out.stderr


def test_kubetune_run_unwritable_output_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = _kubetune(str(tmp_path / "missing.yaml"), "--output", str(blocker / "sub"), cwd=tmp_path)
    assert out.returncode == ExitCode.CONFIG_ERROR and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("kubetune: --output: cannot write to")


def test_summary_puts_the_failure_with_its_field_last():
    from kubetune_api.report import TrainerReport
    from kubetune_trainer.cli import summary

    report = TrainerReport(state="failed", reason="InvalidDataset", exit_code=65,
                           message="row 3 has no assistant turn", field="file:///d/chat.jsonl")
    last = summary(report, None).splitlines()[-1]
    assert last == ("kubetune: failed (InvalidDataset, exit 65): file:///d/chat.jsonl: row 3 has no assistant "
                    "turn")


@pytest.mark.slow
def test_kubetune_run_output_file_uri_writes_to_that_folder(tmp_path):
    """`--output file:///abs/dir` writes into /abs/dir, not into a folder named `file:` here."""
    dest = tmp_path / "results"
    out = _kubetune("--output", f"file://{dest}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (dest / "default").is_dir() and not (tmp_path / "file:").exists()


@pytest.mark.parametrize("local_rank, writes", [(0, True), (1, False)])
def test_each_pods_main_process_writes_its_own_report(make_job, run_job, monkeypatch, tmp_path, local_rank, writes):
    """Rank 0 is not the only pod of a multi-node gang: the first process of every other pod writes its report too,
    so kubetune_trainer.launch exits with the run's code there (not torchrun's 1 for any failed worker)."""
    from kubetune_api.report import TrainerReport
    from kubetune_trainer import runner

    def boom(*a, **k):
        raise ValueError("peer went away")

    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    monkeypatch.setenv("RANK", str(2 + local_rank))  # node rank 1 of a 2 x 2 gang
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(runner, "_fetch_all", boom)
    report = run_job(make_job())
    assert report.exit_code == ExitCode.RETRIABLE
    if writes:
        written = TrainerReport.parse(log.read_text())
        assert written.exit_code == ExitCode.RETRIABLE and "peer went away" in written.message
    else:
        assert not log.exists()
