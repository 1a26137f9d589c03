"""The `kubetune` CLI, the pod entry point (`python -m kubetune_trainer`) and manifest loading (config.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_cli.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_trainer import cli, config
from kubetune_trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
KUBETUNE = REPO / ".venv" / "bin" / "kubetune"


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KUBETUNE_METRICS_FINAL_SCRAPE_TIMEOUT": "0"})
    e.pop("KUBETUNE_WORK_DIR", None)
    e.update(extra)
    return e


MANIFEST = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: m}
spec:
  stage: sft
  model: {source: file:///models/x}
  dataset: {format: chat, train: [{uri: file:///data/chat.jsonl}]}
  training: {learningRate: %s}
  output: {uri: file:///tmp/out}
"""


# ------------------------------------------------------------------------------------------------ config
def test_pydantic_errors_name_the_camelcase_field():
    with pytest.raises(ConfigError) as e:
        config.load_job_text(MANIFEST % "-1")
    assert e.value.field == "spec.training.learningRate"
    assert str(e.value).startswith("spec.training.learningRate: Input should be greater than 0")


def test_unknown_fields_and_list_indexes_in_the_path():
    text = MANIFEST.replace("file:///data/chat.jsonl", "ftp://x").replace("{learningRate: %s}", "{lerningRate: 1}")
    with pytest.raises(ConfigError) as e:
        config.load_job_text(text)
    assert e.value.field == "spec.dataset.train[0].uri"
    assert "spec.training.lerningRate: unknown field" in str(e.value)


def test_multi_document_yaml_takes_the_finetunejob(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n" + MANIFEST % "0.001")
    job = config.load_job(p)
    assert job.metadata.name == "m" and job.spec.training.learning_rate == 0.001
    with pytest.raises(ConfigError, match="no FineTuneJob"):
        config.load_job_text("kind: Secret\n")
    with pytest.raises(ConfigError, match="cannot read"):
        config.load_job(tmp_path / "missing.yaml")


def test_validate_job_repeats_what_cel_checks():
    job = config.load_job_text((MANIFEST % "0.001").replace("stage: sft", "stage: dpo"))
    with pytest.raises(ConfigError) as e:
        config.validate_job(job)
    assert e.value.field == "spec.dataset.format" and "preference" in e.value.message


def test_run_settings_from_env_and_job_identity():
    s = config.RunSettings.from_env({"KUBETUNE_WORK_DIR": "/var/lib/kubetune", "KUBETUNE_METRICS_PORT": "9400",
                                     "KUBETUNE_METRICS_HOST": "10.0.0.7", "KUBETUNE_JOB_NAME": "real",
                                     "KUBETUNE_NAMESPACE": "team-a", "KUBETUNE_TERMINATION_LOG": "/dev/termination-log"})
    assert (s.work_dir, s.metrics_port, s.metrics_host) == (Path("/var/lib/kubetune"), 9400, "10.0.0.7")
    assert s.cache_dir == Path("/var/lib/kubetune/cache") and s.termination_log == Path("/dev/termination-log")
    job = config.apply_settings(config.load_job_text(MANIFEST % "0.001"), s)
    assert (job.metadata.name, job.metadata.namespace) == ("real", "team-a")
    with pytest.raises(ConfigError):
        config.RunSettings.from_env({"KUBETUNE_METRICS_PORT": "http"})


# ------------------------------------------------------------------------------------------------ cli
def test_help_does_not_import_torch():
    code = ("import sys\nfrom kubetune_trainer import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env(),
                         timeout=60)
    assert "run" in out.stdout and "tiny" in out.stdout
    assert "HEAVY []" in out.stdout, out.stdout


def test_example_file_is_the_embedded_default_job():
    assert (REPO / "examples" / "local" / "sft-lora.yaml").read_text() == cli.DEFAULT_JOB


def test_local_variables_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_TINY_CACHE", str(tmp_path / "no-model-here"))  # must not build a model
    text = cli.expand_local_vars("out: file://${KUBETUNE_OUTPUT}/x\ndata: ${KUBETUNE_TINY_DATA}\n", tmp_path)
    assert f"out: file://{tmp_path}/x" in text and f"data: {tmp_path}/.tiny-data" in text
    assert (tmp_path / ".tiny-data" / "chat.jsonl").exists()
    with pytest.raises(ConfigError, match="KUBETUNE_NOPE"):
        cli.expand_local_vars("x: ${KUBETUNE_NOPE}", tmp_path)


def test_tiny_data_subcommand(tmp_path):
    assert cli.main(["tiny", "data", str(tmp_path / "d"), "--n", "5"]) == 0
    lines = (tmp_path / "d" / "preference.jsonl").read_text().splitlines()
    assert len(lines) == 5 and set(json.loads(lines[0])) == {"prompt", "chosen", "rejected"}


def test_bad_manifest_exits_78_with_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFEST % "-1")
    out = subprocess.run([str(KUBETUNE), "run", str(bad), "--output", str(tmp_path / "o")], capture_output=True,
                         text=True, cwd=tmp_path, env=env(), timeout=120)
    assert out.returncode == 78
    assert "spec.training.learningRate" in out.stderr


