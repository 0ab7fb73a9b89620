"""Request ids end to end, and the access log: every answer carries its id (header and error
body), the upstream gets it as its one client-derived header, and each request leaves one
JSON line of counts and names, never text."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import httpx
import pytest

from serve_app.api.request_log import RequestLogMiddleware
from serve_app.observability import access, metrics, request_id
from serve_app.observability.request_id import accept_or_make, well_formed
from tests.unit.gateway_client import (
    CANARY,
    FRANCE,
    GREEDY,
    MODEL,
    GatewayFactory,
    RecordingASGITransport,
    error_of,
)

HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access log's lines so far, parsed (read them after the requests)."""
    caplog.set_level(logging.INFO, logger=access.ACCESS_LOGGER)

    class Lines(list[dict[str, Any]]):
        def __iter__(self):  # type: ignore[no-untyped-def]
            self[:] = [json.loads(r.getMessage()) for r in caplog.records
                       if r.name == access.ACCESS_LOGGER]
            return super().__iter__()

    return Lines()


def test_well_formed_ids_are_kept_and_others_replaced() -> None:
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for kept in ("3f2a9c", "req-01HZX5Y7", trace):
        assert accept_or_make(kept) == kept
    for refused in ("", " leading", "has space", "x" * 129, "line\nbreak", "é", None):
        assert not well_formed(refused)
        assert HEX_ID.fullmatch(accept_or_make(refused))


async def test_every_answer_carries_its_id(gateway: httpx.AsyncClient) -> None:
    made = await gateway.post("/v1/completions", json={"model": MODEL, "prompt": FRANCE,
                                                       **GREEDY})
    assert HEX_ID.fullmatch(made.headers["x-request-id"])
    kept = await gateway.get("/health", headers={"x-request-id": "ticket-42"})
    assert kept.headers["x-request-id"] == "ticket-42"
    replaced = await gateway.get("/v1/models", headers={"x-request-id": "bad id"})
    assert HEX_ID.fullmatch(replaced.headers["x-request-id"])
    assert made.headers["x-request-id"] != replaced.headers["x-request-id"]


@pytest.mark.parametrize("sent", [
    [b"first", b"second"], [b"\xff\xfe"], [b"a" * 129], [b"a" * (8 * 1024 * 1024)],
], ids=["two", "undecodable", "129 characters", "8MB"])
async def test_one_fresh_id_replaces_any_other(
    gateway: httpx.AsyncClient, access_lines: list[dict[str, Any]], sent: list[bytes],
) -> None:
    response = await gateway.post("/v1/completions", json={"model": "nope", "prompt": "x"},
                                  headers=[(b"x-request-id", value) for value in sent])
    [rid] = response.headers.get_list("x-request-id")
    assert HEX_ID.fullmatch(rid) and response.json()["error"]["request_id"] == rid
    assert [line["request_id"] for line in access_lines] == [rid]


class SeenBelow:
    """An app that notes the ids the gateway's code and Serve's log filter would see."""

    def __init__(self) -> None:
        self.ids: tuple[str | None, str] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from ray.serve.context import _get_serve_request_context

        self.ids = (request_id.current(), _get_serve_request_context().request_id)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(("forwarded", "replaced"), [("ticket-11", False),
                                                    ("x fake 200 OK user=root", True)])
async def test_under_serve_the_gateways_id_is_serves_too(forwarded: str, replaced: bool) -> None:
    """Serve's proxy forwards an id and puts it in the request's Serve context, which
    Serve's log filter stamps on the gateway's lines and handle calls carry on; the
    gateway's id takes its place there, and is echoed only when it is not the proxy's."""
    from ray.serve.context import _RequestContext, _serve_request_context

    below = SeenBelow()
    app = RequestLogMiddleware(below, echo_request_id=False)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve")
    _serve_request_context.set(_RequestContext(route="/v1/models", request_id=forwarded))
    try:
        response = await client.get("/v1/models", headers={"x-request-id": forwarded})
    finally:
        _serve_request_context.set(None)
    assert below.ids is not None
    rid, serves = below.ids
    assert serves == rid and (rid == forwarded) is not replaced
    assert response.headers.get_list("x-request-id") == ([rid] if replaced else [])


@pytest.mark.parametrize("request_kwargs", [
    {"json": {"model": MODEL, "prompt": FRANCE, "max_tokens": -1}},  # the route's 400
    {"json": {"model": "nope", "prompt": FRANCE}},  # 404
    {"content": b"{", "headers": {"content-type": "application/json"}},  # invalid JSON
    {"content": b"{}", "headers": {"content-type": "text/plain"}},  # the guard's 415
])
async def test_error_bodies_quote_the_id(gateway: httpx.AsyncClient,
                                         request_kwargs: dict[str, Any]) -> None:
    headers = {**request_kwargs.pop("headers", {}), "x-request-id": "ticket-7"}
    response = await gateway.post("/v1/completions", headers=headers, **request_kwargs)
    assert response.status_code >= 400
    assert response.json()["error"]["request_id"] == "ticket-7"
    assert response.headers["x-request-id"] == "ticket-7"


