"""Every query of cluster/grafana-dashboard.json returns data from a real Prometheus that
scrapes a local Serve run under known traffic (docs/observability.md, "The Prometheus tier").

Traffic goes twice through an application of its own (`metrics_traffic`): the first round
creates every series (a counter's first value is not an increase to Prometheus), the
second moves them, so rates and quantiles over the last minutes have something to show.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.exported_metrics import defined_metrics, exported_names
from tests.integration.conftest import ServeGraph, client_side_embeds
from tests.metrics_traffic import (
    APP,
    PROMPT,
    ObservedApp,
    deploy_observed_app,
    send_known_traffic,
)
from tests.prometheus.conftest import Prometheus

pytestmark = pytest.mark.prometheus

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana-dashboard.json"
SETTLE_S = 90.0
# Grafana's variables as this test sets them: the traffic's application, and a window that
# holds the second round of traffic.
VARIABLES = {"$application": APP, "$__rate_interval": "3m"}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    return [(f"{panel['title']} [{target['refId']}]", target["expr"])
            for panel in panels if panel.get("type") != "row"
            for target in panel.get("targets", [])]


def with_variables(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def wait_for(prometheus: Prometheus, promql: str, at_least: float) -> float:
    """The query's single value once it reaches `at_least` (or the deadline's value)."""
    deadline = time.monotonic() + SETTLE_S
    value = 0.0
    while time.monotonic() < deadline:
        result = prometheus.query(promql)
        value = float(result[0]["value"][1]) if result else 0.0
        if value >= at_least:
            break
        time.sleep(1)
    return value


@pytest.fixture(scope="module")
def observed(serve_graph: ServeGraph, prometheus: Prometheus,  # type: ignore[no-untyped-def]
             demo_tokenizer, demo_causal_lm) -> Iterator[ObservedApp]:
    from ray import serve

    app = deploy_observed_app(serve_graph.base_url, serve_graph.proxy.url)
    embeds = client_side_embeds(demo_tokenizer, demo_causal_lm, PROMPT)
    try:
        send_known_traffic(app, embeds)
        names = 'count(group by (__name__) ({__name__=~"ray_serve_app_.+"}))'
        wait_for(prometheus, names, len(expected_series()))
        assert counted(prometheus, 1) == rounds_of(1)
        send_known_traffic(app, embeds)
        assert counted(prometheus, 2) == rounds_of(2)
        yield app
    finally:
        serve.delete(APP)


# One round of traffic as each kind of replica counts it (each exports on its own
# schedule): the Gateway's answers, the Embedder's batches, the Dispatcher's answered
# upstream attempts (the dead backend's one try, in the first round only, left out).
ROUND = {'ray_serve_app_requests_total{application="%s"}': 9,
         'ray_serve_app_embedder_batch_size_count{application="%s"}': 6,
         'ray_serve_app_upstream_requests_total{application="%s", status="200"}': 6}


def counted(prometheus: Prometheus, rounds: int) -> dict[str, float]:
    """Each `ROUND` counter once Prometheus has seen `rounds` rounds of it (or at the
    deadline: then a caller's comparison shows which fell short)."""
    return {series: wait_for(prometheus, f"sum({series % APP})", rounds * per_round)
            for series, per_round in ROUND.items()}


def rounds_of(rounds: int) -> dict[str, float]:
    return {series: rounds * per_round for series, per_round in ROUND.items()}


def expected_series() -> set[str]:
    return {exported for name, kind in defined_metrics().items()
            for exported in exported_names(name, kind)}


def test_prometheus_has_every_gateway_series(prometheus: Prometheus,
                                             observed: ObservedApp) -> None:
    found = set(prometheus.label_values("__name__", f'{{application="{APP}"}}'))
    assert expected_series() <= found, sorted(expected_series() - found)


def test_the_application_variable_lists_the_app(prometheus: Prometheus,
                                                observed: ObservedApp) -> None:
    assert APP in prometheus.label_values("application", "ray_serve_app_requests_total")


@pytest.mark.parametrize(("panel", "expr"), dashboard_queries(),
                         ids=[title for title, _ in dashboard_queries()])
def test_every_panel_query_returns_data(prometheus: Prometheus, observed: ObservedApp,
                                        panel: str, expr: str) -> None:
    result = prometheus.query(with_variables(expr))
    values = [float(series["value"][1]) for series in result]
    assert values, f"{panel}: no data for {with_variables(expr)}"
    assert any(math.isfinite(value) for value in values), f"{panel}: only NaN ({values})"
