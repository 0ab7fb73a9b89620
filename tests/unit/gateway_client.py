"""Requests to the in-process gateway (or reference upstream) and checks of their answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

MODEL = "serve-app-demo"
FRANCE = "What is the capital of France?"
JAPAN = "Tell me about Japan."
CANARY = "CANARY-7f3a9-do-not-leak"

GatewayFactory = Callable[..., httpx.AsyncClient]
"""`make_gateway(transport, api_keys=(), limits=None, root_path="", upstream=..., **config)`:
a gateway client whose upstream is reached through `transport`, accepting only `api_keys`
when given, mounted under `root_path`, with other `AppConfig` sections from `config`."""


class RecordingASGITransport(httpx.ASGITransport):
    """ASGITransport that keeps the body (and headers) of every completion it sends to the
    app; the fleet's health probes (GETs, at the readiness check and every probe interval)
    pass unrecorded, so a slow test sees the same requests as a fast one."""

    def __init__(self, app: Any) -> None:
        super().__init__(app=app)
        self.bodies: list[bytes] = []
        self.headers: list[httpx.Headers] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.bodies.append(await request.aread())
            self.headers.append(request.headers)
        return await super().handle_async_request(request)


async def post(client: httpx.AsyncClient, path: str = "/v1/completions",
               **body: Any) -> httpx.Response:
    body.setdefault("model", MODEL)
    return await client.post(path, json=body)


async def ok(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await post(client, **body)
    assert response.status_code == 200, response.text
    return response.json()


async def texts(client: httpx.AsyncClient, **body: Any) -> list[str]:
    return [choice["text"] for choice in (await ok(client, **body))["choices"]]


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) - {"request_id"} == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


GREEDY = {"temperature": 0, "max_tokens": 16}
