"""The metric names a Grafana dashboard queries, and the ones a Prometheus text exposition offers."""

from __future__ import annotations

import re

_SUFFIXES = {"counter": ("", "_total"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("", "_sum", "_count")}


def exposition_names(text: str) -> set[str]:
    """Every series name a scrape can hold, from its `# TYPE` lines (families without samples yet included)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            names.update(family + suffix for suffix in _SUFFIXES.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_metrics(dashboard: dict) -> set[str]:
    """The tgi_* series names in the PromQL of every panel target and template variable."""
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    queries += [v.get("query", "") for v in dashboard.get("templating", {}).get("list", []) if isinstance(v.get("query"), str)]
    return {name for query in queries for name in re.findall(r"\btgi_\w+", query)}
