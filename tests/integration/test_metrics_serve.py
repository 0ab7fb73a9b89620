"""The gateway's metrics through Ray's exporter: known traffic moves every `serve_app_*`
counter by the expected amount (docs/observability.md names each exported series).

The traffic goes to an application of its own (`metrics_traffic.APP`), so the series are
told apart from the other tests' by their `application` label and start from zero.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.conftest import ServeGraph, client_side_embeds, delete_app
from tests.metrics_traffic import (
    APP,
    EMBED_MODEL,
    PROMPT,
    SERVED,
    ObservedApp,
    Scrape,
    Traffic,
    deploy_observed_app,
    send_known_traffic,
    upstream_payload_bytes,
)

pytestmark = pytest.mark.integration

SETTLE_S = 60.0
"""Ray's agent exports every few seconds; the counters settle well within this."""

Expected = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def observed(serve_graph: ServeGraph) -> Iterator[ObservedApp]:
    app = deploy_observed_app(serve_graph.base_url, serve_graph.proxy.url)
    try:
        yield app
    finally:
        delete_app(APP)


def metrics_url() -> str:
    import ray._private.worker as worker

    return f"http://127.0.0.1:{worker._global_node.metrics_export_port}/metrics"


def series(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted({"application": APP, **labels}.items()))


def read(scrape: Scrape, expected: Expected) -> Expected:
    return {key: scrape.total(key[0], **dict(key[1])) for key in expected}


