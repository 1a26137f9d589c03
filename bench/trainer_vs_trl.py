"""kubetune's trainer against calling TRL directly, on the same model, data, settings and steps; and packing's
effect on throughput.

    .venv/bin/python bench/trainer_vs_trl.py                 # prints a table and writes bench/results/*.json
    .venv/bin/python bench/trainer_vs_trl.py --steps 60 --repeats 4 --skip-packing

What is compared (an SFT LoRA job on chat data with the tiny model, 40 steps, checkpoints every 20):
- `train()`: the wall time of the whole `SFTTrainer.train()` call in both arms (the same class-level timer wraps
  it), so logging, checkpoint saves and - in our arm - the checkpoint sync to the output store and the metrics
  callbacks are inside it;
- end to end: our `runner.run` (data preparation, model load, train, final save, artifacts with the merged-free
  adapter, manifest) against the TRL script (load tokenizer/model/dataset, build the trainer, train, save_model);
- the median optimizer step (on_step_begin -> on_step_end), first step of each run left out.
Settings are matched, not assumed: the TRL arm states every TrainingArguments/SFTConfig value our runner sets
(TRL's own defaults differ: gradient checkpointing on, bf16 on, logging every 10 steps, the NaN/inf log filter,
token counting, checkpoint limits ...), and the bench compares the two trainers' effective arguments
(`args.to_dict()`, captured at train begin) and prints every field that still differs - run-specific paths
aside - so a new default on either side shows up instead of skewing the ratio. The LoRA config is the same
(rank 8, alpha 16, dropout 0.05, all linear layers), the collator and tokenization are TRL's in both arms.
Arms alternate and swap order every repeat (ours, TRL, TRL, ours, ...) so drift in machine load hits both alike;
each ratio is ours / TRL of medians over the repeats of this one invocation, and the spread (min-max) of each arm
is printed next to it.

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


class TrainTimer:
    """Wraps SFTTrainer.train at class level while an arm runs: the same measurement for both stacks."""

    def __init__(self):
        self.seconds: list[float] = []

    def __enter__(self):
        from trl import SFTTrainer

        self._orig = SFTTrainer.train
        timer = self

        def timed(trainer, *a, **kw):
            t = time.perf_counter()
            try:
                return timer._orig(trainer, *a, **kw)
            finally:
                timer.seconds.append(time.perf_counter() - t)

        SFTTrainer.train = timed
        return self

    def __exit__(self, *exc):
        from trl import SFTTrainer

        SFTTrainer.train = self._orig


def args_capture():
    from transformers import TrainerCallback

    class ArgsCapture(TrainerCallback):
        args: dict = {}

        def on_train_begin(self, args, state, control, **kw):
            self.args = args.to_dict()

    return ArgsCapture()


# Differ by design between two runs of anything (paths, names), not settings.
RUN_SPECIFIC = {"output_dir", "logging_dir", "run_name", "hub_model_id", "trackio_space_id", "project"}


def args_diff(ours: dict, trl: dict) -> dict:
    keys = (set(ours) | set(trl)) - RUN_SPECIFIC
    return {k: [ours.get(k), trl.get(k)] for k in sorted(keys) if ours.get(k) != trl.get(k)}


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
    """(step timer, train() seconds, end-to-end seconds, effective args). Console logs on, as in a pod (the TRL
    arm keeps its PrinterCallback too)."""
    from kubetune_trainer import config, runner

    timer, capture = step_timer(), args_capture()
    settings = config.RunSettings(work_dir=work, metrics_host="127.0.0.1", metrics_port=0)
    t0 = time.perf_counter()
    with TrainTimer() as tt:
        report = runner.run(job, settings, extra_callbacks=[timer, capture], console_logs=True)
    total = time.perf_counter() - t0
    assert report.state == "succeeded", report
    return timer, (tt.seconds[0] if tt.seconds else None), total, capture.args


def run_trl(model: Path, data: Path, work: Path, steps: int, checkpoint_every: int):
    """What a user would write with TRL alone for the same job, every setting that our runner sets stated
    (training_args.build + the sft stage + kubetune's LoRA defaults). Returns what run_ours returns."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model)
    mdl = AutoModelForCausalLM.from_pretrained(model)
    ds = datasets.load_dataset("json", data_files=str(data), split="train")
    cfg = SFTConfig(
        output_dir=str(work / "checkpoints"), max_steps=steps, num_train_epochs=1.0, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.03,
        weight_decay=0.0, max_grad_norm=1.0, seed=42, data_seed=42,
        gradient_checkpointing=False,  # TRL's default is True: ~1.3x the compute per step
        use_cpu=True, bf16=False, fp16=False,  # TRL's default is bf16=True
        logging_strategy="steps", logging_steps=5, logging_first_step=True, logging_nan_inf_filter=False,
        include_num_input_tokens_seen=True, eval_strategy="no", save_strategy="steps", save_steps=checkpoint_every,
        save_total_limit=2, save_only_model=False, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, max_length=64, packing=False, dataset_text_field="text",
        assistant_only_loss=True)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM",
                      bias="none")
    timer, capture = step_timer(), args_capture()
    trainer = SFTTrainer(model=mdl, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft,
                         callbacks=[timer, capture])
    with TrainTimer() as tt:
        trainer.train()
    trainer.save_model(str(work / "final"))
    tok.save_pretrained(str(work / "final"))
    return timer, tt.seconds[0], time.perf_counter() - t0, capture.args


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A pod waits up to 30 s at exit for Prometheus' last scrape; no Prometheus scrapes this bench.
    os.environ.setdefault("KUBETUNE_METRICS_FINAL_SCRAPE_TIMEOUT", "0")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--skip-packing", action="store_true")
    args = ap.parse_args(argv)

    from kubetune_trainer import tiny

    # Import both stacks before the first timed arm, so neither pays the (5-7 s) first import.
    import peft  # noqa: F401
    import trl  # noqa: F401

    from kubetune_trainer import runner  # noqa: F401
    from kubetune_trainer.stages import sft  # noqa: F401

    model = tiny.cached_model()
    tmp = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    data = tiny.generate_datasets(tmp / "data", n=400)
    runs: dict[str, list] = {"ours": [], "trl": []}
    for r in range(args.repeats):
        def ours():
            job = make_job(model, data["chat"], tmp / f"out-{r}", steps=args.steps,
                           checkpoint_every=args.checkpoint_every)
            runs["ours"].append(run_ours(job, tmp / f"work-ours-{r}"))

        def trl():
            runs["trl"].append(run_trl(model, data["chat"], tmp / f"work-trl-{r}", args.steps, args.checkpoint_every))

        for arm in ((ours, trl) if r % 2 == 0 else (trl, ours)):
            arm()

    def summary(rs):
        steps = [d for timer, *_ in rs for d in timer.durations[1:]]  # first step: lazy initialisation
        train, total = [x[1] for x in rs], [x[2] for x in rs]
        return {"train_s": train, "end_to_end_s": total, "median_step_s": statistics.median(steps),
                "mean_step_s": statistics.mean(steps)}

    o, t = summary(runs["ours"]), summary(runs["trl"])
    med = statistics.median
    result = {
        "steps_per_run": args.steps, "repeats": args.repeats, "checkpoint_every": args.checkpoint_every,
        "ours": o, "trl": t,
        "ratio_train": med(o["train_s"]) / med(t["train_s"]),
        "ratio_end_to_end": med(o["end_to_end_s"]) / med(t["end_to_end_s"]),
        "ratio_median_step": o["median_step_s"] / t["median_step_s"],
        "settings_that_differ": args_diff(runs["ours"][0][3], runs["trl"][0][3]),
    }
    spread = lambda xs: f"median {med(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f})"  # noqa: E731
    print(f"{args.steps} steps, checkpoint every {args.checkpoint_every}, {args.repeats} alternating repeats per arm")
    print(f"train():     kubetune {spread(o['train_s'])}, TRL {spread(t['train_s'])}: ratio {result['ratio_train']:.3f}")
    print(f"end to end:  kubetune {spread(o['end_to_end_s'])}, TRL {spread(t['end_to_end_s'])}: "
          f"ratio {result['ratio_end_to_end']:.3f}")
    print(f"median step: kubetune {o['median_step_s'] * 1e3:.1f} ms, TRL {t['median_step_s'] * 1e3:.1f} ms: "
          f"ratio {result['ratio_median_step']:.3f}")
    diff = result["settings_that_differ"]
    print("training arguments that differ (ours, TRL): " + (json.dumps(diff) if diff else "none"))

    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    if args.skip_packing:
        (out / "trainer_vs_trl.json").write_text(json.dumps(result, indent=2))
        return 0

    tokens = useful_tokens(model, data["domain"])
    packing = {}
    for packed in (False, True):
        timer, *_ = run_ours(make_job(model, data["domain"], tmp / f"out-pack-{packed}", stage="cpt", fmt="text",
                                  packing=packed, epochs=1, checkpoint_every=100000), tmp / f"work-pack-{packed}")
        seconds = sum(timer.durations)
        packing["packed" if packed else "unpacked"] = {"steps": len(timer.durations), "train_s": seconds,
                                                       "useful_tokens_per_s": tokens / seconds}
    packing["speedup"] = packing["packed"]["useful_tokens_per_s"] / packing["unpacked"]["useful_tokens_per_s"]
    result["packing"] = packing

    (out / "trainer_vs_trl.json").write_text(json.dumps(result, indent=2))
    print(f"packing (cpt, 1 epoch): {packing['unpacked']['steps']} -> {packing['packed']['steps']} steps, useful tokens/s "
          f"{packing['unpacked']['useful_tokens_per_s']:.0f} -> {packing['packed']['useful_tokens_per_s']:.0f} "
          f"(x{packing['speedup']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
