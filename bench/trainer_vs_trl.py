"""kubetune's trainer against calling TRL directly, on the same model, data, hyper-parameters and steps; and
packing's effect on throughput.

    .venv/bin/python bench/trainer_vs_trl.py                 # prints a table and writes bench/results/*.json
    .venv/bin/python bench/trainer_vs_trl.py --steps 60 --repeats 3

What is compared: the time of each optimizer step (a TrainerCallback stamps on_step_begin/on_step_end in both
runs), so model loading, dataset preparation and process start-up, which differ by design, are left out. Our run
has everything a pod has on: the Prometheus/progress server and its callback, the NaN guard, and checkpoints
every `--checkpoint-every` steps synced to the output store; the TRL run saves checkpoints at the same steps to
local disk. Runs alternate (ours, TRL, ours, TRL, ...) so drift in machine load hits both alike; the ratio is
of medians (checkpoint steps included in the mean, reported too).

Packing: the CPT stage with packing on vs off over one epoch of the same text; useful tokens per second =
non-padding tokens in the dataset / training time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer-image")]


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []
            self.first = self.last = None

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()
            self.first = self.first or self._t

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.durations.append(now - self._t)
            self.last = now

    return StepTimer()


def make_job(model: Path, data: Path, out: Path, *, stage="sft", fmt="chat", steps=40, packing=False,
             checkpoint_every=20, epochs=None):
    from kubetune_api.finetunejob import parse_job

    training = {"batchSize": 4, "maxLength": 64, "learningRate": 1e-3, "logEverySteps": 5,
                "evalEverySteps": 100000, "checkpointEverySteps": checkpoint_every, "packing": packing}
    if epochs:
        training["epochs"] = epochs
    else:
        training["maxSteps"] = steps
    return parse_job({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
                      "metadata": {"name": "bench", "namespace": "bench"},
                      "spec": {"stage": stage, "model": {"source": f"file://{model}"},
                               "dataset": {"format": fmt, "train": [{"uri": f"file://{data}"}], "evalFraction": 0.0},
                               "adapter": {"type": "lora", "rank": 8}, "training": training,
                               "resources": {"gpus": 0}, "output": {"uri": f"file://{out}"}}})


def run_ours(job, work: Path):
    from kubetune_trainer import config, runner

    timer = step_timer()
    settings = config.RunSettings(work_dir=work, metrics_host="127.0.0.1", metrics_port=0)
    report = runner.run(job, settings, extra_callbacks=[timer], console_logs=False)
    assert report.state == "succeeded", report
    return timer


def run_trl(model: Path, data: Path, work: Path, steps: int, checkpoint_every: int):
    """What a user would write with TRL alone for the same job (LoRA on all linear layers, rank 8, alpha 16,
    dropout 0.05 = kubetune's defaults; assistant-only loss on chat data)."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model)
    mdl = AutoModelForCausalLM.from_pretrained(model)
    ds = datasets.load_dataset("json", data_files=str(data), split="train")
    cfg = SFTConfig(output_dir=str(work), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                    max_length=64, logging_steps=5, save_strategy="steps", save_steps=checkpoint_every,
                    report_to=[], use_cpu=True, bf16=False, fp16=False, assistant_only_loss=True,
                    lr_scheduler_type="cosine", warmup_steps=0.03, seed=42, disable_tqdm=True)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    timer = step_timer()
    trainer = SFTTrainer(model=mdl, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft,
                         callbacks=[timer])
    trainer.train()
    return timer


def useful_tokens(model: Path, data: Path) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    n = 0
    for line in data.read_text().splitlines():
        n += len(tok(json.loads(line)["text"])["input_ids"]) + 1  # + EOS between documents
    return n


def main(argv=None) -> int:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    args = ap.parse_args(argv)

    from kubetune_trainer import tiny

    model = tiny.cached_model()
    tmp = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    data = tiny.generate_datasets(tmp / "data", n=400)
    ours, trl = [], []
    for r in range(args.repeats):
        job = make_job(model, data["chat"], tmp / f"out-{r}", steps=args.steps, checkpoint_every=args.checkpoint_every)
        ours.append(run_ours(job, tmp / f"work-ours-{r}"))
        trl.append(run_trl(model, data["chat"], tmp / f"work-trl-{r}", args.steps, args.checkpoint_every))

    def pooled(timers):
        # the first step of each run includes lazy initialisation in both stacks: leave it out
        return [d for t in timers for d in t.durations[1:]]

    o, t = pooled(ours), pooled(trl)
    result = {
        "steps_per_run": args.steps, "repeats": args.repeats,
        "ours_median_step_s": statistics.median(o), "trl_median_step_s": statistics.median(t),
        "ratio_median": statistics.median(o) / statistics.median(t),
        "ours_mean_step_s": statistics.mean(o), "trl_mean_step_s": statistics.mean(t),
        "ratio_mean": statistics.mean(o) / statistics.mean(t),
    }

    tokens = useful_tokens(model, data["domain"])
    packing = {}
    for packed in (False, True):
        timer = run_ours(make_job(model, data["domain"], tmp / f"out-pack-{packed}", stage="cpt", fmt="text",
                                  packing=packed, epochs=1, checkpoint_every=100000), tmp / f"work-pack-{packed}")
        seconds = sum(timer.durations)
        packing["packed" if packed else "unpacked"] = {"steps": len(timer.durations), "train_s": seconds,
                                                       "useful_tokens_per_s": tokens / seconds}
    packing["speedup"] = packing["packed"]["useful_tokens_per_s"] / packing["unpacked"]["useful_tokens_per_s"]
    result["packing"] = packing

    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "trainer_vs_trl.json").write_text(json.dumps(result, indent=2))
    print(f"step time, median: kubetune {result['ours_median_step_s']*1e3:.1f} ms, TRL {result['trl_median_step_s']*1e3:.1f} ms,"
          f" ratio {result['ratio_median']:.3f} (target <= 1.03); mean ratio {result['ratio_mean']:.3f}")
    print(f"packing (cpt, 1 epoch): {packing['unpacked']['steps']} -> {packing['packed']['steps']} steps, useful tokens/s "
          f"{packing['unpacked']['useful_tokens_per_s']:.0f} -> {packing['packed']['useful_tokens_per_s']:.0f} "
          f"(x{packing['speedup']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
