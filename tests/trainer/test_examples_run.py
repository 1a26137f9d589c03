"""Every manifest in examples/ trains, as written, scaled to the tiny model: chained as the files chain them
(dpo/ppo/rloo start from `sft-support-bot/latest/merged`, the newest run's merged model, ppo/rloo score with
`reward-helpfulness/latest/adapter`),
column mappings, file types (parquet, folders of shards), custom reward code and evaluation settings kept.

What the test changes, and only that: s3:// models become the tiny model; s3:// datasets become tiny
generated files at the same keys (columns renamed back to the manifest's names, parquet where it says
.parquet); the output store is a local folder (so chained URIs still resolve); sizes shrink to 2 steps of tiny
batches; GPUs become CPU (no `distributed` block, galore's 8-bit optimizer -> galore_adamw, which needs no
CUDA). examples/rewards/my_rewards.py is the custom reward the GRPO example ships.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_examples_run.py -q
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from kubetune_trainer import tiny

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
RESULTS = "s3://kubetune-results/"
DATASETS = "s3://kubetune-datasets/"
# dataset format -> tiny.generate_datasets file
TINY = {"text": "domain", "chat": "chat", "prompt_completion": "prompt_completion", "preference": "preference",
        "unpaired_preference": "unpaired_preference", "prompt_only": "prompt_only"}
ROWS = 16


def _manifest(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _depends_on(m: dict) -> set[str]:
    """Names of the example jobs whose outputs this one reads (model source, reward models)."""
    spec = m["spec"]
    uris = [spec["model"]["source"]] + [v.get("rewardModel", "") for v in spec.get("training", {}).values()
                                        if isinstance(v, dict)]
    return {u[len(RESULTS):].split("/")[2] for u in uris if u.startswith(RESULTS)}


def _in_chain_order(paths: list[Path]) -> list[Path]:
    by_name = {_manifest(p)["metadata"]["name"]: p for p in paths}
    done: list[str] = []

    def visit(name: str):
        if name in done:
            return
        for dep in sorted(_depends_on(_manifest(by_name[name]))):
            assert dep in by_name, f"{by_name[name].name} starts from job {dep}, which no example defines"
            visit(dep)
        done.append(name)

    for name in sorted(by_name):
        visit(name)
    return [by_name[n] for n in done]


class Store:
    """Local stand-ins for the buckets the examples name."""

    def __init__(self, root: Path, tiny_model: Path, tiny_data: dict[str, Path]):
        self.root, self.model, self.data = root, tiny_model, tiny_data

    def results(self, uri: str) -> str:
        return f"file://{self.root}/kubetune-results/{uri[len(RESULTS):]}"

    def dataset(self, uri: str, fmt: str, columns: dict) -> str:
        """A tiny file (or folder) at the URI's key, in the manifest's column names."""
        key = uri[len(DATASETS):]
        dest = self.root / "kubetune-datasets" / key
        rows = [json.loads(line) for line in self.data[TINY[fmt]].read_text().splitlines()[:ROWS]]
        rename = {canon: src for canon, src in columns.items()}
        rows = [{rename.get(k, k): v for k, v in r.items()} for r in rows]
        if key.endswith("/"):  # a folder of shards
            dest.mkdir(parents=True, exist_ok=True)
            for i in range(2):
                (dest / f"shard-{i:03d}.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in rows[i::2]))
        elif key.endswith(".parquet"):
            import pandas as pd

            dest.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_parquet(dest)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f"file://{dest}"

    def file(self, uri: str, local: Path) -> str:
        dest = self.root / "kubetune-datasets" / uri[len(DATASETS):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local, dest)
        return f"file://{dest}"


def scaled(m: dict, store: Store) -> dict:
    m = copy.deepcopy(m)
    m["metadata"].setdefault("namespace", "default")
    spec = m["spec"]
    spec.pop("suspend", None)
    src = spec["model"]["source"]
    spec["model"]["source"] = store.results(src) if src.startswith(RESULTS) else f"file://{store.model}"
    d = spec["dataset"]
    cols = d.get("columns", {})
    for key in ("train", "eval"):
        for s in d.get(key, []) or []:
            s["uri"] = store.dataset(s["uri"], d["format"], cols)
    ev = spec.get("evaluation") or {}
    for s in ev.get("reference", []) or []:
        s["uri"] = f"file://{store.data['general']}"
    if ev.get("reference"):
        ev["referenceMaxSamples"] = 4
    t = spec.setdefault("training", {})
    t.pop("epochs", None)
    t.update({"maxSteps": 2, "batchSize": min(t.get("batchSize", 4), 4), "maxLength": 64,
              "gradientAccumulationSteps": 1, "logEverySteps": 1})
    for stage in ("grpo", "rloo", "ppo"):
        if stage in t:
            t[stage]["maxCompletionLength"] = 8
            if "numGenerations" in t[stage]:
                t[stage]["numGenerations"] = min(t[stage]["numGenerations"], 4)
            if "rewardModel" in t[stage]:
                t[stage]["rewardModel"] = store.results(t[stage]["rewardModel"])
            for r in t[stage].get("rewards", []):
                if r.get("source"):
                    r["source"] = store.file(r["source"], REPO / "examples" / "rewards" / Path(r["source"]).name)
    g = spec.get("adapter", {}).get("galore")
    if g and "8bit" in g.get("optimizer", ""):
        g["optimizer"] = "galore_adamw"  # the 8-bit variant needs CUDA
    spec.pop("distributed", None)
    res = spec.setdefault("resources", {})
    for k in ("nodes", "nodeSelector", "priorityClassName"):
        res.pop(k, None)
    res["gpus"] = 0
    spec["output"]["uri"] = store.results(spec["output"]["uri"])
    spec["output"].pop("credentials", None)  # a local folder needs none
    return m


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_module, tiny_data_module):
    """Every example, run in chain order; returns {file name: (scaled manifest, TrainerReport)}."""
    from kubetune_api.finetunejob import parse_job
    from kubetune_trainer import config, runner

    root = tmp_path_factory.mktemp("examples")
    store = Store(root, tiny_model_module, tiny_data_module)
    out = {}
    for path in _in_chain_order(EXAMPLES):
        m = scaled(_manifest(path), store)
        settings = config.RunSettings(work_dir=root / "work" / path.stem, metrics_host="127.0.0.1", metrics_port=0)
        out[path.name] = (m, runner.run(parse_job(m), settings, console_logs=False))
    return out


@pytest.fixture(scope="module")
def tiny_model_module():
    return tiny.cached_model()


@pytest.fixture(scope="module")
def tiny_data_module(tmp_path_factory):
    return tiny.generate_datasets(tmp_path_factory.mktemp("tiny-data"), n=ROWS)


def test_chain_order_puts_producers_first():
    names = [_manifest(p)["metadata"]["name"] for p in _in_chain_order(EXAMPLES)]
    for consumer in ("dpo-helpfulness", "ppo-helpfulness", "rloo-helpfulness"):
        assert names.index("sft-support-bot") < names.index(consumer)
    for consumer in ("ppo-helpfulness", "rloo-helpfulness"):
        assert names.index("reward-helpfulness") < names.index(consumer)


@pytest.mark.parametrize("name", [p.name for p in EXAMPLES])
def test_example_runs_as_written(chain, name):
    m, report = chain[name]
    assert report.state == "succeeded", f"{name}: {report.reason} {report.field}: {report.message}"
    job_dir = Path(m["spec"]["output"]["uri"][len("file://"):]) / "default" / m["metadata"]["name"]
    # the job's newest run, as its runs.json index names it (what `.../<job>/latest/...` URIs resolve to)
    out = job_dir / "runs" / json.loads((job_dir / "runs.json").read_text())["latest"]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["steps"] == 2
    # Each stage reports its own headline, and a perplexity only where the loss is a token NLL.
    stage = m["spec"]["stage"]
    headline = {"cpt": "perplexity", "sft": "perplexity", "dpo": "reward_accuracy", "orpo": "reward_accuracy",
                "reward": "reward_accuracy", "kto": "reward_margin", "grpo": "mean_reward", "rloo": "mean_reward",
                "ppo": "mean_reward"}[stage]
    assert headline in metrics, (name, sorted(metrics))
    assert ("perplexity" in metrics) == (stage in ("cpt", "sft")), name
    assert (out / "adapter" / "_COMPLETE").exists()
    if m["spec"]["output"].get("mergedModel"):
        assert report.artifacts.merged_model_uri
