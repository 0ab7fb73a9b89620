"""Every Prometheus metric of the gateway, and the small typed functions that record them.

Metrics go through `ray.serve.metrics`, so Ray's metrics agent exports them next to Serve's
own (each replica adds `deployment`, `replica` and `application` tags). The exporter
prefixes each name with `ray_` and gives counters a `_total` suffix, so the counter
`serve_app_requests` is scraped as `ray_serve_app_requests_total` and the histogram
`serve_app_request_duration_seconds` as `ray_serve_app_request_duration_seconds_bucket`,
`_sum` and `_count` (docs/observability.md lists them all).

Label values come only from the code and the config (route templates, served model names,
backend urls, fixed reasons), never from a request: a value outside its fixed set is
recorded as "other". Metrics are created on first use, so importing this module creates
nothing, and one created inside a Serve replica carries that replica's tags. Outside Ray
(unit tests, the in-process pipeline) recording is a no-op.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import cast

from ray.serve.metrics import Counter, Gauge, Histogram

OTHER = "other"
"""The label value for anything outside a label's fixed set."""

ROUTES = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v2/embed",
    "/v1/models", "/v1/models/{model_id}", "/health", "/health/privacy", "/health/upstreams",
})
"""The gateway's route templates: the only values of the `route` label besides "other"."""

REJECTION_REASONS: frozenset[str] = frozenset({"auth", "limits", "overload", "bad_input"})

EMBEDDER_STAGES = frozenset({"lookup", "transform", "encode"})

UPSTREAM_OUTCOMES = frozenset({"timeout", "unreachable", "error", "cancelled"})
"""`status` of an upstream attempt that got no HTTP status back (else the status code)."""

ROUTE_OUTCOMES = frozenset({"affinity", "spilled_in", "spilled_out"})
"""`outcome` of a request routed by prefix affinity, as counted on each backend."""

FAILURE_KINDS = frozenset({"timeout", "unreachable", "http_5xx", "bad_stream",
                           "transport_error", "probe_failed"})
"""`reason` of an ejection: the kind of the failure that set the backend aside."""

# Buckets: latency from milliseconds to the default total deadline (600 s); embedder
# stages from 100 µs; batches up to the largest batch sizes and token counts configured.
_LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                      60.0, 120.0, 300.0, 600.0]
_STAGE_BUCKETS_S = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0]
_BATCH_SIZE_BUCKETS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256]
_BATCH_TOKEN_BUCKETS: list[float] = [16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576]


def _keys(*names: str) -> tuple[str]:
    """Tag keys; Ray annotates them as a 1-tuple, though any length works."""
    return cast("tuple[str]", names)


def route_label(path: str) -> str:
    """A request path (or a route's template) as its route template, else "other"."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model_id}"
    return OTHER


def _one_of(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


# ----------------------------------------------------------------- gateway (the api layer)


@functools.cache
def _requests() -> Counter:
    return Counter("serve_app_requests", "Gateway requests answered, by route, model and "
                   "HTTP status.", tag_keys=_keys("route", "model", "status"))


@functools.cache
def _request_duration() -> Histogram:
    return Histogram("serve_app_request_duration_seconds", "Gateway request duration, "
                     "from the request to the answer's last byte, by route.",
                     boundaries=_LATENCY_BUCKETS_S, tag_keys=_keys("route"))


@functools.cache
def _time_to_first_token() -> Histogram:
    return Histogram("serve_app_time_to_first_token_seconds", "Gateway time from the "
                     "request to the first token sent to the client, by route.",
                     boundaries=_LATENCY_BUCKETS_S, tag_keys=_keys("route"))


@functools.cache
def _prompt_tokens() -> Counter:
    return Counter("serve_app_prompt_tokens", "Prompt tokens (embedding rows) sent upstream, "
                   "by source: text the gateway tokenized, or client embeddings.",
                   tag_keys=_keys("source"))


@functools.cache
def _completion_tokens() -> Counter:
    return Counter("serve_app_completion_tokens", "Completion tokens answered, by model.",
                   tag_keys=_keys("model"))


@functools.cache
def _rejections() -> Counter:
    return Counter("serve_app_rejections", "Requests refused by the gateway itself, by "
                   "reason: auth, limits, overload, bad_input.", tag_keys=_keys("reason"))


def record_request(route: str, model: str, status: int, duration_s: float,
                   ttft_s: float | None) -> None:
    """One answered request. `route`: the path or route template (anything unknown is
    "other"); `model`: a configured served name, or "unknown"; `ttft_s`: when a token
    was sent."""
    route = route_label(route)
    _requests().inc(1, {"route": route, "model": model, "status": str(status)})
    _request_duration().observe(max(duration_s, 0.0), {"route": route})
    if ttft_s is not None:
        _time_to_first_token().observe(max(ttft_s, 0.0), {"route": route})


def record_tokens(prompt_text: int, prompt_client_embeds: int, completion: int,
                  model: str) -> None:
    """One request's tokens: prompt rows from text and from client embeddings, and the
    completion's tokens (`model`: a configured served name)."""
    if prompt_text > 0:
        _prompt_tokens().inc(prompt_text, {"source": "text"})
    if prompt_client_embeds > 0:
        _prompt_tokens().inc(prompt_client_embeds, {"source": "client_embeds"})
    if completion > 0:
        _completion_tokens().inc(completion, {"model": model})


def record_rejection(reason: str) -> None:
    """A request the gateway refused before serving it; `reason` is one of
    `REJECTION_REASONS` (anything else is recorded as "other")."""
    _rejections().inc(1, {"reason": _one_of(reason, REJECTION_REASONS)})