def test_pod_entry_point_writes_the_termination_message(tmp_path):
    from kubetune_api.report import TrainerReport

    bad = tmp_path / "job.yaml"
    bad.write_text(MANIFEST % "-1")
    log = tmp_path / "termination-log"
    out = subprocess.run([sys.executable, "-m", "kubetune_trainer", "--config", str(bad)], capture_output=True,
                         text=True, cwd=tmp_path, env=env(KUBETUNE_TERMINATION_LOG=str(log)), timeout=120)
    assert out.returncode == 78, out.stderr
    report = TrainerReport.parse(log.read_text())
    assert report.state == "failed" and report.reason == "InvalidConfig" and report.exit_code == 78
    assert report.field == "spec.training.learningRate"


@pytest.mark.slow
def test_default_job_runs_end_to_end_twice(tmp_path):
    """README command 1: `kubetune run` with no arguments, no cluster, nothing downloaded. Run twice: two complete
    runs side by side, the second from step 0 (never resuming the first one's finished checkpoint: 81/80)."""
    job_dir = tmp_path / "kubetune-output" / "default" / "sft-lora-local"
    outs = []
    for _ in range(2):
        out = subprocess.run([str(KUBETUNE), "run"], capture_output=True, text=True, cwd=tmp_path, env=env(),
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        outs.append(out)
    ids = sorted(p.name for p in (job_dir / "runs").iterdir())
    assert len(ids) == 2
    index = json.loads((job_dir / "runs.json").read_text())
    assert [r["runId"] for r in index["runs"]] == ids and index["latest"] == ids[1]  # ids sort by start time
    for run_id, out in zip(ids, outs):
        result = job_dir / "runs" / run_id
        for name in ("manifest.json", "metrics.jsonl", "curves.png", "README.md", "adapter/adapter_model.safetensors",
                     "adapter/adapter_config.json", "adapter/tokenizer.json", "adapter/_COMPLETE"):
            assert (result / name).is_file(), name
        assert (result / "checkpoints" / "checkpoint-80" / "_COMPLETE").exists()
        summary = out.stdout
        assert "succeeded" in summary and "eval PPL" in summary and "forgetting" in summary
        assert f"kubetune-output/default/sft-lora-local/runs/{run_id}/adapter" in summary
        assert f"run          {run_id}" in summary
        m = json.loads((result / "manifest.json").read_text())
        assert m["run"]["id"] == run_id and m["resumedFrom"] is None
        assert m["metrics"]["steps"] == 80
        assert m["metrics"]["eval_loss"] < 0.6 * m["metrics"]["first_eval_loss"]  # it learned
        assert m["forgetting"]["exceeded"] is False
        # each run trained from step 0 to 80 on its own: its metrics.jsonl starts at step 1 and ends at 80
        steps = [json.loads(line).get("step") for line in (result / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line).get("event") == "train"]
        assert min(steps) == 1 and max(steps) == 80
        # no TTY: plain progress lines on stderr, no tqdm bars
        assert "train: 80/80" in out.stderr and "81/80" not in out.stderr and "it/s]" not in out.stderr


def test_rl_progress_prints_reward_and_kl_next_to_the_loss(tmp_path):
    """A GRPO run's console lines (the non-terminal form of `kubetune run`'s progress) show the mean reward and
    the KL, which say whether RL learns; its loss alone does not."""
    import io

    from tests.trainer import stage_helpers as H

    _, _, trainer = H.build("grpo", "lora", tmp_path / "run", n_train=8,
                            training={"batchSize": 2, "maxSteps": 2, "logEverySteps": 1},
                            stage_block={"numGenerations": 2, "maxCompletionLength": 6, "beta": 0.1,
                                         "rewards": [{"name": "length_penalty",
                                                      "params": {"target": "0", "unit": "chars"}}]})
    stream = io.StringIO()
    progress = cli._Progress(stream)
    trainer.add_callback(progress.callback())
    trainer.train()
    lines = [ln for ln in stream.getvalue().splitlines() if ln.startswith("train: ") and "loss" in ln]
    logged = [e for e in trainer.state.log_history if "reward" in e]
    assert len(lines) == len(logged) == 2
    for line, entry in zip(lines, logged):
        assert f"reward {entry['reward']:.4g}" in line and f"kl {entry['kl']:.4g}" in line, line