def settle(expected: Expected, before: Expected) -> Expected:
    """The moves of `expected`'s series once they reach it, or at the deadline."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        now = read(Scrape.get(metrics_url()), expected)
        moved = {key: now[key] - before[key] for key in expected}
        if moved == expected or time.monotonic() > deadline:
            return moved
        time.sleep(0.5)


def expected_moves(app: ObservedApp, traffic: Traffic, payload_bytes: int) -> Expected:
    """Gateway-level series first (recorded by the api layer), then the embedder's and the
    upstream's. Six prompts go upstream: 3 completions, 2 chats, 1 stream; each is one
    Embedder batch of one prompt, as they are sent one after another."""
    completions, chat = "/v1/completions", "/v1/chat/completions"
    return {
        series("ray_serve_app_requests_total", route=completions, model=SERVED,
               status="200"): 4,
        series("ray_serve_app_requests_total", route=chat, model=SERVED, status="200"): 2,
        series("ray_serve_app_requests_total", route="/v1/embeddings", status="200"): 2,
        series("ray_serve_app_requests_total", route=completions, status="400"): 1,
        series("ray_serve_app_request_duration_seconds_count", route=completions): 5,
        series("ray_serve_app_request_duration_seconds_count", route=chat): 2,
        series("ray_serve_app_request_duration_seconds_count", route="/v1/embeddings"): 2,
        # The first byte of each answer's body (the error's too).
        series("ray_serve_app_time_to_first_token_seconds_count", route=completions): 5,
        series("ray_serve_app_time_to_first_token_seconds_count", route=chat): 2,
        series("ray_serve_app_prompt_tokens_total", source="text"): traffic.prompt_tokens_text,
        series("ray_serve_app_prompt_tokens_total", source="client_embeds"):
            traffic.prompt_tokens_client_embeds,
        series("ray_serve_app_completion_tokens_total", model=SERVED):
            traffic.completion_tokens,
        series("ray_serve_app_rejections_total", reason="bad_input"): 1,
        series("ray_serve_app_rejections_total", reason="auth"): 0,
        # The Embedder.
        series("ray_serve_app_embedder_batch_size_count"): 6,
        series("ray_serve_app_embedder_batch_size_bucket", le="1.0"): 6,
        series("ray_serve_app_embedder_batch_tokens_count"): 6,
        series("ray_serve_app_embedder_stage_seconds_count", stage="lookup"): 6,
        series("ray_serve_app_embedder_stage_seconds_count", stage="encode"): 6,
        series("ray_serve_app_embedder_stage_seconds_count", stage="transform"): 0,
        series("ray_serve_app_embedder_payload_bytes_total"): payload_bytes,
        # The fleet: the dead backend's one attempt, retried on the live one, ejects it.
        series("ray_serve_app_upstream_requests_total", backend=app.live, status="200"): 6,
        series("ray_serve_app_upstream_requests_total", backend=app.dead,
               status="unreachable"): 1,
        series("ray_serve_app_upstream_requests_total", backend=app.dead): 1,
        series("ray_serve_app_upstream_retries_total", backend=app.dead,
               reason="unreachable"): 1,
        series("ray_serve_app_upstream_retries_total", backend=app.live): 0,
        series("ray_serve_app_upstream_ejections_total", backend=app.dead,
               reason="unreachable"): 1,
        series("ray_serve_app_upstream_ejections_total", backend=app.live): 0,
        series("ray_serve_app_upstream_time_to_first_token_seconds_count",
               backend=app.live): 1,
        # Every prompt is a block or longer, so routed by its prefix key; with the dead
        # backend out (ejected, or tried), the live one is each key's first choice.
        series("ray_serve_app_upstream_routes_total", backend=app.live,
               outcome="affinity"): 6,
        series("ray_serve_app_upstream_routes_total", backend=app.live,
               outcome="spilled_in"): 0,
    }


def test_known_traffic_moves_each_counter(  # type: ignore[no-untyped-def]
    observed: ObservedApp, serve_graph: ServeGraph, demo_tokenizer, demo_causal_lm
) -> None:
    embeds = client_side_embeds(demo_tokenizer, demo_causal_lm, PROMPT)
    before_bodies = len(serve_graph.proxy.bodies)
    before_scrape = Scrape.get(metrics_url())
    traffic = send_known_traffic(observed, embeds)
    payload = upstream_payload_bytes(serve_graph.proxy.bodies[before_bodies:])
    expected = expected_moves(observed, traffic, payload)
    moved = settle(expected, read(before_scrape, expected))
    assert payload > 0 and traffic.prompt_tokens_client_embeds > 0
    mismatched = {f"{name} {dict(labels)}": (moved[(name, labels)], value)
                  for (name, labels), value in expected.items()
                  if moved[(name, labels)] != value}
    assert not mismatched, f"(moved, expected): {mismatched}"


def test_gauges_show_the_fleet_after_the_traffic(observed: ObservedApp) -> None:
    """Run after the traffic: nothing in flight, the dead backend ejected, the live one
    healthy (summed over the Dispatcher's replicas)."""
    scrape = wait_for(lambda s: s.total("ray_serve_app_upstream_state", application=APP,
                                        backend=observed.dead, state="ejected") >= 1)
    state = "ray_serve_app_upstream_state"
    assert scrape.total("ray_serve_app_upstream_in_flight", application=APP) == 0
    assert scrape.total(state, application=APP, backend=observed.dead, state="healthy") == 0
    assert scrape.total(state, application=APP, backend=observed.live, state="healthy") >= 1
    assert scrape.total(state, application=APP, backend=observed.live, state="ejected") == 0


def wait_for(condition: Callable[[Scrape], bool]) -> Scrape:
    deadline = time.monotonic() + SETTLE_S
    while True:
        scrape = Scrape.get(metrics_url())
        if condition(scrape) or time.monotonic() > deadline:
            return scrape
        time.sleep(0.5)


def test_label_values_come_only_from_names(observed: ObservedApp) -> None:
    """Every `serve_app` series' labels hold configured names and fixed values."""
    scrape = Scrape.get(metrics_url())
    allowed = {
        "route": {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v2/embed",
                  "/v1/models", "/v1/models/{model_id}", "/health", "/health/upstreams",
                  "other"},
        "model": {SERVED, EMBED_MODEL, "unknown"},
        "source": {"text", "client_embeds"},
        "reason": {"auth", "limits", "overload", "bad_input", "unreachable", "timeout",
                   "http_5xx", "bad_stream", "transport_error", "probe_failed", "other",
                   "429", "502", "503", "504"},
        "stage": {"lookup", "transform", "encode"},
        "state": {"healthy", "ejected", "half_open", "retired"},
    }
    ours = [s for s in scrape.samples if s.name.startswith("ray_serve_app_")]
    assert ours
    for sample in ours:
        for label, values in allowed.items():
            if label in sample.labels:
                assert sample.labels[label] in values, (sample.name, label, sample.labels)
        if "backend" in sample.labels:
            assert sample.labels["backend"].startswith("http://127.0.0.1:"), sample
        if "status" in sample.labels:
            assert re.fullmatch(r"[1-5]\d\d|timeout|unreachable|error|cancelled|other",
                                sample.labels["status"]), sample