# ----------------------------------------------------------------- embedder


@functools.cache
def _batch_size() -> Histogram:
    return Histogram("serve_app_embedder_batch_size", "Prompts per Embedder batch.",
                     boundaries=_BATCH_SIZE_BUCKETS)


@functools.cache
def _batch_tokens() -> Histogram:
    return Histogram("serve_app_embedder_batch_tokens", "Embedding rows per Embedder batch.",
                     boundaries=_BATCH_TOKEN_BUCKETS)


@functools.cache
def _stage_seconds() -> Histogram:
    return Histogram("serve_app_embedder_stage_seconds", "Seconds per Embedder batch in each "
                     "stage: lookup, transform (only when one runs), encode.",
                     boundaries=_STAGE_BUCKETS_S, tag_keys=_keys("stage"))


@functools.cache
def _payload_bytes() -> Counter:
    return Counter("serve_app_embedder_payload_bytes", "Bytes of encoded prompt embeddings "
                   "(base64) the Embedder produced.")


def record_embedder_batch(size: int, tokens: int, stage_seconds: Mapping[str, float],
                          payload_bytes: int) -> None:
    """One Embedder batch: its prompts, rows, seconds per stage that ran, and bytes made."""
    _batch_size().observe(size)
    _batch_tokens().observe(tokens)
    for stage, seconds in stage_seconds.items():
        _stage_seconds().observe(max(seconds, 0.0), {"stage": _one_of(stage, EMBEDDER_STAGES)})
    if payload_bytes > 0:
        _payload_bytes().inc(payload_bytes)


# ----------------------------------------------------------------- upstream fleet


@functools.cache
def _upstream_requests() -> Counter:
    return Counter("serve_app_upstream_requests", "Attempts sent to each upstream backend, "
                   "by its HTTP status, or timeout / unreachable / error / cancelled when it "
                   "gave none.", tag_keys=_keys("backend", "status"))


@functools.cache
def _upstream_ttft() -> Histogram:
    return Histogram("serve_app_upstream_time_to_first_token_seconds", "Streamed attempts: "
                     "seconds from the POST to the backend's first event.",
                     boundaries=_LATENCY_BUCKETS_S, tag_keys=_keys("backend"))


@functools.cache
def _upstream_retries() -> Counter:
    return Counter("serve_app_upstream_retries", "Attempts retried on another backend, by "
                   "the backend that failed and why (its HTTP status, or unreachable).",
                   tag_keys=_keys("backend", "reason"))


@functools.cache
def _upstream_ejections() -> Counter:
    return Counter("serve_app_upstream_ejections", "Times a backend was set aside, by the "
                   "kind of failure that did it.", tag_keys=_keys("backend", "reason"))


@functools.cache
def _upstream_routes() -> Counter:
    return Counter("serve_app_upstream_routes", "Requests with a prefix key routed by "
                   "affinity: taken by the key's first choice (affinity), taken for a first "
                   "choice that was full or over its bounded load (spilled_in), and passed "
                   "on by that first choice (spilled_out).",
                   tag_keys=_keys("backend", "outcome"))


@functools.cache
def _upstream_in_flight() -> Gauge:
    return Gauge("serve_app_upstream_in_flight", "Requests in flight to each backend, per "
                 "Dispatcher replica.", tag_keys=_keys("backend"))


@functools.cache
def _upstream_state() -> Gauge:
    return Gauge("serve_app_upstream_state", "Each backend's state as one Dispatcher replica "
                 "sees it: 1 for the current state, 0 for the others.",
                 tag_keys=_keys("backend", "state"))


def _status_label(status: int | str) -> str:
    if isinstance(status, int):
        return str(status) if 100 <= status < 600 else OTHER
    return _one_of(status, UPSTREAM_OUTCOMES)


def record_upstream_attempt(backend: str, status: int | str) -> None:
    """One attempt on a backend (its configured url): the HTTP status it answered, or one
    of `UPSTREAM_OUTCOMES`."""
    _upstream_requests().inc(1, {"backend": backend, "status": _status_label(status)})


def record_upstream_first_token(backend: str, seconds: float) -> None:
    _upstream_ttft().observe(max(seconds, 0.0), {"backend": backend})


def record_upstream_retry(backend: str, reason: int | str) -> None:
    """An attempt on `backend` failed in a way that is retried on another backend."""
    _upstream_retries().inc(1, {"backend": backend, "reason": _status_label(reason)})


def record_upstream_ejection(backend: str, reason: str) -> None:
    """`backend` was set aside; `reason` is one of `FAILURE_KINDS`."""
    _upstream_ejections().inc(1, {"backend": backend,
                                  "reason": _one_of(reason, FAILURE_KINDS)})


def record_upstream_route(backend: str, outcome: str) -> None:
    """A keyed request's routing on `backend`; `outcome` is one of `ROUTE_OUTCOMES`."""
    _upstream_routes().inc(1, {"backend": backend,
                               "outcome": _one_of(outcome, ROUTE_OUTCOMES)})


def set_upstream_in_flight(backend: str, in_flight: int) -> None:
    _upstream_in_flight().set(in_flight, {"backend": backend})


def set_upstream_state(backend: str, state: str, states: Iterable[str]) -> None:
    """`state` is 1 and every other of `states` 0, so a query sees one current state."""
    for each in states:
        _upstream_state().set(1 if each == state else 0, {"backend": backend, "state": each})
