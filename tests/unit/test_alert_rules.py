"""The alerting rules pass `promtool check rules`, their promtool unit tests pass, each alert is tested both
firing and quiet, the unit tests catch a broken rule, and every dashboard query is valid PromQL.

Runs with every promtool found: the cluster's (scripts/cluster/build-binaries.sh --print, Prometheus 3.x) and
Debian's (~/.cache/kubetune/bin/prometheus-deb, 2.x), so the rules work on both major versions (3.x changed
range-selector boundaries, which moves when rate/increase-based alerts fire).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import dashboard_queries as dq

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "helm" / "kubetune" / "files" / "prometheus-rules"
RULES = RULES_DIR / "kubetune.rules.yaml"
TESTS = sorted((RULES_DIR / "tests").glob("*.yaml"))


def _promtools() -> list[Path]:
    found: list[Path] = []
    try:
        out = subprocess.run([str(REPO / "scripts" / "cluster" / "build-binaries.sh"), "--print"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            found.append(Path(out.stdout.strip().splitlines()[-1]) / "promtool")
    except (OSError, subprocess.SubprocessError):
        pass
    cache = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))
    found.append(cache / "bin" / "prometheus-deb" / "promtool")
    if shutil.which("promtool"):
        found.append(Path(shutil.which("promtool")))
    unique: dict[Path, Path] = {}
    for p in found:
        if p.is_file() and os.access(p, os.X_OK):
            unique.setdefault(p.resolve(), p)
    return list(unique.values())


PROMTOOLS = _promtools()
needs_promtool = pytest.mark.skipif(not PROMTOOLS, reason="no promtool (scripts/cluster/build-binaries.sh builds it)")


def _version(promtool: Path) -> str:
    out = subprocess.run([str(promtool), "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.split()[2] if out.stdout.startswith("promtool, version") else str(promtool)


@pytest.fixture(params=PROMTOOLS or [None], ids=lambda p: _version(p) if p else "none")
def promtool(request):
    if request.param is None:
        pytest.skip("no promtool (scripts/cluster/build-binaries.sh builds it)")
    return request.param


def run(promtool: Path, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(promtool), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_rules_file_is_valid(promtool):
    r = run(promtool, "check", "rules", RULES)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_rule_unit_tests_pass(promtool):
    assert TESTS, "no promtool unit tests"
    r = run(promtool, "test", "rules", *TESTS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_tested_firing_and_quiet():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    firing, quiet = set(), set()
    for path in TESTS:
        doc = yaml.safe_load(path.read_text())
        assert [str((path.parent / f).resolve()) for f in doc["rule_files"]] == [str(RULES)], path
        for group in doc["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts - firing == set(), f"alerts never shown firing: {sorted(alerts - firing)}"
    assert alerts - quiet == set(), f"alerts never shown quiet: {sorted(alerts - quiet)}"
    assert (firing | quiet) - alerts == set(), f"tests for alerts that do not exist: {sorted((firing | quiet) - alerts)}"


# Deliberately broken copies of the rules: the unit tests must notice each one.
MUTATIONS = {
    "stalled threshold 10x": ("> 900", "> 9000"),
    "diverging without the absolute margin": (
        "\n          and kubetune_train_loss - min_over_time(kubetune_train_loss[30m]) > 0.25", ""),
    "stalled without the finished-run exception": (
        "\n          unless on (namespace, finetunejob) (kubetune_train_step >= kubetune_train_total_steps)", ""),
    "forgetting drops labels": ("group_left kubetune_job_forgetting_threshold", "kubetune_job_forgetting_threshold"),
    "not-finite misses infinity": ("\n          or abs(kubetune_train_loss) == +Inf", ""),
    "failed alert on the wrong phase": ('kubetune_job_phase{phase="Failed"} == 1', 'kubetune_job_phase{phase="Running"} == 1'),
}


@needs_promtool
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_unit_tests_catch_a_broken_rule(mutation, tmp_path):
    old, new = MUTATIONS[mutation]
    text = RULES.read_text()
    assert old in text, f"mutation {mutation!r} no longer applies: update MUTATIONS"
    (tmp_path / "kubetune.rules.yaml").write_text(text.replace(old, new))
    (tmp_path / "tests").mkdir()
    for t in TESTS:
        shutil.copy(t, tmp_path / "tests" / t.name)
    r = run(PROMTOOLS[0], "test", "rules", *sorted((tmp_path / "tests").glob("*.yaml")))
    assert r.returncode != 0, f"the promtool tests still pass with {mutation!r}"


def _queries_as_rules(queries: list[str]) -> dict:
    return {"groups": [{"name": "dashboard-queries", "rules": [
        {"record": f"kubetune_dashboard_check:query_{i}", "expr": q} for i, q in enumerate(queries)]}]}


def test_every_dashboard_query_is_valid_promql(promtool, tmp_path):
    # promtool has no offline "parse this query"; `check rules` parses each recording rule's expr, so every
    # panel query (variables substituted) becomes one. A broken query makes the file fail.
    queries = [q.query for q in dq.panel_queries(variables={"namespace": "ml", "job": "bot"})]
    queries += dq.variable_queries(variables={"namespace": "ml"})
    f = tmp_path / "dashboard.rules.yaml"
    f.write_text(yaml.safe_dump(_queries_as_rules(queries)))
    r = run(promtool, "check", "rules", f)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(queries)} rules found" in r.stdout


def test_the_dashboard_syntax_check_can_fail(tmp_path):
    if not PROMTOOLS:
        pytest.skip("no promtool")
    f = tmp_path / "broken.rules.yaml"
    f.write_text(yaml.safe_dump(_queries_as_rules(["max by (namespace) (kubetune_train_step{namespace=~\"ml\"}"])))
    assert run(PROMTOOLS[0], "check", "rules", f).returncode != 0
