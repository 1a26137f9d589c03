"""Runs the operator under tracemalloc, for finding where its memory goes (bench/scale.py --tracemalloc).

Each SIGUSR1 appends to $KUBETUNE_TRACEMALLOC_OUT the traced memory now and at its peak, and the allocation sites
that hold the most (grouped by the first frame inside kubetune, kopf, kubernetes or aiohttp code, so a
dict built by json.loads is charged to the caller that keeps it). tracemalloc slowed the operator about 10x in
bench/scale.py (753 against ~70 ms of CPU per job) and adds its own memory: compare sites with each other, not the
totals with an untraced run.

    KUBETUNE_TRACEMALLOC_OUT=/tmp/op-mem.txt .venv/bin/python bench/operator_tracemalloc.py --standalone -n NS

With KUBETUNE_TRACEMALLOC_FRAMES=0 nothing is traced (no slowdown) and each dump holds only what the process can
say of itself cheaply: RSS now and at its peak (and when the peak was, from a 0.5 s sampler), glibc's heap
(mallinfo2: bytes in use, free but kept, mmapped), pymalloc's arenas (bytes in live objects against bytes held),
and the live objects per type (gc). That separates live data from allocator high-water marks at full speed.
"""
from __future__ import annotations

import os
import runpy
import ctypes
import gc
import re
import signal
import sys
import tempfile
import threading
import time
import tracemalloc

FRAMES = int(os.environ.get("KUBETUNE_TRACEMALLOC_FRAMES", "6"))
_RSS: list[tuple[float, int, int]] = []  # (seconds since start, RSS kB, pymalloc blocks in use), every 0.5 s
_AT_PEAK: list[str] = []  # allocation sites when the blocks in use last reached a new high (traced runs only)
_START = time.monotonic()
OURS = ("kubetune_operator", "kubetune_api", "/kopf/", "/kubernetes/", "/aiohttp/")


def _site(tb: tracemalloc.Traceback) -> str:
    for frame in tb:  # most recent call first
        if any(key in frame.filename for key in OURS):
            return f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno}"
    frame = tb[0]
    return f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno} (outside)"


