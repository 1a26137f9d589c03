"""Every PromQL query of the Grafana dashboard, with the dashboard's variables substituted, so tests can check
them offline (syntax, metric names) and against a real Prometheus (the e2e test). Test tooling: not shipped.

    python -m tests.dashboard_queries                      # all queries, variables = .*
    python -m tests.dashboard_queries --var namespace=ml --var job=bot --json

    from tests.dashboard_queries import panel_queries
    for q in panel_queries(variables={"namespace": "ml", "job": "bot"}):
        if not q.needs_dcgm:                 # DCGM panels return data only where dcgm-exporter runs
            prom_query(q.query)

Substitution follows Grafana: `$var`, `${var}`, `${var:format}` and `[[var]]`; names that are not variables
(e.g. label_replace's "$1") are left alone, as Grafana leaves them. Grafana's built-in interval variables get
fixed values (`$__rate_interval` = 1m) unless given.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

DASHBOARD_PATH = Path(__file__).resolve().parents[1] / "helm" / "kubetune" / "files" / "dashboards" / "kubetune.json"

BUILTIN_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__interval_ms": "30000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

_VAR = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")
_METRIC = re.compile(r"(?<![\w:\"])(kubetune[_:][A-Za-z0-9_:]*|DCGM_[A-Z0-9_]+)")


@dataclass(frozen=True)
class PanelQuery:
    panel_id: int
    panel_title: str
    ref_id: str
    expr: str  # as written in the dashboard
    query: str  # variables substituted: runnable PromQL
    instant: bool
    needs_dcgm: bool


def load_dashboard(path: Path | str | None = None) -> dict:
    return json.loads(Path(path or DASHBOARD_PATH).read_text())


def iter_panels(dashboard: dict):
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def default_variables(dashboard: dict) -> dict[str, str]:
    """Each query variable's "All" value (the regex matching everything), plus the built-in intervals."""
    values = dict(BUILTIN_VARIABLES)
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            values[var["name"]] = var.get("allValue") or ".*"
        elif var.get("type") == "datasource":
            values[var["name"]] = "prometheus"
    return values


def substitute(expr: str, variables: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return variables.get(name, m.group(0))

    return _VAR.sub(repl, expr)


def panel_queries(dashboard: dict | Path | str | None = None,
                  variables: dict[str, str] | None = None) -> list[PanelQuery]:
    """All Prometheus targets of all panels; `variables` override the defaults (e.g. namespace, job)."""
    if not isinstance(dashboard, dict):
        dashboard = load_dashboard(dashboard)
    values = {**default_variables(dashboard), **(variables or {})}
    out = []
    for panel in iter_panels(dashboard):
        for t in panel.get("targets", []) or []:
            expr = t.get("expr")
            if not expr:
                continue
            out.append(PanelQuery(
                panel_id=panel.get("id"), panel_title=panel.get("title", ""), ref_id=t.get("refId", ""), expr=expr,
                query=substitute(expr, values), instant=bool(t.get("instant")), needs_dcgm="DCGM_" in expr))
    return out


def variable_queries(dashboard: dict | None = None, variables: dict[str, str] | None = None) -> list[str]:
    """The template variables' label_values(...) selectors, as PromQL series selectors."""
    dashboard = dashboard or load_dashboard()
    values = {**default_variables(dashboard), **(variables or {})}
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"^\s*label_values\((.*),\s*(\w+)\)\s*$", q or "")
        if var.get("type") == "query" and m:
            out.append(substitute(m.group(1), values))
    return out


def metric_names(expr: str) -> set[str]:
    """kubetune_*/kubetune:* (recorded) and DCGM_* names an expression reads."""
    return set(_METRIC.findall(expr))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Print the dashboard's PromQL with variables substituted.")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD_PATH)
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="e.g. namespace=ml, job=bot")
    ap.add_argument("--json", action="store_true", help="one JSON object per query")
    args = ap.parse_args(argv)
    variables = dict(v.split("=", 1) for v in args.var)
    for q in panel_queries(args.dashboard, variables):
        if args.json:
            print(json.dumps(asdict(q)))
        else:
            print(f"# {q.panel_title} [{q.ref_id}]{' (DCGM)' if q.needs_dcgm else ''}\n{q.query}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
