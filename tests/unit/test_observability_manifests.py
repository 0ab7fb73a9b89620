"""The Grafana dashboard and the PodMonitor in cluster/, checked without Grafana, Prometheus
or Kubernetes: the dashboard charts every gateway metric under its exported name and
nothing that is not one, and the PodMonitor selects the RayService's pods on a port they
expose. (tests/prometheus/ runs every panel's query against a real Prometheus.)"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.exported_metrics import all_exported_names, defined_metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "cluster" / "grafana-dashboard.json"
PODMONITOR = REPO / "cluster" / "podmonitor.yaml"
RAYSERVICE = REPO / "cluster" / "rayservice.yaml"
DOCS = REPO / "docs" / "observability.md"

OUR_NAMES = re.compile(r"\bray_serve_app_\w+")

Dashboard = dict[str, Any]


@pytest.fixture
def dashboard() -> Dashboard:
    loaded: Dashboard = json.loads(DASHBOARD.read_text())
    return loaded


@pytest.fixture
def podmonitor() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(PODMONITOR.read_text())
    return loaded


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RAYSERVICE.read_text())
    return loaded


def graph_panels(dashboard: Dashboard) -> list[dict[str, Any]]:
    """Every panel that draws something (rows only group them), nested ones included."""
    found = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def queries(dashboard: Dashboard) -> list[str]:
    return [target.get("expr", "") for panel in graph_panels(dashboard)
            for target in panel.get("targets", [])]


# --- the dashboard --------------------------------------------------------------------------


def dashboard_problems(dashboard: Dashboard) -> list[str]:
    """What makes the dashboard wrong, in words; empty when it is right."""
    problems = []
    if not dashboard.get("uid") or not dashboard.get("title"):
        problems.append("no uid or title")
    variables = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])}
    panels = graph_panels(dashboard)
    rows = [panel for panel in dashboard["panels"] if panel.get("type") == "row"]
    ids = [panel.get("id") for panel in rows + panels]
    if len(ids) != len(set(ids)):
        problems.append("panel ids repeat")
    exported = all_exported_names()
    charted = set()
    for panel in panels:
        title = panel.get("title") or f"panel {panel.get('id')}"
        targets = panel.get("targets") or []
        if not targets or not all(t.get("expr", "").strip() for t in targets):
            problems.append(f"{title}: a panel without a query")
        if len({t.get("refId") for t in targets}) != len(targets):
            problems.append(f"{title}: refIds repeat")
        grid = panel.get("gridPos", {})
        if not 0 < grid.get("w", 0) <= 24 or grid.get("x", 0) + grid.get("w", 0) > 24:
            problems.append(f"{title}: outside the 24-column grid")
        for target in targets:
            expr = target.get("expr", "")
            for name in OUR_NAMES.findall(expr):
                if name not in exported:
                    problems.append(f"{title}: {name} is no exported gateway metric")
                charted.add(exported.get(name))
            for variable in re.findall(r"\$\{?(\w+)", expr):
                if variable not in variables and not variable.startswith("__"):
                    problems.append(f"{title}: ${variable} is no dashboard variable")
            if 'application=~"$application"' not in expr:
                problems.append(f"{title}: a query not filtered by $application")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{title}: a fixed data source")
    for name in sorted(set(defined_metrics()) - charted):
        problems.append(f"{name} is on no panel")
    return problems


def test_dashboard_charts_every_metric_by_its_exported_name(dashboard: Dashboard) -> None:
    assert dashboard_problems(dashboard) == []
    assert any("ray_serve_" in q and "ray_serve_app_" not in q for q in queries(dashboard))


def _unknown_metric(dashboard: Dashboard) -> None:
    graph_panels(dashboard)[0]["targets"][0]["expr"] = (
        'sum(rate(ray_serve_app_requests{application=~"$application"}[5m]))')


def _empty_query(dashboard: Dashboard) -> None:
    graph_panels(dashboard)[1]["targets"][0]["expr"] = " "


def _panel_dropped(dashboard: Dashboard) -> None:
    dashboard["panels"] = [p for p in dashboard["panels"]
                           if "ejections" not in json.dumps(p.get("targets", []))]


def _unfiltered(dashboard: Dashboard) -> None:
    target = graph_panels(dashboard)[2]["targets"][0]
    target["expr"] = target["expr"].replace('application=~"$application"', 'route!=""')


def _unknown_variable(dashboard: Dashboard) -> None:
    target = graph_panels(dashboard)[3]["targets"][0]
    target["expr"] = target["expr"].replace("$application", "$app")


@pytest.mark.parametrize("breakage", [_unknown_metric, _empty_query, _panel_dropped,
                                      _unfiltered, _unknown_variable])
def test_broken_dashboard_is_refused(dashboard: Dashboard,
                                     breakage: Callable[[Dashboard], None]) -> None:
    broken = copy.deepcopy(dashboard)
    breakage(broken)
    assert dashboard_problems(broken)


def test_docs_list_every_exported_metric() -> None:
    text = DOCS.read_text()
    for name, kind in defined_metrics().items():
        shown = f"ray_{name}_total" if kind == "counter" else f"ray_{name}"
        assert shown in text, name


# --- the PodMonitor -------------------------------------------------------------------------

# What the Prometheus Operator's PodMonitor CRD requires of the fields used here.
PODMONITOR_ESSENTIALS = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "minLength": 1},
                                    "labels": {"type": "object",
                                               "additionalProperties": {"type": "string"}}}},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "required": ["matchLabels"],
                             "additionalProperties": False,
                             "properties": {"matchLabels": {
                                 "type": "object", "minProperties": 1,
                                 "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object"},
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string", "minLength": 1},
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {
                                "action": {"enum": ["replace", "keep", "drop", "labelmap",
                                                    "labeldrop", "labelkeep"]},
                                "sourceLabels": {"type": "array",
                                                 "items": {"type": "string"}},
                                "targetLabel": {"type": "string"},
                                "regex": {"type": "string"},
                                "replacement": {"type": "string"}}}},
                    }}},
            },
        },
    },
}


def ray_pods(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each node group's pod: its template, Ray start params and KubeRay's node type."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = {"head": {**cluster["headGroupSpec"], "node_type": "head"}}
    for group in cluster["workerGroupSpecs"]:
        pods[group["groupName"]] = {**group, "node_type": "worker"}
    return pods


def podmonitor_problems(podmonitor: dict[str, Any], rayservice: dict[str, Any]) -> list[str]:
    problems = [f"schema: {error.message}" for error in
                jsonschema.Draft7Validator(PODMONITOR_ESSENTIALS).iter_errors(podmonitor)]
    if problems:
        return problems
    selector = podmonitor["spec"]["selector"]["matchLabels"]
    ports = [endpoint["port"] for endpoint in podmonitor["spec"]["podMetricsEndpoints"]]
    for name, pod in ray_pods(rayservice).items():
        labels = {**pod["template"].get("metadata", {}).get("labels", {}),
                  "ray.io/is-ray-node": "yes", "ray.io/node-type": pod["node_type"]}
        if any(labels.get(key) != value for key, value in selector.items()):
            problems.append(f"{name}: the selector {selector} misses its pod labels {labels}")
        [container] = [c for c in pod["template"]["spec"]["containers"]
                       if c["name"].startswith("ray-")]
        named = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
        exported = pod.get("rayStartParams", {}).get("metrics-export-port")
        for port in ports:
            if port not in named:
                problems.append(f"{name}: no container port named {port!r}")
            elif str(named[port]) != exported:
                problems.append(f"{name}: port {port!r} is {named[port]}, but Ray exports "
                                f"metrics on {exported}")
    return problems


def test_podmonitor_scrapes_every_ray_pod(podmonitor: dict[str, Any],
                                          rayservice: dict[str, Any]) -> None:
    assert podmonitor_problems(podmonitor, rayservice) == []
    assert len(ray_pods(rayservice)) == 3  # head, cpu-workers, gpu-workers


def _misspelt_field(podmonitor: dict[str, Any], rayservice: dict[str, Any]) -> None:
    podmonitor["spec"]["podMetricEndpoints"] = podmonitor["spec"].pop("podMetricsEndpoints")


def _wrong_kind(podmonitor: dict[str, Any], rayservice: dict[str, Any]) -> None:
    podmonitor["kind"] = "ServiceMonitor"


def _label_no_pod_has(podmonitor: dict[str, Any], rayservice: dict[str, Any]) -> None:
    podmonitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "serve-app"


def _head_only(podmonitor: dict[str, Any], rayservice: dict[str, Any]) -> None:
    podmonitor["spec"]["selector"]["matchLabels"]["ray.io/node-type"] = "head"


def _port_no_pod_exposes(podmonitor: dict[str, Any], rayservice: dict[str, Any]) -> None:
    podmonitor["spec"]["podMetricsEndpoints"][0]["port"] = "http-metrics"


def _worker_without_metrics_port(podmonitor: dict[str, Any], rayservice: dict[str, Any]) -> None:
    [container] = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"][
        "spec"]["containers"]
    container["ports"] = [p for p in container["ports"] if p.get("name") != "metrics"]


def _other_export_port(podmonitor: dict[str, Any], rayservice: dict[str, Any]) -> None:
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"][
        "metrics-export-port"] = "9090"


def _unlabelled_pods(podmonitor: dict[str, Any], rayservice: dict[str, Any]) -> None:
    del rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"]


@pytest.mark.parametrize("breakage", [
    _misspelt_field, _wrong_kind, _label_no_pod_has, _head_only, _port_no_pod_exposes,
    _worker_without_metrics_port, _other_export_port, _unlabelled_pods])
def test_broken_podmonitor_is_refused(
    podmonitor: dict[str, Any], rayservice: dict[str, Any],
    breakage: Callable[[dict[str, Any], dict[str, Any]], None],
) -> None:
    broken_monitor, broken_service = copy.deepcopy(podmonitor), copy.deepcopy(rayservice)
    breakage(broken_monitor, broken_service)
    assert podmonitor_problems(broken_monitor, broken_service)
