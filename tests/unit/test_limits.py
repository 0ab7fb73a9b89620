"""Request limits: each refusal is OpenAI-shaped, names its limit, and nothing goes upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from serve_app.config import LimitsConfig
from tests.unit.gateway_client import (
    FRANCE,
    GREEDY,
    GatewayFactory,
    RecordingASGITransport,
    error_of,
)

LIMITS = LimitsConfig(max_body_bytes=4096, max_items=3, max_n=2, max_tokens=8)
CHAT = [{"role": "user", "content": FRANCE}]


@pytest.fixture
def limited(make_gateway: GatewayFactory, recorder: RecordingASGITransport) -> httpx.AsyncClient:
    return make_gateway(recorder, limits=LIMITS)


async def test_declared_body_over_the_cap_is_413_unread(
    limited: httpx.AsyncClient, recorder: RecordingASGITransport
) -> None:
    body = {"model": "serve-app-demo", "prompt": "x" * 5000, **GREEDY}
    error = error_of(await limited.post("/v1/completions", json=body), 413)
    assert error["code"] == "request_too_large" and "4096" in error["message"]
    assert recorder.bodies == []


async def test_streamed_body_over_the_cap_is_413(limited: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "serve-app-demo", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000  # no content-length: the cap is enforced as bytes arrive
        yield b'"}'

    response = await limited.post("/v1/completions", content=chunks())
    error_of(response, 413)


async def test_body_under_the_cap_passes(limited: httpx.AsyncClient) -> None:
    body = {"model": "serve-app-demo", "prompt": FRANCE, **GREEDY}
    body["max_tokens"] = 8
    assert (await limited.post("/v1/completions", json=body)).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": [FRANCE] * 4}, "prompt"),
        ("/v1/completions", {"prompt": FRANCE, "n": 3}, "n"),
        ("/v1/completions", {"prompt": FRANCE, "max_tokens": 9}, "max_tokens"),
        ("/v1/chat/completions", {"messages": CHAT * 4}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}] * 4}]}, "messages"),
        ("/v1/chat/completions", {"messages": CHAT, "n": 3}, "n"),
        ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 9}, "max_tokens"),
        ("/v1/embeddings", {"model": "serve-app-demo-embed", "input": ["a"] * 4}, "input"),
        ("/v2/embed", {"model": "serve-app-demo-embed", "texts": ["a"] * 4}, "texts"),
    ],
)
async def test_each_limit_is_a_400_naming_it(
    limited: httpx.AsyncClient, recorder: RecordingASGITransport, path: str,
    body: dict[str, Any], param: str,
) -> None:
    body.setdefault("model", "serve-app-demo")
    error = error_of(await limited.post(path, json=body), 400)
    assert error["param"] == param
    assert any(str(v) in error["message"] for v in (3, 2, 8))
    assert recorder.bodies == []


async def test_at_the_limits_requests_pass(limited: httpx.AsyncClient) -> None:
    body = {"model": "serve-app-demo", "prompt": [FRANCE] * 3, "n": 2, "max_tokens": 8,
            "temperature": 0}
    response = await limited.post("/v1/completions", json=body)
    assert response.status_code == 200 and len(response.json()["choices"]) == 6


class SlowTransport(httpx.AsyncBaseTransport):
    """The reference backend, answering only once `release` is set."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.arrived.set()
        await self.release.wait()
        return await self.inner.handle_async_request(request)


async def test_concurrency_beyond_the_limit_is_an_openai_429(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport
) -> None:
    slow = SlowTransport(recorder)
    gateway = make_gateway(slow, limits=LimitsConfig(max_concurrent_requests=1))
    body = {"model": "serve-app-demo", "prompt": FRANCE, **GREEDY}
    first = asyncio.ensure_future(gateway.post("/v1/completions", json=body))
    await asyncio.wait_for(slow.arrived.wait(), 30)  # the first holds the only slot
    turned_away = await gateway.post("/v1/completions", json=body)
    error = error_of(turned_away, 429)
    assert error["code"] == "overloaded" and turned_away.headers["retry-after"] == "1"
    assert (await gateway.get("/health")).status_code == 200  # not an API route
    slow.release.set()
    assert (await first).status_code == 200
    assert (await gateway.post("/v1/completions", json=body)).status_code == 200  # slot freed
