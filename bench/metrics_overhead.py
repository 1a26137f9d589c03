"""What the monitoring costs a training step: RunMonitor's callback + NaN guard + a scraped /metrics server,
against the same run without them.

    OMP_NUM_THREADS=1 .venv/bin/python bench/metrics_overhead.py                  # defaults: 80 steps x 5 repeats
    OMP_NUM_THREADS=1 .venv/bin/python bench/metrics_overhead.py --steps 200 --repeats 7 --scrape-interval 0.5

Two measurements, because on a small shared machine run-to-run noise (several %) is larger than the effect:

1. End to end: the tiny Llama (kubetune_trainer.tiny sizes, random weights, random tokens) trains N steps with
   and without the monitor, same seed, runs interleaved (ABBA order), each run's median step time; the
   overhead is the ratio of the medians of those medians. /metrics is scraped in the background throughout
   (default every 1 s, far more often than Prometheus' usual 15-30 s).
   Reported for wall time and for the training thread's CPU time (steadier when other processes share the cores).
2. In-run accounting: inside the runs with the monitor, the time spent in the callback's methods and in the
   guard's wrapper (minus the training_step it wraps), per step: the monitor's exact cost on the training
   thread, unaffected by noise from other processes.
3. Per step, isolated: the callback's on_step_end, the guard's wrapper around training_step (one .item() on the
   loss) and on_log (once per logging_steps), each timed over many calls, as a fraction of the measured step;
   plus the cost of rendering one /metrics scrape (on the server thread, not the training thread).

Target: < 1 % of step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("operator", "trainer-image")]


def build(seq: int, batch: int, hidden: int, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n):
            self.ids = torch.randint(0, 512, (n, seq), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(seq, dtype=torch.long),
                    "labels": self.ids[i]}

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                            max_position_embeddings=max(seq, 64)))

    return model, Tokens(batch * 400)


def job():
    from kubetune_api.finetunejob import parse_job

    return parse_job({"metadata": {"name": "bench", "namespace": "bench"}, "spec": {
        "stage": "cpt", "model": {"source": "file:///m"}, "dataset": {"format": "text", "train": [{"uri": "file:///d"}]},
        "output": {"uri": "file:///o"}, "evaluation": {"earlyStopping": {"patience": 1000}}}})


def _timed(fn, bucket: list):
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            bucket[0] += time.perf_counter() - t0
    return wrapper


def one_run(with_monitor: bool, args, model_fn, data, work: Path, inside: list | None = None) -> tuple[float, float]:
    """Median seconds per optimizer step (warm-up steps excluded): wall clock, and CPU time of the training
    thread (with OMP_NUM_THREADS=1 torch computes on that thread; CPU time barely moves when other processes
    compete for the cores, wall time does)."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from kubetune_trainer.monitoring import RunMonitor

    stamps: list[tuple[float, float]] = []

    class Clock(TrainerCallback):  # present in both variants, so it cancels out
        def on_step_end(self, a, state, control, **kw):
            stamps.append((time.perf_counter(), time.thread_time()))

    targs = TrainingArguments(
        output_dir=str(work / "hf"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        logging_steps=args.logging_steps, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        include_num_input_tokens_seen=True, logging_nan_inf_filter=False, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, learning_rate=1e-3)
    callbacks = [Clock()]
    monitor = stop = scraper = None
    if with_monitor:
        monitor = RunMonitor(job(), work / "mon", host="127.0.0.1", port=0)
        monitor.start()
        callbacks.insert(0, monitor.callback())
        stop = threading.Event()

        def scrape():
            while not stop.wait(args.scrape_interval):
                urllib.request.urlopen(monitor.url + "/metrics", timeout=5).read()

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
    trainer = Trainer(model=model_fn(), args=targs, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # printing every log dict to stdout would be the biggest cost here
    if with_monitor:
        # In-run accounting of the monitor's own time on the training thread: every callback method, and the
        # guard's wrapper minus the training_step it wraps.
        spent, inner = [0.0], [0.0]
        cb = monitor.callback()
        for name in ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end"):
            setattr(cb, name, _timed(getattr(cb, name), spent))
        trainer.training_step = _timed(trainer.training_step, inner)
        monitor.guard(trainer)
        outer = [0.0]
        trainer.training_step = _timed(trainer.training_step, outer)
    trainer.train()
    if with_monitor:
        stop.set()
        scraper.join()
        monitor.finish(monitor.report("succeeded"))
        if inside is not None:
            inside.append((spent[0] + outer[0] - inner[0]) / args.steps)
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][args.warmup:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][args.warmup:]
    return statistics.median(wall), statistics.median(cpu)


def per_step_costs(args, step_seconds: float) -> dict:
    """Isolated cost of the monitor's per-step work, in seconds per optimizer step."""
    import torch
    from transformers import TrainerControl

    from kubetune_trainer.monitoring import RunMonitor

    monitor = RunMonitor(job(), Path("/tmp/kubetune-bench-unused"), rank=1)  # rank 1: no files, no server
    cb = monitor.callback()
    state = SimpleNamespace(global_step=0, max_steps=10**9, epoch=0.0, num_input_tokens_seen=0, log_history=[])
    control = TrainerControl()
    cb.on_train_begin(None, state, control)
    n = 200_000
    t0 = time.perf_counter()
    for i in range(n):
        state.global_step = i
        state.num_input_tokens_seen = i * 256
        cb.on_step_end(None, state, control)
    step_end = (time.perf_counter() - t0) / n

    loss = torch.tensor(2.5)
    fake = SimpleNamespace(training_step=lambda *a, **k: loss, state=state,
                           accelerator=SimpleNamespace(sync_gradients=True))
    bare = fake.training_step
    m = 50_000
    t0 = time.perf_counter()
    for _ in range(m):
        bare(None, None)
    base = time.perf_counter() - t0
    monitor.guard(fake)
    t0 = time.perf_counter()
    for _ in range(m):
        fake.training_step(None, None)
    guard = max(0.0, (time.perf_counter() - t0 - base) / m)

    logs = {"loss": 2.5, "grad_norm": 1.1, "learning_rate": 1e-4, "epoch": 0.5, "num_input_tokens_seen": 1000}
    k = 20_000
    t0 = time.perf_counter()
    for i in range(k):
        state.num_input_tokens_seen = 1000 + i
        cb.on_log(None, state, control, logs=dict(logs))
    on_log = (time.perf_counter() - t0) / k
    total = step_end + guard + on_log / args.logging_steps

    from prometheus_client import generate_latest

    served = RunMonitor(job(), args.work / "scrape", rank=0)  # rank 0: all series, and it writes metrics.jsonl
    served._on_train_begin(state)
    served._on_log(state, dict(logs))  # a realistic set of series
    j = 2_000
    t0 = time.perf_counter()
    for _ in range(j):
        generate_latest(served.registry)
    scrape = (time.perf_counter() - t0) / j
    return {"on_step_end": step_end, "guard": guard, "on_log": on_log, "per_step": total,
            "fraction": total / step_seconds, "scrape": scrape}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=5, help="first step intervals left out of each run")
    ap.add_argument("--repeats", type=int, default=5, help="runs per variant (interleaved)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--logging-steps", type=int, default=5, help="spec.training.logEverySteps default")
    ap.add_argument("--scrape-interval", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kubetune-bench"))
    args = ap.parse_args(argv)

    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("kubetune").setLevel(logging.WARNING)
    model_fn, data = build(args.seq, args.batch, args.hidden, args.layers)
    one_run(False, args, model_fn, data, args.work / "warm")  # first-use costs (imports, allocator) off the books
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    inside: list[float] = []
    for r in range(args.repeats):
        order = (False, True) if r % 2 == 0 else (True, False)  # ABBA: drift in machine load hits both alike
        for variant in order:
            results[variant].append(one_run(variant, args, model_fn, data, args.work / f"r{r}-{int(variant)}",
                                            inside))
    wall = {v: [r[0] for r in results[v]] for v in results}
    cpu = {v: [r[1] for r in results[v]] for v in results}
    without, with_ = statistics.median(wall[False]), statistics.median(wall[True])
    cpu_without, cpu_with = statistics.median(cpu[False]), statistics.median(cpu[True])
    spread = (max(wall[False]) - min(wall[False])) / without
    cpu_spread = (max(cpu[False]) - min(cpu[False])) / cpu_without
    costs = per_step_costs(args, without)

    print(f"tiny Llama hidden {args.hidden} x {args.layers} layers, batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} steps x {args.repeats} runs per variant, log every {args.logging_steps} steps, "
          f"/metrics scraped every {args.scrape_interval:g} s")
    for label, series, a, b, sp in (("wall", wall, without, with_, spread),
                                     ("CPU", cpu, cpu_without, cpu_with, cpu_spread)):
        print(f"{label + ' step time':<14} without monitor {a * 1e3:7.3f} ms, with {b * 1e3:7.3f} ms -> "
              f"overhead {(b / a - 1) * 100:+6.2f} %  (spread of runs without monitor {sp * 100:.1f} %; runs: "
              f"{', '.join(f'{x * 1e3:.2f}' for x in series[False])} | "
              f"{', '.join(f'{x * 1e3:.2f}' for x in series[True])})")
    in_run = statistics.median(inside)
    print(f"in-run monitor time       : {in_run * 1e6:8.2f} us per step = {in_run / without * 100:.3f} % of a step "
          f"(callback methods + guard, measured inside the runs with the monitor, incl. timer overhead)")
    print(f"isolated per-step cost    : {costs['per_step'] * 1e6:8.2f} us = {costs['fraction'] * 100:.3f} % of a step "
          f"(on_step_end {costs['on_step_end'] * 1e6:.2f} us, guard {costs['guard'] * 1e6:.2f} us, "
          f"on_log {costs['on_log'] * 1e6:.1f} us / {args.logging_steps} steps)")
    print(f"one scrape of /metrics    : {costs['scrape'] * 1e6:8.1f} us on the server thread "
          f"(= {costs['scrape'] / 15 * 100:.4f} % of a core at a 15 s scrape interval)")
    ok = costs["fraction"] < 0.01 and in_run / without < 0.01
    print(f"target < 1 % of step time : {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
