"""Runs the operator under tracemalloc, for finding where its memory goes (bench/scale.py --tracemalloc).

Each SIGUSR1 appends to $KUBETUNE_TRACEMALLOC_OUT the traced memory now and at its peak, and the allocation sites
that hold the most (grouped by the first frame inside kubetune, kopf, kubernetes or aiohttp code, so a
dict built by json.loads is charged to the caller that keeps it). tracemalloc slowed the operator about 10x in
bench/scale.py (753 against ~70 ms of CPU per job) and adds its own memory: compare sites with each other, not the
totals with an untraced run.

    KUBETUNE_TRACEMALLOC_OUT=/tmp/op-mem.txt .venv/bin/python bench/operator_tracemalloc.py --standalone -n NS
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
import time
import tracemalloc

FRAMES = 6
OURS = ("kubetune_operator", "kubetune_api", "/kopf/", "/kubernetes/", "/aiohttp/")


def _site(tb: tracemalloc.Traceback) -> str:
    for frame in tb:  # most recent call first
        if any(key in frame.filename for key in OURS):
            return f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno}"
    frame = tb[0]
    return f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno} (outside)"


def dump(*_: object) -> None:
    now, peak = tracemalloc.get_traced_memory()
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    sites: dict[str, list[int]] = {}
    for stat in snap.statistics("traceback"):
        acc = sites.setdefault(_site(stat.traceback), [0, 0])
        acc[0] += stat.size
        acc[1] += stat.count
    lines = [f"--- {time.strftime('%H:%M:%S')} traced now {now / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB\n"]
    for site, (size, count) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:40]:
        lines.append(f"{size / 2**20:8.2f} MiB {count:9d} blocks  {site}\n")
    with open(os.environ.get("KUBETUNE_TRACEMALLOC_OUT", "operator-tracemalloc.txt"), "a") as out:
        out.write("".join(lines))  # in one write: bench/scale.py waits for the file to grow


if __name__ == "__main__":
    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, dump)
    sys.argv = ["kubetune_operator", *sys.argv[1:]]
    runpy.run_module("kubetune_operator", run_name="__main__", alter_sys=True)