async def test_a_refused_key_is_answered_with_the_id(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport,
) -> None:
    gateway = make_gateway(recorder, api_keys=("sk-right",))
    response = await gateway.get("/v1/models", headers={"x-request-id": "ticket-8"})
    assert error_of(response, 401)["request_id"] == "ticket-8"


@pytest.mark.parametrize("stream", [False, True])
async def test_the_upstream_gets_the_id_and_nothing_else_of_the_client(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, stream: bool,
) -> None:
    response = await gateway.post(
        "/v1/completions", headers={"x-request-id": "ticket-9", "x-canary": CANARY},
        json={"model": MODEL, "prompt": FRANCE, "stream": stream, **GREEDY})
    assert response.status_code == 200
    [upstream] = recorder.headers
    assert upstream["x-request-id"] == "ticket-9"
    assert "x-canary" not in upstream


async def test_an_upstream_error_carries_the_id(make_gateway: GatewayFactory) -> None:
    def failing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "boom"}})

    gateway = make_gateway(httpx.MockTransport(failing))
    response = await gateway.post("/v1/completions", headers={"x-request-id": "ticket-10"},
                                  json={"model": MODEL, "prompt": FRANCE, **GREEDY})
    assert response.status_code == 502
    assert response.json()["error"]["request_id"] == "ticket-10"


async def test_one_access_line_per_request_with_counts_and_no_text(
    gateway: httpx.AsyncClient, access_lines: list[dict[str, Any]],
) -> None:
    await gateway.post("/v1/completions", headers={"x-request-id": "a-1"},
                       json={"model": MODEL, "prompt": f"{CANARY} {FRANCE}", **GREEDY})
    await gateway.post("/v1/chat/completions", headers={"x-request-id": "a-2"}, json={
        "model": MODEL, "messages": [{"role": "user", "content": CANARY}], "stream": True,
        "stream_options": {"include_usage": True}, **GREEDY})
    await gateway.post("/v1/completions", headers={"x-request-id": "a-3"},
                       json={"model": MODEL, "prompt": CANARY, "max_tokens": -1})
    lines = list(access_lines)
    assert [line["request_id"] for line in lines] == ["a-1", "a-2", "a-3"]
    completion, chat, refused = lines
    assert CANARY not in json.dumps(lines)
    assert completion["route"] == "/v1/completions" and completion["status"] == 200
    assert completion["model"] == MODEL and completion["backend"] == "http://ref/v1"
    assert completion["prompt_tokens"] == len(f"{CANARY} {FRANCE}") + 1  # bytes, and BOS
    assert completion["completion_tokens"] == 16 and completion["latency_ms"] > 0
    assert chat["route"] == "/v1/chat/completions" and chat["completion_tokens"] == 16
    assert refused["status"] == 400 and refused["model"] == "unknown"
    assert refused["prompt_tokens"] == 0 and refused["backend"] is None


async def test_metrics_are_recorded_with_configured_names_only(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, embed: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, tuple[Any, ...]]] = []
    for name in ("record_request", "record_tokens", "record_rejection"):
        monkeypatch.setattr(metrics, name,
                            lambda *args, _name=name: calls.append((_name, args)))
    gateway = make_gateway(recorder, api_keys=("sk-right",))
    key = {"authorization": "Bearer sk-right"}
    await gateway.post("/v1/completions", headers=key, json={
        "model": MODEL, "prompt_embeds": embed(FRANCE), "prompt": "Hi", **GREEDY})
    await gateway.get(f"/v1/models/{CANARY}", headers=key)
    await gateway.get("/v1/models")  # no key
    await gateway.post("/v1/completions", headers=key,
                       json={"model": MODEL, "prompt": "x" * 5000, "max_tokens": 4})
    requests = [args for name, args in calls if name == "record_request"]
    assert [(route, model, status) for route, model, status, *_ in requests] == [
        ("/v1/completions", MODEL, 200), ("/v1/models/{model_id}", "unknown", 404),
        ("/v1/models", "unknown", 401), ("/v1/completions", "unknown", 400)]
    tokens = [args for name, args in calls if name == "record_tokens"]
    # Two prompts, two choices of 16 tokens; "Hi" and its BOS are the text rows.
    assert tokens[0] == (3, len(FRANCE) + 1, 32, MODEL)
    assert [args for name, args in calls if name == "record_rejection"] == [
        ("bad_input",), ("auth",), ("limits",)]
    assert CANARY not in repr(calls)


def test_route_labels_come_from_the_app_never_the_request() -> None:
    assert metrics.route_label("/v1/chat/completions") == "/v1/chat/completions"
    assert metrics.route_label(f"/v1/models/{CANARY}") == "/v1/models/{model_id}"
    assert metrics.route_label(f"/{CANARY}") == "other"
