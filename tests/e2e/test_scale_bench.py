"""bench/scale.py runs end to end at N=5 (seconds): both arms schedule every pod, the operator reports its
figures, and the table prints a ratio. The measurement itself (N = 100 ... thousands) is not a test: see
docs/scale.md.

    .venv/bin/python -m pytest tests/e2e/test_scale_bench.py -q
"""
from __future__ import annotations

import importlib.util
import json

from tests.e2e.kubetune_fixtures import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("scale_bench", REPO / "bench" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scale_bench_smoke(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig)
    bench = _bench()
    assert bench.main(["--sizes", "5", "--hold", "0", "--keep", "--cleanup-nodes", "--workdir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["arm"] for r in rows} == {"ftj", "job"}
    assert all(r["scheduled_count"] == 5 and r["scheduled_s"] > 0 for r in rows)
    (ftj,) = [r for r in rows if r["arm"] == "ftj"]
    assert ftj["running_count"] == 5 and ftj["rss_mb"] > 0 and ftj["cpu_per_job_ms"] > 0
    assert ftj["reconcile_errors"] == 0 and ftj["log_errors"] == 0
    assert 0 <= ftj["gc_per_job_ms"] < ftj["cpu_per_job_ms"]  # its garbage collector's part of that CPU
    # where the CPU went until the pods had nodes: the operator's share, and the cluster's servers in both arms
    (job,) = [r for r in rows if r["arm"] == "job"]
    assert ftj["cpu_ms_per_job_until_scheduled"]["operator"] > 0
    assert "operator" not in job["cpu_ms_per_job_until_scheduled"]
    assert all(r["cpu_ms_per_job_until_scheduled"]["kube-apiserver"] > 0 for r in rows)
    assert ftj["api_requests_all"]["POST configmaps"] >= 1  # one per job (+ the namespace's root CA)
    out = capsys.readouterr().out
    assert "| 5 |" in out and "x |" in out  # the table with a ratio
    assert "| 5 | ftj |" in out and "| 5 | job |" in out  # the CPU table
    assert cluster.kubectl("get", "nodes", "-l", "type=kwok-bench", "-o", "name").stdout.strip() == ""
