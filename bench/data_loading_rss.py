"""Host memory of data preparation at scale: 2 ranks (2 processes, as torchrun starts them on one node) each
prepare the same ~2 GB JSONL for training, with the old loader (JSON lines -> Python list of dicts -> per-row
type checks -> Dataset.from_list, on every rank) and with today's (datasets.load_dataset -> memory-mapped Arrow
in the node cache, the node's first process first, the other rank reusing the cache).

    OMP_NUM_THREADS=1 .venv/bin/python bench/data_loading_rss.py                 # ~2 GB, 2 repeats per arm
    OMP_NUM_THREADS=1 .venv/bin/python bench/data_loading_rss.py --gb 0.2 --repeats 1   # quick look

Equal work in both arms: data.prepare (load, column checks, shuffle(seed), hold out 10 % for eval), format
prompt_completion; only the file reader differs (the old one is kept below, in this file only). The arms
alternate (old, new, old, new ...) and each run gets a fresh datasets cache, so "new" always pays the parse.
Per run and rank: peak RSS (VmHWM: includes touched pages of memory-mapped files, which the kernel can drop
and share) and peak anonymous memory (RssAnon sampled every 20 ms: private memory, what exhausts a node's
RAM). Reported: the sum over both ranks, median and spread over repeats, and the ratio old/new from this run.
On a shared machine an arm is stopped when host MemAvailable falls under --min-available-mb; its figure is
then the RSS reached so far and the ratio a lower bound (it says so).
The JSONL and the caches live in a temp folder under /tmp, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / p) for p in ("operator", "trainer-image")]


# ------------------------------------------------------------------------------------------------ old loader
# A copy of kubetune_trainer.data's JSON-lines path before it moved to datasets.load_dataset (for comparison
# only: nothing else uses it).
def _old_kind(v):
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(v), type(v).__name__)


def _old_from_rows(name, rows):
    import datasets

    from kubetune_trainer.errors import DataError

    first = {}
    for i, row in enumerate(rows, 1):
        for col, v in row.items():
            if v is None:
                continue
            kind = _old_kind(v)
            seen = first.setdefault(col, (kind, i))
            if seen[0] != kind:
                raise DataError(f"column '{col}' mixes value types: {seen[0]} in row {seen[1]}, {kind} in row {i}",
                                field=name)
    return datasets.Dataset.from_list(rows)


def _old_jsonl_rows(name, path):
    from kubetune_trainer.errors import DataError

    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"line {i} is not valid JSON ({exc.msg})", field=name) from None
            if not isinstance(row, dict):
                raise DataError(f"line {i} is a JSON {type(row).__name__}, expected an object", field=name)
            rows.append(row)
    return rows


def old_read_rows(name, path, fmt, cache_dir=None):
    return _old_from_rows(name, _old_jsonl_rows(name, path))


# ------------------------------------------------------------------------------------------------ worker
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def worker(arm: str, path: Path, cache: Path) -> None:
    """One rank: prepare the data the way the runner does, print {peak_rss_mb, peak_anon_mb, seconds, rows}."""
    peak_anon = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))
            stop.wait(0.02)

    threading.Thread(target=sample, daemon=True).start()
    from kubetune_api.finetunejob import DatasetSpec
    from kubetune_trainer import data, distributed

    spec = DatasetSpec.model_validate({"format": "prompt_completion", "train": [{"uri": "file:///bench.jsonl"}]})
    src = [data.Source(f"file://{path}", path)]
    t0 = time.perf_counter()
    if arm == "old":
        data._read_rows = old_read_rows  # every rank parses the file itself, into memory
        prepared = data.prepare(spec, src, seed=1)
    else:
        with distributed.local_main_first():
            prepared = data.prepare(spec, src, seed=1, cache_dir=cache)
    # Touch what a stage touches first: the first rows of the shuffled training set.
    _ = prepared.train[:64]
    seconds = time.perf_counter() - t0
    distributed.barrier()
    stop.set()
    peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))
    print(json.dumps({"peak_rss_mb": _status_kb("VmHWM") / 1024, "peak_anon_mb": peak_anon[0] / 1024,
                      "seconds": seconds, "rows": len(prepared.train) + len(prepared.eval)}), flush=True)


# ------------------------------------------------------------------------------------------------ driver
def write_jsonl(path: Path, gb: float, seed: int = 0) -> int:
    """Prompt/completion rows of ~1 KB of varied words, until the file holds `gb` GB."""
    rng = random.Random(seed)
    words = [f"w{rng.randint(0, 50_000)}" for _ in range(20_000)]
    target = int(gb * 1e9)
    rows = 0
    with path.open("w") as f:
        size = 0
        while size < target:
            chunk = []
            for _ in range(1000):
                start = rng.randrange(len(words) - 200)
                prompt = " ".join(words[start:start + 40])
                completion = " ".join(words[start + 40:start + 40 + rng.randint(80, 160)])
                chunk.append(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
            text = "".join(chunk)
            f.write(text)
            size += len(text)
            rows += len(chunk)
    return rows


def run_arm(arm: str, path: Path, cache: Path, floor_mb: float) -> dict:
    """Start 2 ranks like torchrun does on one node (gloo on localhost) and collect their figures."""
    shutil.rmtree(cache, ignore_errors=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache / "hf")}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", arm, "--path", str(path),
                                       "--cache", str(cache)], env=env, stdout=subprocess.PIPE, text=True))
    # (stdout is a few bytes, read after exit: no pipe can fill up meanwhile)
    t0 = time.perf_counter()
    # Guard the host: on a shared machine the old loader can take more memory than there is. An arm whose ranks
    # would push MemAvailable under the floor is stopped, and reported as "at least" the RSS it had reached.
    peak_live = peak_anon_live = 0.0
    aborted = False
    while any(p.poll() is None for p in procs):
        peak_live = max(peak_live, sum(_proc_kb(p.pid, "VmRSS") for p in procs) / 1024)
        peak_anon_live = max(peak_anon_live, sum(_proc_kb(p.pid, "RssAnon") for p in procs) / 1024)
        if _meminfo_kb("MemAvailable") / 1024 < floor_mb:
            for p in procs:
                p.kill()
            aborted = True
            break
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if aborted:
        for p in procs:
            p.wait()
        return {"arm": arm, "rss_mb": peak_live, "anon_mb": peak_anon_live, "wall_s": wall, "aborted": True}
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{arm} rank failed with exit code {p.returncode}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert len({o["rows"] for o in outs}) == 1
    return {"arm": arm, "rss_mb": sum(o["peak_rss_mb"] for o in outs), "anon_mb": sum(o["peak_anon_mb"] for o in outs),
            "wall_s": wall, "per_rank": outs, "aborted": False}


def _proc_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _meminfo_kb(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:8.0f}  (min {min(values):.0f}, max {max(values):.0f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of the generated JSONL")
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating")
    ap.add_argument("--min-available-mb", type=float, default=3000,
                    help="stop an arm (reported as a lower bound) when host MemAvailable falls below this")
    ap.add_argument("--worker", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.path, args.cache)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="kubetune-bench-data-", dir="/tmp"))
    try:
        path = tmp / "train.jsonl"
        t0 = time.perf_counter()
        rows = write_jsonl(path, args.gb)
        print(f"wrote {path.stat().st_size / 1e9:.2f} GB, {rows} rows of prompt_completion in "
              f"{time.perf_counter() - t0:.0f} s; 2 ranks per run, {args.repeats} runs per arm, alternating")
        results = {"old": [], "new": []}
        for i in range(args.repeats):
            for arm in (("old", "new") if i % 2 == 0 else ("new", "old")):
                r = run_arm(arm, path, tmp / "cache", args.min_available_mb)
                results[arm].append(r)
                if r["aborted"]:
                    print(f"  run {i + 1} {arm}: STOPPED at {r['rss_mb']:.0f} MB RSS (2 ranks, still growing) after "
                          f"{r['wall_s']:.0f} s: host MemAvailable fell under {args.min_available_mb:.0f} MB",
                          flush=True)
                else:
                    print(f"  run {i + 1} {arm}: peak RSS {r['rss_mb']:.0f} MB, peak anonymous {r['anon_mb']:.0f} MB "
                          f"(2 ranks), wall {r['wall_s']:.1f} s", flush=True)
        print()
        print(f"{'':22}{'old (list of dicts)':>34}{'new (Arrow, mmap)':>34}")
        for key, label in (("rss_mb", "peak RSS, 2 ranks MB"), ("anon_mb", "peak anon, 2 ranks MB"),
                           ("wall_s", "wall seconds")):
            old = [r[key] for r in results["old"]]
            new = [r[key] for r in results["new"]]
            print(f"{label:22}{_spread(old):>34}{_spread(new):>34}")
        stopped = any(r["aborted"] for r in results["old"] + results["new"])
        for key, label in (("rss_mb", "peak RSS"), ("anon_mb", "peak anonymous memory"), ("wall_s", "wall time")):
            old_median = statistics.median(r[key] for r in results["old"])
            ratio = old_median / statistics.median(r[key] for r in results["new"])
            bound = ">= " if stopped and key != "wall_s" else ""
            print(f"old/new {label}: {bound}{ratio:.2f}x" + (" (a stopped run: lower bound)" if bound else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