def _sites(top: int) -> list[str]:
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    sites: dict[str, list[int]] = {}
    for stat in snap.statistics("traceback"):
        acc = sites.setdefault(_site(stat.traceback), [0, 0])
        acc[0] += stat.size
        acc[1] += stat.count
    return [f"{size / 2**20:8.2f} MiB {count:9d} blocks  {site}\n"
            for site, (size, count) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]]


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _sample_rss() -> None:
    snapped = 0
    while True:
        blocks = sys.getallocatedblocks()
        _RSS.append((time.monotonic() - _START, _status_kb("VmRSS"), blocks))
        if tracemalloc.is_tracing() and blocks > 1.15 * snapped and time.monotonic() - _START > 5:
            # a new high of live objects: where they are (the transient peak is what sets RSS)
            snapped = blocks
            _AT_PEAK[:] = [f"at {time.monotonic() - _START:.0f} s, {blocks} blocks in use:\n", *_sites(12)]
        time.sleep(0.5)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _pymalloc() -> dict[str, int]:
    """pymalloc's own summary (sys._debugmallocstats writes it to the C-level stderr)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    out = {}
    for key in ("arenas allocated current", "arenas highwater mark", "bytes in allocated blocks",
                "bytes in available blocks"):
        m = re.search(r"# " + key + r"\s*=\s*([\d,]+)", text)
        out[key] = int(m.group(1).replace(",", "")) if m else -1
    return out


_LEAVES = (str, bytes, int, float, bool, type(None))
_DESCEND = ("kopf", "kubetune", "prometheus_client", "pydantic", "builtins", "collections")


def _deep_size(root: object, seen: set[int]) -> int:
    """Bytes reachable from root through containers and objects of kopf, kubetune, prometheus_client and
    pydantic (not through modules, types, functions or other libraries' objects), not counting what `seen`
    holds already (so categories measured one after the other do not share bytes)."""
    total, stack = 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, type(sys), type(_deep_size))):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj, 0)
        if isinstance(obj, _LEAVES):
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
            stack.extend(obj)
        elif type(obj).__module__.startswith(_DESCEND):
            if hasattr(obj, "__dict__"):
                stack.append(obj.__dict__)
            for slot in getattr(type(obj), "__slots__", ()) or ():
                if isinstance(slot, str) and hasattr(obj, slot):
                    stack.append(getattr(obj, slot))
    return total


def owners() -> list[str]:
    """Deep sizes of the long-lived per-object stores, largest owners first (in the order measured)."""
    by_type: dict[str, list] = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in ("Reconciler", "OperatorMetrics", "Store", "ResourceMemory", "Index", "ProgressLoop",
                    "Stream", "Task"):
            by_type.setdefault(name, []).append(obj)
    seen: set[int] = set()
    out = []
    for rec in by_type.get("Reconciler", []):  # its parts, largest per-job ones first
        parts = {attr: _deep_size(getattr(rec, attr), seen) for attr in ("metrics", "lookup", "api", "settings")}
        states = list(getattr(rec, "_states", {}).values())
        if states:
            for field in ("frozen", "frozen_status", "head", "target", "result", "unrecorded_runtime", "blocked"):
                parts[f"state.{field}"] = sum(_deep_size(getattr(st, field, None), seen) for st in states)
            parts["state.rest"] = _deep_size(rec._states, seen)
        out.append(f"Reconciler parts over {len(states)} jobs: " + ", ".join(
            f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
    for name in ("Reconciler", "OperatorMetrics", "ProgressLoop", "Index", "Store", "ResourceMemory", "Stream",
                 "Task"):
        objs = by_type.get(name, [])
        size = sum(_deep_size(o, seen) for o in objs)
        out.append(f"{name} x{len(objs)}: {size / 2**20:.1f} MiB")
    return ["deep sizes: " + "; ".join(out) + "\n"]


def process_stats() -> list[str]:
    mib = 2**20
    lines = []
    peak_t, peak_kb, _ = max(_RSS, key=lambda s: s[1]) if _RSS else (0.0, 0, 0)
    block_t, _, block_peak = max(_RSS, key=lambda s: s[2]) if _RSS else (0.0, 0, 0)
    lines.append(f"RSS now {_status_kb('VmRSS') / 1024:.1f} MiB, peak (VmHWM) {_status_kb('VmHWM') / 1024:.1f} MiB; "
                 f"sampled peak {peak_kb / 1024:.1f} MiB at {peak_t:.0f} s after start\n")
    timeline = " ".join(f"{t:.0f}s:{kb / 1024:.0f}" for t, kb, _ in _RSS[::20])
    lines.append(f"RSS MiB every 10 s: {timeline}\n")
    lines.append(f"pymalloc blocks in use now {sys.getallocatedblocks()}, peak {block_peak} at {block_t:.0f} s; every "
                 "10 s: " + " ".join(f"{t:.0f}s:{b // 1000}k" for t, _, b in _RSS[::20]) + "\n")
    try:
        mi = ctypes.CDLL("libc.so.6").mallinfo2
        mi.restype = _MallInfo2
        info = mi()
        lines.append(f"glibc heap: in use {info.uordblks / mib:.1f} MiB, free but kept {info.fordblks / mib:.1f} MiB "
                     f"(top pad {info.keepcost / mib:.1f}), mmapped {info.hblkhd / mib:.1f} MiB in {info.hblks} "
                     f"blocks, arena {info.arena / mib:.1f} MiB\n")
    except (OSError, AttributeError) as exc:
        lines.append(f"glibc heap: unavailable ({exc})\n")
    pm = _pymalloc()
    lines.append(f"pymalloc: {pm['arenas allocated current']} arenas now (high-water {pm['arenas highwater mark']}), "
                 f"{pm['bytes in allocated blocks'] / mib:.1f} MiB in live objects, "
                 f"{pm['bytes in available blocks'] / mib:.1f} MiB free in held pools\n")
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        counts[name] = counts.get(name, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:12]
    lines.append("gc-tracked objects: " + ", ".join(f"{name} {n}" for name, n in top) + "\n")
    lines.extend(owners())
    return lines


def dump(*_: object) -> None:
    if not tracemalloc.is_tracing():
        lines = [f"--- {time.strftime('%H:%M:%S')} (not traced)\n", *process_stats()]
        with open(os.environ.get("KUBETUNE_TRACEMALLOC_OUT", "operator-tracemalloc.txt"), "a") as out:
            out.write("".join(lines))
        return
    now, peak = tracemalloc.get_traced_memory()
    lines = [f"--- {time.strftime('%H:%M:%S')} traced now {now / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB\n",
             *process_stats(), *_sites(40)]
    if _AT_PEAK:
        lines.extend(["--- the last new high of live objects, ", *_AT_PEAK])
    with open(os.environ.get("KUBETUNE_TRACEMALLOC_OUT", "operator-tracemalloc.txt"), "a") as out:
        out.write("".join(lines))  # in one write: bench/scale.py waits for the file to grow


if __name__ == "__main__":
    # gc.get_objects() leaves out frozen objects: keep the startup objects visible to the counts above
    os.environ.setdefault("KUBETUNE_GC_THRESHOLD", "0")
    if FRAMES > 0:
        tracemalloc.start(FRAMES)
    threading.Thread(target=_sample_rss, name="rss sampler", daemon=True).start()
    signal.signal(signal.SIGUSR1, dump)
    sys.argv = ["kubetune_operator", *sys.argv[1:]]
    runpy.run_module("kubetune_operator", run_name="__main__", alter_sys=True)
