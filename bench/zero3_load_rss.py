"""Peak host RAM per rank while loading a model for ZeRO-3 full fine-tuning: with load-time partitioning
(distributed.partition_at_load -> deepspeed.zero.Init inside from_pretrained) against without it (every rank
materialises the whole model, which is what the runner did before).

    OMP_NUM_THREADS=1 .venv/bin/python bench/zero3_load_rss.py                      # ~0.5 B params, 2 ranks, 2 repeats
    OMP_NUM_THREADS=1 .venv/bin/python bench/zero3_load_rss.py --hidden 1024 --layers 8 --repeats 1   # smaller

A randomly initialised Llama built from a config (~0.5 B parameters by default) is saved once as bf16
safetensors (how published checkpoints come); then each repeat launches torchrun twice with 2 CPU processes
(gloo, DS_ACCELERATOR=cpu), once per mode, alternating the order (AB, BA, ...). Both modes run the same code:
training_args.build + modeling.load_model for the same full fine-tuning ZeRO-3 spec; only the
partition_at_load call differs. Each rank reports its peak RSS (ru_maxrss) after the load and its RSS before
it (imports, process group); the script prints per-rank medians with the spread over repeats and the ratio
(partitioned / unpartitioned) of peak RSS and of the load's own increment.

Rank 0 reads the whole checkpoint into host memory in both modes (transformers' ZeRO-3 loading reads the
state dict on rank 0 only; the other ranks see shapes), so the gain shows on the other ranks; with 8 processes
per pod, or on GPUs (where the partitions are not in host memory at all), it is the pod's total that drops.

Not a test: it needs ~(2 ranks x 4 bytes x params) of free RAM for the unpartitioned mode (~4 GB by default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / p) for p in ("operator", "trainer-image")]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def build_model(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512), vocab_size=vocab,
                      tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(folder), safe_serialization=True)
    return n


def worker(args) -> int:
    """One rank: load the model the runner's way, with or without load-time partitioning."""
    import deepspeed  # noqa: F401 - imported in both modes, so "before load" RSS compares equal work
    import torch
    import torch.distributed as dist

    from kubetune_api import parse_job
    from kubetune_trainer import distributed, modeling, training_args

    torch.set_num_threads(1)
    job = parse_job({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
                     "metadata": {"name": "bench", "namespace": "bench"},
                     "spec": {"stage": "cpt", "model": {"source": f"file://{args.model}"},
                              "dataset": {"format": "text", "train": [{"uri": "file:///unused"}]},
                              "adapter": {"type": "full"}, "resources": {"gpus": 0},
                              "distributed": {"backend": "gloo", "deepspeed": {"zeroStage": 3}},
                              "output": {"uri": "file:///unused"}}})
    distributed.init_process_group(job.spec)
    targs = training_args.build(job, Path(args.work) / f"rank{distributed.rank()}", has_eval=False)
    keep = distributed.partition_at_load(targs) if args.mode == "partitioned" else None
    dist.barrier()
    before = _rss_kib()
    model = modeling.load_model(Path(args.model), job.spec, uri=f"file://{args.model}")
    dist.barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    full = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    rec = {"rank": distributed.rank(), "mode": args.mode, "rss_before_kib": before, "peak_kib": peak,
           "local_params": local, "params": full, "dtype": str(next(model.parameters()).dtype)}
    with open(f"{args.out}.rank{distributed.rank()}", "w") as f:
        json.dump(rec, f)
    del keep
    dist.barrier()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, model: Path, tmp: Path, i: int) -> list[dict]:
    out = tmp / f"{mode}-{i}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer-image")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(Path(__file__).resolve()), "--worker", "--mode", mode,
           "--model", str(model), "--work", str(tmp / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]


def _mib(kib: float) -> float:
    return kib / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["partitioned", "unpartitioned"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    results: dict[str, list[dict]] = {"unpartitioned": [], "partitioned": []}
    with tempfile.TemporaryDirectory(prefix="kubetune-zero3-rss-") as d:
        tmp = Path(d)
        n = build_model(tmp / "model", args.hidden, args.layers, args.vocab)
        print(f"model: random Llama, {n / 1e9:.3f} B parameters (hidden {args.hidden}, {args.layers} layers, "
              f"vocab {args.vocab}), saved bf16; full fine-tuning, ZeRO-3, 2 CPU ranks (gloo)")
        for i in range(args.repeats):
            order = ["unpartitioned", "partitioned"] if i % 2 == 0 else ["partitioned", "unpartitioned"]
            for mode in order:
                recs = launch(mode, tmp / "model", tmp, i)
                results[mode].append({r["rank"]: r for r in recs})
                print(f"  repeat {i} {mode:13s}: " + ", ".join(
                    f"rank {r['rank']} peak {_mib(r['peak_kib']):7.0f} MiB (before load {_mib(r['rss_before_kib']):5.0f}, "
                    f"{r['local_params'] / 1e6:.0f} M params held, {r['dtype']})" for r in recs), flush=True)
    print("\npeak host RSS per rank (median over repeats, [min-max]):")
    med: dict[tuple[str, int], float] = {}
    inc: dict[tuple[str, int], float] = {}
    for mode, runs in results.items():
        for rank in (0, 1):
            peaks = [_mib(run[rank]["peak_kib"]) for run in runs]
            incs = [_mib(run[rank]["peak_kib"] - run[rank]["rss_before_kib"]) for run in runs]
            med[mode, rank], inc[mode, rank] = statistics.median(peaks), statistics.median(incs)
            print(f"  {mode:13s} rank {rank}: {med[mode, rank]:7.0f} MiB [{min(peaks):.0f}-{max(peaks):.0f}], "
                  f"load increment {inc[mode, rank]:7.0f} MiB [{min(incs):.0f}-{max(incs):.0f}]")
    node = {mode: med[mode, 0] + med[mode, 1] for mode in results}
    print(f"ratio partitioned/unpartitioned, both ranks (the pod's memory): peak RSS "
          f"{node['partitioned'] / node['unpartitioned']:.2f} ({node['partitioned']:.0f} / {node['unpartitioned']:.0f} MiB)")
    for rank in (0, 1):
        print(f"ratio partitioned/unpartitioned, rank {rank}: peak RSS "
              f"{med['partitioned', rank] / med['unpartitioned', rank]:.2f}, load increment "
              f"{inc['partitioned', rank] / max(1.0, inc['unpartitioned', rank]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
