"""The adapter table: the same SFT and CPT jobs run by kubetune's runner with full fine-tuning, LoRA, DoRA, QLoRA
and GaLore on one base model, measured side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/adapter_table.py                     # "memory": ~115 M random-init Llama
    OMP_NUM_THREADS=1 .venv/bin/python bench/adapter_table.py --config forgetting # tiny pre-trained base, long runs
    .venv/bin/python bench/adapter_table.py --tasks sft --adapters full lora --steps 4   # a subset

Two configurations, because one model cannot show both claims on a CPU:
- `memory` (default): a ~115 M-parameter Llama built from a config (random init, the tiny byte-level BPE tokenizer)
  so that weights, gradients and optimizer state dominate the process's memory, trained a few steps. What it
  measures: trainable parameters, peak RSS, optimizer-state bytes and step time. Its losses say little (a random
  base learns little in a few steps).
- `forgetting`: the tiny pre-trained Llama (`tiny.cached_model()`, ~150 k parameters, already models the
  "general" text) trained long enough to learn the new domain. What it measures: eval loss on the new domain
  against the rise of reference-set perplexity, per adapter ("learns less, forgets less").

Every arm is one `runner.run` of a FineTuneJob (the path a pod walks: data preparation, adapters, checkpoints to
a file:// output store, final evaluation, the forgetting check on `evaluation.reference`, artifacts) in a fresh
subprocess, so that the peak RSS of one arm (getrusage ru_maxrss of that process) is not the high-water mark of
another. Per arm it records:
- trainable / total parameters: counted by this script, 4-bit weights as the parameters they hold (2 per byte
  of packed storage), not as storage elements;
- RSS after the model is loaded and wrapped (train begin) and the peak RSS of the whole run; on a GPU also
  torch.cuda.max_memory_allocated;
- optimizer-state bytes: every tensor in the optimizer's state at the end of training (GaLore's projection
  matrices included);
- median optimizer-step time (on_step_begin -> on_step_end, first step left out: lazy initialisation);
- final eval loss and perplexity on the task's held-out split, and the runner's reference-set perplexity before
  and after training (its relative change is the forgetting).
Arms run one after another in the order given (tasks outer, adapters inner); each is a single run: this is a
table of what each method costs, not a speed race between two stacks, so no repeats (`--repeats N` runs each
arm N times, alternating, and reports the median and the range of the step time and RSS).

Results: bench/results/adapter_table-<config>.json and a markdown table on stdout (docs/adapters.md holds one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer-image")]

ADAPTERS = ["full", "lora", "dora", "qlora", "galore"]
TASKS = ["sft", "cpt"]

CONFIGS = {
    # hidden/intermediate multiples of 64 (bitsandbytes 4-bit kernels on CPU); vocab = the tiny tokenizer's.
    "memory": {"model": {"hidden_size": 768, "intermediate_size": 2048, "num_layers": 16, "num_heads": 12},
               "steps": 5, "batch": 4, "max_length": 64, "lr": {"full": 1e-4, "galore": 1e-4, "default": 1e-3},
               "n": 200, "eval": 8, "reference": 8},
    "forgetting": {"model": None, "steps": 150, "batch": 8, "max_length": 64,
                   "lr": {"full": 1e-3, "galore": 1e-3, "default": 2e-3}, "n": 1600, "eval": 64,
                   "reference": 64},
}


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), a 4-bit weight counted as the parameters it holds, not its packed storage."""
    trainable = total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        n = int(qs.shape.numel()) if qs is not None and getattr(qs, "shape", None) is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def optimizer_state_bytes(optimizer) -> int:
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    seen: set[int] = set()

    def walk(obj) -> int:
        if isinstance(obj, torch.Tensor):
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, type):  # GaLore's projector keeps its matrix here
            return sum(walk(v) for v in vars(obj).values())
        return 0

    return sum(walk(s) for s in inner.state.values())


def probe():
    import torch
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []
            self.out: dict = {}

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.out["trainable"], self.out["total"] = count_parameters(model)
            self.out["rss_train_begin_mb"] = rss_now_mb()

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self._t)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if metrics and "eval_loss" in metrics:
                self.out["eval_loss"] = metrics["eval_loss"]

        def on_train_end(self, args, state, control, optimizer=None, **kw):
            self.out["optimizer_state_bytes"] = optimizer_state_bytes(optimizer) if optimizer is not None else None
            if torch.cuda.is_available():
                self.out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20

    return Probe()


