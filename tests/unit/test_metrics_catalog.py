"""The metric catalog is the one list of metric names: the code registers from it, and docs/metrics.md, the
Grafana dashboard and the alerting rules must agree with it. Names must follow Prometheus conventions.

No torch: runs with the unit tests (dashboard_queries and the catalog import only the standard library).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kubetune_api.metrics_catalog import (ALL_METRICS, BY_NAME, JOB_LABEL, OPERATOR_METRICS, TRAINER_LABELS,
                                          TRAINER_METRICS, markdown_table)
from tests import dashboard_queries as dq

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "metrics.md"
RULES = REPO / "helm" / "kubetune" / "files" / "prometheus-rules" / "kubetune.rules.yaml"

# Labels Prometheus attaches itself or reserves: an exported label of that name is renamed (exported_job) or
# breaks histogram/summary semantics.
RESERVED_LABELS = {"job", "instance", "le", "quantile"}
# Target labels a scrape adds to trainer series (pod discovery / PodMonitor), usable in joins.
TARGET_LABELS = {"pod", "instance", "job", "container", "node"}
DCGM_METRICS = {"DCGM_FI_DEV_FB_USED": {"gpu", "pod", "namespace", "exported_pod", "exported_namespace"},
                "DCGM_FI_DEV_GPU_UTIL": {"gpu", "pod", "namespace", "exported_pod", "exported_namespace"}}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
BAD_UNIT_SUFFIXES = ("_ms", "_milliseconds", "_microseconds", "_minutes", "_hours", "_days", "_percent", "_kb",
                     "_mb", "_gb", "_kilobytes", "_megabytes", "_gigabytes")
# Fleet/operator alerts whose metrics carry no per-job labels.
ALERT_ANNOTATION_KEYS = {"summary", "description", "runbook"}


def catalog_name(name: str) -> str | None:
    """The catalog entry a series name in PromQL belongs to (histograms expose _bucket/_sum/_count)."""
    if name in BY_NAME:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name[: -len(suffix)]
        if name.endswith(suffix) and BY_NAME.get(base) and BY_NAME[base].type == "histogram":
            return base
    return None


# ------------------------------------------------------------------------------------------- conventions
@pytest.mark.parametrize("m", ALL_METRICS, ids=lambda m: m.name)
def test_metric_follows_naming_conventions(m):
    assert re.fullmatch(r"kubetune_[a-z][a-z0-9_]*[a-z0-9]", m.name), m.name
    assert m.type in ("gauge", "counter", "histogram")
    if m.type == "counter":
        assert m.name.endswith("_total"), f"{m.name}: counters end in _total"
    else:
        assert not m.name.endswith("_total"), f"{m.name}: _total is only for counters"
    assert not m.name.endswith(HISTOGRAM_SUFFIXES + ("_created", "_info")), f"{m.name}: reserved suffix"
    assert not m.name.endswith(BAD_UNIT_SUFFIXES), f"{m.name}: use base units (seconds, bytes, ratio)"
    if "timestamp" in m.name:
        assert m.name.endswith("_timestamp_seconds"), m.name
    if "duration" in m.name:
        assert m.name.endswith("_seconds"), m.name
    assert m.help and m.help.endswith(".") and "\n" not in m.help, f"{m.name}: help is one sentence-like line"
    assert len(set(m.labels)) == len(m.labels), f"{m.name}: duplicate label"
    for label in m.labels:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", label), f"{m.name}: label {label!r}"
        assert label not in RESERVED_LABELS, f"{m.name}: label {label!r} collides with a Prometheus target label"
    assert m.component in ("trainer", "operator")


def test_components_prefixes_and_uniqueness():
    assert len(BY_NAME) == len(ALL_METRICS), "duplicate metric name"
    for m in TRAINER_METRICS:
        assert m.component == "trainer"
        assert not m.name.startswith(("kubetune_operator_", "kubetune_job_")), m.name
        assert set(TRAINER_LABELS) <= set(m.labels), f"{m.name}: trainer metrics carry {TRAINER_LABELS}"
    for m in OPERATOR_METRICS:
        assert m.component == "operator"
        assert m.name.startswith(("kubetune_operator_", "kubetune_job_")), m.name
        assert not m.log_keys
        if m.name.startswith("kubetune_job_"):
            assert {"namespace", JOB_LABEL} <= set(m.labels), f"{m.name}: per-job metrics name the job"
    keys = [k for m in ALL_METRICS for k in m.log_keys]
    assert len(keys) == len(set(keys)), "a log key feeds two metrics"


def test_log_keys_cover_the_trl_stage_signals():
    fed_by = {k: m.name for m in TRAINER_METRICS for k in m.log_keys}
    expected = {
        "loss": "kubetune_train_loss", "eval_loss": "kubetune_eval_loss", "learning_rate": "kubetune_train_learning_rate",
        "grad_norm": "kubetune_train_grad_norm", "epoch": "kubetune_train_epoch",
        "rewards/margins": "kubetune_preference_reward_margin", "rewards/accuracies": "kubetune_preference_reward_accuracy",
        "reward": "kubetune_reward_mean", "reward_std": "kubetune_reward_std", "kl": "kubetune_policy_kl",
        "objective/scores": "kubetune_reward_mean", "objective/kl": "kubetune_policy_kl",
    }
    for key, name in expected.items():
        assert fed_by.get(key) == name, key


# ------------------------------------------------------------------------------------------- docs
def _docs_rows() -> dict[str, dict]:
    rows = {}
    lines = DOCS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| name | type | labels |"))
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break  # the end of the metric table
        m = re.match(r"^\|\s*`(kubetune_[a-z0-9_]+)`\s*\|(.*)\|\s*$", line)
        assert m, f"not a metric row: {line}"
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))]
        assert len(cells) == 4, f"docs/metrics.md row has {len(cells) + 1} cells: {line}"
        assert m.group(1) not in rows, f"{m.group(1)} appears twice in docs/metrics.md"
        rows[m.group(1)] = {"type": cells[0], "labels": tuple(re.findall(r"`([a-z_]+)`", cells[1])),
                            "component": cells[2], "help": cells[3].replace("\\|", "|")}
    return rows


def test_docs_metrics_table_matches_catalog():
    rows = _docs_rows()
    hint = ("regenerate the table: .venv/bin/python -c 'from kubetune_api.metrics_catalog import markdown_table; "
            "print(markdown_table())'")
    assert not set(BY_NAME) - set(rows), f"missing from docs/metrics.md: {sorted(set(BY_NAME) - set(rows))}; {hint}"
    assert not set(rows) - set(BY_NAME), f"in docs/metrics.md but not in the catalog: {sorted(set(rows) - set(BY_NAME))}"
    for name, row in rows.items():
        m = BY_NAME[name]
        assert (row["type"], row["labels"], row["component"], row["help"]) == (m.type, m.labels, m.component, m.help), \
            f"{name} differs in docs/metrics.md; {hint}"


def test_docs_has_exactly_the_generated_table():
    text = DOCS.read_text()
    assert markdown_table() in text
    assert text.count("| name | type | labels |") == 1, "ONE table of metrics"


# ------------------------------------------------------------------------------------------- dashboard
def _label_names_used(expr: str) -> set[str]:
    names = set()
    for body in re.findall(r"\{([^{}]*)\}", expr):
        names |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for dst, src in re.findall(r'label_replace\([^"]*"(\w+)",\s*"[^"]*",\s*"(\w+)"', expr):
        names |= {dst, src}
    return names


ALL_LABELS = {label for m in ALL_METRICS for label in m.labels} | TARGET_LABELS | {"le"} | set().union(
    *DCGM_METRICS.values())


def test_dashboard_reads_only_catalog_metrics_and_shows_all_of_them():
    queries = dq.panel_queries()
    assert len(queries) >= 20
    seen = set()
    for q in queries:
        for name in dq.metric_names(q.expr):
            if name.startswith("DCGM_"):
                assert name in DCGM_METRICS, f"{q.panel_title}: {name}"
                assert q.needs_dcgm
                continue
            base = catalog_name(name)
            assert base, f"panel {q.panel_title!r} reads {name}, which is not in the metric catalog"
            seen.add(base)
        unknown = _label_names_used(q.expr) - ALL_LABELS
        assert not unknown, f"panel {q.panel_title!r} uses labels no metric has: {unknown}"
    assert set(BY_NAME) - seen == set(), f"catalog metrics not on the dashboard: {sorted(set(BY_NAME) - seen)}"


def test_dashboard_structure_variables_and_datasource():
    d = dq.load_dashboard()
    assert d["schemaVersion"] >= 38 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name, label in (("namespace", "namespace"), ("job", JOB_LABEL)):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}"
        assert re.fullmatch(rf"label_values\(kubetune_train_step(\{{[^}}]*\}})?, {label}\)", v["query"]), v["query"]
    assert dq.variable_queries(d) == ["kubetune_train_step", 'kubetune_train_step{namespace=~".*"}']
    ids = [p["id"] for p in dq.iter_panels(d)]
    assert len(ids) == len(set(ids)), "duplicate panel id"
    for p in dq.iter_panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("description"), f"panel {p['title']!r} explains itself"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
        if any("DCGM_" in t["expr"] for t in p["targets"]):
            assert "DCGM" in p["description"] and "no data" in p["description"], p["title"]


def test_dashboard_per_job_queries_follow_the_variables():
    for q in dq.panel_queries():
        for name in dq.metric_names(q.expr) - set(DCGM_METRICS):
            m = BY_NAME[catalog_name(name)]
            if JOB_LABEL in m.labels:
                assert re.search(rf'{name}\{{[^}}]*namespace=~"\$namespace"[^}}]*finetunejob=~"\$job"', q.expr), \
                    f"{q.panel_title}: {name} must be filtered by $namespace and $job"


def test_panel_query_substitution():
    qs = dq.panel_queries(variables={"namespace": "ml", "job": "bot"})
    step = next(q for q in qs if q.panel_title == "Step")
    assert step.query == 'max by (namespace, finetunejob) (kubetune_train_step{namespace=~"ml", finetunejob=~"bot"})'
    throughput = next(q for q in qs if q.panel_title == "Throughput" and q.ref_id == "B")
    assert "[1m]" in throughput.query and "$__rate_interval" in throughput.expr
    gpu = next(q for q in qs if q.needs_dcgm)
    assert '"$1"' in gpu.query, "label_replace's $1 is not a dashboard variable and must survive"
    assert "$" not in dq.substitute("x{a=~\"${job:regex}\", b=\"[[namespace]]\"}", {"job": "j", "namespace": "n"})
    for q in dq.panel_queries():
        assert not re.search(r"\$(namespace|job|__\w+)|\$\{", q.query), q.query


# ------------------------------------------------------------------------------------------- rules
def _rules():
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_rules_read_only_catalog_metrics_and_label_alerts_properly():
    alerts = [r for r in _rules() if "alert" in r]
    assert len(alerts) >= 6
    for r in alerts:
        names = dq.metric_names(r["expr"])
        assert names, r["alert"]
        bases = []
        for n in names:
            base = catalog_name(n)
            assert base, f"{r['alert']} reads {n}, which is not in the metric catalog"
            bases.append(BY_NAME[base])
        unknown = _label_names_used(r["expr"]) - ALL_LABELS
        assert not unknown, f"{r['alert']} uses labels no metric has: {unknown}"
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert ALERT_ANNOTATION_KEYS <= set(r["annotations"]), r["alert"]
        text = " ".join(r["annotations"].values())
        assert "$labels.job " not in text and "$labels.job}" not in text, \
            f"{r['alert']}: $labels.job is the scrape job; the FineTuneJob is $labels.{JOB_LABEL}"
        per_job = all(JOB_LABEL in m.labels for m in bases)
        if per_job:
            for key in ("summary", "description"):
                assert "{{ $labels.namespace }}/{{ $labels." + JOB_LABEL + " }}" in r["annotations"][key], \
                    f"{r['alert']}: {key} names the job"
        else:
            assert "$labels." + JOB_LABEL not in text, f"{r['alert']}: its series have no {JOB_LABEL} label"
