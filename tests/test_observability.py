"""The operator's kit in deploy/observability names only what relay exports.

Every metric a dashboard query or an alert expression names must be on a real relay's
/metrics (cache and downloads on, so their series exist), with the labels its selectors use:
a renamed metric or a label a series does not carry would leave a panel empty or an alert
silent, and nothing else would notice. The PromQL is read with a small tokenizer (strings,
label matchers, ranges and grouping clauses removed; functions and keywords left out), and
the rule files without a YAML parser (relay's test dependencies have none): `.ci/deploy-check`
checks their structure and runs promtool on them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config import Mirror, Route
from tests.harness import RelayThread
from tests.origin import Origin

OBSERVABILITY = Path(__file__).resolve().parents[1] / "deploy" / "observability"

# Series Prometheus makes itself for every target, and the labels a scrape adds to relay's
# (prometheus.yml's job: job, instance, namespace, pod; a PodMonitor also container, endpoint).
PROMETHEUS_SERIES = frozenset({"up"})
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
# A whole identifier (not part of a number, a duration or a $variable) not called as a function.
_NAME = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_SELECTOR = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\s*(\{[^{}]*\})")
_LABEL_NAME = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "start", "end"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    bare = _STRING.sub('""', expr)
    bare = _GROUPING.sub(" ", bare)
    bare = _RANGE.sub(" ", bare)
    bare = _MATCHERS.sub(" ", bare)
    return {m for m in _NAME.findall(bare) if m.lower() not in _KEYWORDS}


def selector_labels(expr: str) -> dict[str, set[str]]:
    """Metric name -> the label names its `{...}` matchers use."""
    found: dict[str, set[str]] = {}
    for name, matchers in _SELECTOR.findall(expr):
        if name.lower() not in _KEYWORDS:
            labels = _LABEL_NAME.findall(_STRING.sub('""', matchers))
            found.setdefault(name, set()).update(labels)
    return found


def rule_expressions(text: str) -> list[tuple[str, str]]:
    """(alert or record name, expr) of every rule in a Prometheus rule file: plain, quoted or
    block (`|`, `>`) scalars, read line by line."""
    lines = text.splitlines()
    rules: list[tuple[str, str]] = []
    name = "?"
    for i, line in enumerate(lines):
        named = re.match(r"\s*-\s*(?:alert|record):\s*(\S+)", line)
        if named:
            name = named.group(1)
        found = re.match(r"(\s*)expr:\s*(.*?)\s*$", line)
        if not found:
            continue
        indent, value = len(found.group(1)), found.group(2)
        if value in ("|", "|-", "|+", ">", ">-", ">+"):
            block = []
            for following in lines[i + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(block).strip()
        elif value[:1] in ('"', "'"):
            value = value[1:-1]
        rules.append((name, value))
    return rules


def dashboard_expressions(dashboard: dict[str, object]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query and every label_values() variable."""
    found: list[tuple[str, str]] = []
    templating = dashboard.get("templating")
    assert isinstance(templating, dict)
    for variable in templating["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and query.startswith("label_values("):
            selector = query.removeprefix("label_values(").rsplit(",", 1)[0]
            found.append((f"variable {variable['name']}", selector))
    panels = dashboard.get("panels")
    assert isinstance(panels, list)
    for panel in panels:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    return found


def kit_expressions() -> list[tuple[str, str]]:
    exprs: list[tuple[str, str]] = []
    for path in sorted(OBSERVABILITY.glob("*.rules.yml")):
        exprs += [
            (f"{path.name} {name}", expr) for name, expr in rule_expressions(path.read_text())
        ]
    for path in sorted(OBSERVABILITY.glob("*dashboard*.json")):
        dashboard = json.loads(path.read_text())
        exprs += [(f"{path.name} {where}", e) for where, e in dashboard_expressions(dashboard)]
    return exprs


Exported = dict[str, set[str] | None]


def exported_series(text: str) -> Exported:
    """Sample name -> its label names, from a /metrics exposition. A family with no sample yet
    (a counter whose label values are only known once counted) still exports its sample
    names, with labels unknown (None)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exported: Exported = {}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            exported.setdefault(family.name + suffix, None)
        for sample in family.samples:
            exported[sample.name] = (exported[sample.name] or set()) | set(sample.labels)
    return exported


def unexported(exprs: list[tuple[str, str]], exported: Exported) -> list[str]:
    """What the expressions name that relay does not export: metrics, and labels a selector
    matches on that the metric does not carry (nor the scrape adds)."""
    problems = []
    for where, expr in exprs:
        for name in sorted(metric_names(expr) - PROMETHEUS_SERIES):
            if name not in exported:
                problems.append(f"{where}: metric {name} is not exported")
        for name, labels in sorted(selector_labels(expr).items()):
            known = exported.get(name)
            if known is not None:
                extra = labels - known - TARGET_LABELS
                if extra:
                    problems.append(f"{where}: {name} has no label {', '.join(sorted(extra))}")
    return problems


def test_metric_names_leave_out_functions_labels_keywords_and_variables() -> None:
    expr = (
        'sum by (route, status) (rate(relay_requests_total{instance=~"$instance", '
        'route!="-"}[$__rate_interval])) / ignoring(state) group_left relay_x offset 5m '
        '> bool 1e3 and on(job) absent(up{job="relay"}) or histogram_quantile(0.99, '
        "sum without (le) (rate(relay_y_bucket[5m:1m]))) unless vector(Inf)"
    )
    assert metric_names(expr) == {"relay_requests_total", "relay_x", "up", "relay_y_bucket"}
    assert selector_labels(expr)["relay_requests_total"] == {"instance", "route"}
    assert selector_labels(expr)["up"] == {"job"}


def test_rule_expressions_read_every_alert_of_the_kit() -> None:
    """Plain and block scalars; one expression per `- alert:` of each rule file."""
    for path in OBSERVABILITY.glob("*.rules.yml"):
        text = path.read_text()
        rules = rule_expressions(text)
        assert len(rules) == len(re.findall(r"(?m)^\s*- alert:", text)) > 0
        assert all(metric_names(expr) for _, expr in rules), rules
    text = (
        "  - alert: A\n    expr: |\n      sum(a)\n      / b\n    for: 5m\n"
        "  - alert: B\n    expr: 'c > 1'\n"
    )
    assert rule_expressions(text) == [("A", "sum(a) / b"), ("B", "c > 1")]


@pytest.mark.e2e
def test_every_metric_the_dashboard_and_alerts_name_is_exported(
    make_relay: Callable[..., RelayThread], origin: Origin, tmp_path: Path
) -> None:
    """Against a real relay's /metrics: every metric name (and selector label) used by a
    dashboard query or an alert expression. A query naming a metric relay does not export, or
    a label its series lack, is reported: the check is run on such queries too."""
    mirrored = Route(  # a route with several mirrors: its series are exported too
        prefix="/m/",
        upstreams=(Mirror(url=f"{origin.url}/p/x=1/"), Mirror(url=f"{origin.url}/p/x=2/")),
        allow_private=True,
    )
    relay = make_relay(
        routes=(Route(prefix="/o/", upstream=f"{origin.url}/", allow_private=True), mirrored),
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=64 * 1024 * 1024,
        data_dir=str(tmp_path / "data"),
    )
    assert httpx.get(f"{relay.url}/o/gen/1000", timeout=10).status_code == 200
    exported = exported_series(httpx.get(f"{relay.url}/metrics", timeout=10).text)

    exprs = kit_expressions()
    assert len(exprs) > 40
    assert unexported(exprs, exported) == []

    doctored = [
        ("no such metric", "sum(rate(relay_cache_hitz_total[5m]))"),
        ("no such label", 'rate(relay_cache_hits_total{route="/o/"}[5m])'),
        ("a target label", 'relay_max_streams{instance="a", namespace="relay"}'),
        ("a label of no series", 'relay_max_streams{route="/o/"}'),
    ]
    assert unexported(doctored, exported) == [
        "no such metric: metric relay_cache_hitz_total is not exported",
        "no such label: relay_cache_hits_total has no label route",
        "a label of no series: relay_max_streams has no label route",
    ]