# ------------------------------------------------------------------------------------------------ one arm
def make_job(cfg: dict, task: str, adapter: str, model: Path, data: dict, out: Path, steps: int):
    from kubetune_api.finetunejob import parse_job

    lr = cfg["lr"].get(adapter, cfg["lr"]["default"])
    training = {"maxSteps": steps, "batchSize": cfg["batch"], "maxLength": cfg["max_length"], "learningRate": lr,
                "logEverySteps": max(1, steps // 4), "evalEverySteps": 100000, "checkpointEverySteps": steps,
                "warmupRatio": 0.0, "lrScheduler": "constant"}
    fmt, train = ("chat", data["chat"]) if task == "sft" else ("text", data["domain"])
    adapter_spec = {"type": adapter}
    if adapter in ("lora", "dora", "qlora"):
        adapter_spec.update(rank=16)
    return parse_job({
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": f"{task}-{adapter}", "namespace": "bench"},
        "spec": {"stage": task, "model": {"source": f"file://{model}"},
                 "dataset": {"format": fmt, "train": [{"uri": f"file://{train}"}], "evalFraction": cfg["eval"] / cfg["n"]},
                 "adapter": adapter_spec, "training": training, "resources": {"gpus": 0},
                 "evaluation": {"reference": [{"uri": f"file://{data['general']}"}],
                                "referenceMaxSamples": cfg["reference"], "forgettingThreshold": 100.0},
                 "output": {"uri": f"file://{out}"}}})


def run_arm(config: str, task: str, adapter: str, model: Path, data_dir: Path, work: Path, steps: int) -> dict:
    """In this (fresh) process: one runner.run; returns the measurements."""
    from kubetune_trainer import config as kconfig
    from kubetune_trainer import runner

    cfg = CONFIGS[config]
    data = {p.stem: p for p in data_dir.glob("*.jsonl")}
    job = make_job(cfg, task, adapter, model, data, work / "out", steps)
    p = probe()
    settings = kconfig.RunSettings(work_dir=work / "work", metrics_host="127.0.0.1", metrics_port=0)
    t0 = time.perf_counter()
    report = runner.run(job, settings, extra_callbacks=[p], console_logs=False)
    wall = time.perf_counter() - t0
    if report.state != "succeeded":
        return {"task": task, "adapter": adapter, "error": f"{report.reason}: {report.message}"}
    f = report.forgetting
    return {"task": task, "adapter": adapter, **p.out, "wall_s": wall,
            "median_step_s": statistics.median(p.steps[1:] or p.steps),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ref_ppl_before": f.reference_perplexity_before if f else None,
            "ref_ppl_after": f.reference_perplexity_after if f else None,
            "forgetting": f.relative_change if f else None}


# ------------------------------------------------------------------------------------------------ table
def base_model(config: str, root: Path) -> Path:
    from kubetune_trainer import tiny

    spec = CONFIGS[config]["model"]
    if spec is None:
        return tiny.cached_model()
    # Random init (pretrain_steps=0): a few hundred pre-training steps of a 115 M model take hours on a CPU.
    return tiny.cached_model(cache_dir=root, pretrain_steps=0, **spec)


def fmt_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['task']} | {r['adapter']} | failed: {r['error'][:80]} |" + " |" * 8
    mb = lambda b: f"{b / 2**20:.0f}" if b is not None else "-"  # noqa: E731
    import math

    ppl = math.exp(r["eval_loss"]) if r.get("eval_loss") is not None and r["eval_loss"] < 50 else float("inf")
    forget = f"{100 * r['forgetting']:+.1f} %" if r.get("forgetting") is not None else "-"
    return (f"| {r['task']} | {r['adapter']} | {r['trainable'] / 1e6:.2f} M ({100 * r['trainable'] / r['total']:.2f} %) "
            f"| {r['rss_train_begin_mb']:.0f} | {r['peak_rss_mb']:.0f}"
            f"{' / ' + format(r['cuda_max_allocated_mb'], '.0f') if r.get('cuda_max_allocated_mb') else ''} "
            f"| {mb(r.get('optimizer_state_bytes'))} | {1e3 * r['median_step_s']:.0f} "
            f"| {r.get('eval_loss', float('nan')):.3f} / {ppl:.1f} "
            f"| {r['ref_ppl_before']:.2f} -> {r['ref_ppl_after']:.2f} ({forget}) |")


