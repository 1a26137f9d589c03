"""`kubetune estimate` (kubetune_cli.estimate): exit codes and what it prints, torch-free.

    .venv/bin/python -m pytest tests/unit/test_estimate_cli.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from kubetune_cli import estimate

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples/multinode-deepspeed.yaml"
CONFIG_70B = REPO / "examples/model-configs/llama-3.3-70b.json"


def test_the_multinode_example_fits():
    code, text = estimate.run(str(EXAMPLE), str(CONFIG_70B))
    assert code == 0, text
    assert "fits: ~" in text and "optimizer (offloaded)" in text and "70.55 B" in text


def test_a_job_that_does_not_fit_exits_1_with_numbers_and_fixes(tmp_path):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"].pop("distributed")
    doc["spec"]["resources"]["nodes"] = 1
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(doc))
    code, text = estimate.run(str(m), str(CONFIG_70B), "80Gi")
    assert code == 1, text
    assert "does not fit: needs ~" in text and "have 80 (--gpu-memory): use " in text


def test_model_config_from_a_file_uri_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(CONFIG_70B, folder / "config.json")
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["model"]["source"] = f"file://{folder}"
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(doc))
    assert estimate.run(str(m))[0] == 0
    assert estimate.run(str(m), str(folder))[0] == 0  # a folder works for --model-config too


def test_unreadable_inputs_exit_2_and_say_what_to_pass(tmp_path):
    code, text = estimate.run(str(EXAMPLE))
    assert code == 2 and "s3://kubetune-models" in text and "--model-config" in text
    code, text = estimate.run(str(EXAMPLE), str(CONFIG_70B), "a lot")
    assert code == 2 and text.startswith("--gpu-memory")
    code, text = estimate.run(str(tmp_path / "missing.yaml"))
    assert code == 2 and "not a FineTuneJob manifest" in text
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "mystery"}))
    code, text = estimate.run(str(EXAMPLE), str(bad))
    assert code == 2 and "hidden_size" in text


def test_kubetune_estimate_subcommand_prints_and_returns_the_code(capsys):
    from kubetune_cli import app

    assert app.main(["estimate", str(EXAMPLE), "--model-config", str(CONFIG_70B)]) == 0
    assert "per GPU:" in capsys.readouterr().out
    assert app.main(["estimate", str(EXAMPLE)]) == 2
    assert "--model-config" in capsys.readouterr().err


def test_the_runtimes_gpu_memory_is_what_the_job_is_compared_with(tmp_path):
    """--runtime: the admin's gpu.memoryGiB (the same value the operator gives the trainer's pre-flight check)."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"].pop("distributed")
    doc["spec"]["resources"]["nodes"] = 1
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(doc))
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({"apiVersion": "kubetune.dev/v1alpha1", "kind": "ClusterFineTuneRuntime",
                                     "metadata": {"name": "small"},
                                     "spec": {"template": {"image": "t:1"}, "gpu": {"memoryGiB": 24}}}))
    code, text = estimate.run(str(m), str(CONFIG_70B), runtime=str(small))
    assert code == 1 and "have 24 (runtime gpu.memoryGiB)" in text, text
    code, text = estimate.run(str(EXAMPLE), str(CONFIG_70B), runtime=str(REPO / "examples/runtimes/cluster-h100.yaml"))
    assert code == 0 and "runtime gpu.memoryGiB" in text, text
    assert estimate.run(str(m), str(CONFIG_70B), runtime=str(EXAMPLE))[0] == 2  # not a runtime