HEADER = ("| task | adapter | trainable (% of total) | RSS at train start, MB | peak RSS, MB | optimizer state, MB "
          "| median step, ms | eval loss / PPL | reference PPL before -> after (change) |\n"
          "|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("KUBETUNE_METRICS_FINAL_SCRAPE_TIMEOUT", "0")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="memory")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=TASKS)
    ap.add_argument("--adapters", nargs="+", choices=ADAPTERS, default=ADAPTERS)
    ap.add_argument("--steps", type=int, help="optimizer steps per arm (default: the config's)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--lr", type=float, help="learning rate of every arm (default: the config's, per adapter)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache/kubetune/bench"))
    ap.add_argument("--arm", nargs=2, metavar=("TASK", "ADAPTER"), help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    if args.lr:
        cfg["lr"] = {"default": args.lr}
    steps = args.steps or cfg["steps"]

    if args.arm:
        result = run_arm(args.config, *args.arm, Path(args.model), Path(args.data), Path(args.work), steps)
        print("RESULT " + json.dumps(result))
        return 0

    from kubetune_trainer import tiny

    model = base_model(args.config, Path(args.cache))
    tmp = Path(tempfile.mkdtemp(prefix="kubetune-adapters-"))
    data_dir = tmp / "data"
    tiny.generate_datasets(data_dir, n=cfg["n"])
    from transformers import AutoConfig

    print(f"config {args.config}: base {model} ({AutoConfig.from_pretrained(model).num_hidden_layers} layers), "
          f"{steps} steps, batch {cfg['batch']}, max length {cfg['max_length']}", flush=True)
    runs: dict[tuple, list[dict]] = {}
    for rep in range(args.repeats):
        order = [(t, a) for t in args.tasks for a in args.adapters]
        for task, adapter in (order if rep % 2 == 0 else order[::-1]):  # alternate so drift hits every arm
            t0 = time.time()
            proc = subprocess.run(
                [sys.executable, __file__, "--config", args.config, "--steps", str(steps), "--arm", task, adapter,
                 *(["--lr", str(args.lr)] if args.lr else []),
                 "--model", str(model), "--data", str(data_dir), "--work", str(tmp / f"{task}-{adapter}-{rep}")],
                capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            r = json.loads(line[7:]) if line else {"task": task, "adapter": adapter,
                                                   "error": f"exit {proc.returncode}: {proc.stderr[-300:]}"}
            runs.setdefault((task, adapter), []).append(r)
            print(f"  {task}/{adapter} rep {rep}: {time.time() - t0:.0f} s"
                  + (f" ERROR {r['error']}" if "error" in r else f", peak RSS {r['peak_rss_mb']:.0f} MB, "
                     f"step {1e3 * r['median_step_s']:.0f} ms"), flush=True)

    rows = []
    for (task, adapter), rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append(rs[0])
            continue
        r = dict(ok[0])
        for k in ("median_step_s", "peak_rss_mb"):
            vals = [x[k] for x in ok]
            r[k] = statistics.median(vals)
            r[k + "_range"] = [min(vals), max(vals)]
        rows.append(r)
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"adapter_table-{args.config}{f'-lr{args.lr:g}' if args.lr else ''}.json").write_text(json.dumps(
        {"config": args.config, "steps": steps, "settings": cfg, "argv": sys.argv[1:], "rows": rows}, indent=2))
    print()
    print(HEADER)
    for r in rows:
        print(fmt_row(r))
    if args.repeats > 1:
        print("\nspread over repeats (min-max): " + "; ".join(
            f"{r['task']}/{r['adapter']} step {1e3 * r['median_step_s_range'][0]:.0f}-{1e3 * r['median_step_s_range'][1]:.0f} ms"
            for r in rows if "median_step_s_range" in r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
