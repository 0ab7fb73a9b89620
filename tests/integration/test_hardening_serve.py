"""Hardening through Serve itself, where it depends on Serve: a gateway mounted under a
route prefix with client keys and limits (Serve keeps the prefix in the path), real sockets
that trickle their bodies, and what a fake vLLM upstream receives.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from serve_app.config import (
    AppConfig,
    AuthConfig,
    BackendConfig,
    EmbeddingModelConfig,
    LimitsConfig,
    UpstreamConfig,
)
from serve_app.protocol import SamplingFields
from tests.integration.conftest import delete_app
from tests.upstream_servers import ServerProcess

pytestmark = pytest.mark.integration

PREFIX = "/gw"
KEY = "sk-serve-tier-key"
SLOTS = 4
BODY_TIMEOUT_S = 6.0
TRICKLERS = 300
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess("fake", "gw", tmp_path_factory.mktemp("gw") / "gw.jsonl")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def gateway(serve_graph: Any, fake: ServerProcess,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serve_app.deployments import build_app

    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(KEY + "\n")
    config = AppConfig(
        auth=AuthConfig(api_keys_file=str(keys)),
        embedding_models=[EmbeddingModelConfig()],
        limits=LimitsConfig(max_concurrent_requests=SLOTS, body_timeout_s=BODY_TIMEOUT_S),
        upstream=UpstreamConfig(backends=[BackendConfig(url=fake.url)]))
    serve.run(build_app(config), name="hardened", route_prefix=PREFIX)
    try:
        yield f"{serve_graph.base_url}{PREFIX}"
    finally:
        delete_app("hardened")


@pytest.fixture
def upstream(fake: ServerProcess) -> Iterator[ServerProcess]:
    fake.set_mode()
    yield fake
    fake.set_mode()


def bearer(key: str = KEY) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/completions", {"model": "serve-app-demo", "prompt": "Hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions",
     {"model": "serve-app-demo", "messages": CHAT, "max_tokens": 2}),
    ("POST", "/v1/embeddings", {"model": "serve-app-demo-embed", "input": "x"}),
    ("POST", "/v2/embed", {"model": "serve-app-demo-embed", "texts": ["x"]}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/serve-app-demo", None),
    ("GET", "/health/upstreams", None),
]
WRONG: list[list[tuple[str, str]]] = [
    [], bearer("sk-wrong"), [("authorization", f"Basic {KEY}")], [("authorization", KEY)],
    [*bearer(), *bearer("sk-wrong")], [*bearer(), *bearer()],
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_under_the_prefix_every_route_needs_the_key(
    gateway: str, upstream: ServerProcess, method: str, path: str, body: dict[str, Any] | None,
) -> None:
    before = len(upstream.events("request"))
    for headers in WRONG:
        response = httpx.request(method, gateway + path, json=body, headers=headers, timeout=60)
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.request(method, gateway + path, json=body, headers=bearer(), timeout=60)
    assert response.status_code == 200, response.text
    assert len(upstream.events("request")) - before == int(path.endswith("completions"))


def test_only_health_and_the_openapi_document_are_open(gateway: str) -> None:
    assert httpx.get(f"{gateway}/health", timeout=30).status_code == 200
    assert httpx.get(f"{gateway}/openapi.json", timeout=30).status_code == 200
    for path in ("/no/such/route", "/health/upstreams", "/v3/x"):
        assert httpx.get(gateway + path, timeout=30).status_code == 401, path


def test_only_the_allowlist_reaches_the_upstream(gateway: str, upstream: ServerProcess) -> None:
    sent = {"model": "serve-app-demo", "prompt": "Hi", "max_tokens": 2, "user": "someone",
            "top_k": 3, "stop": ["\n"], "cache_salt": "allowlist-serve"}
    response = httpx.post(f"{gateway}/v1/completions", json=sent, headers=bearer(), timeout=60)
    assert response.status_code == 200, response.text
    [row] = upstream.events("request", "allowlist-serve")
    # The stop string stays in the gateway, which reads the answer as a stream to cut it.
    assert set(row["keys"]) == {"model", "prompt_embeds", "max_tokens", "top_k", "stream",
                                "stream_options", "cache_salt"}
    assert set(row["keys"]) - {"model", "prompt_embeds"} <= set(SamplingFields.model_fields)
    for extra in ({"metadata": {"a": "b"}}, {"documents": []}, {"made_up": 1}):
        refused = httpx.post(f"{gateway}/v1/completions", json={**sent, **extra},
                             headers=bearer(), timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == next(
            iter(extra))


async def test_the_concurrency_limit_holds_under_the_prefix(
    gateway: str, upstream: ServerProcess,
) -> None:
    upstream.set_mode(events=400, gap_s=0.05)  # streams of about 20 s
    body = {"model": "serve-app-demo", "prompt": "Hi", "max_tokens": 400, "stream": True}
    async with httpx.AsyncClient(timeout=60, headers=bearer()) as client:
        streams = [await _open_stream(client, f"{gateway}/v1/completions", body)
                   for _ in range(SLOTS)]  # each holds a slot while it streams
        turned_away = await client.post(f"{gateway}/v1/completions", json=body)
        assert turned_away.status_code == 429, turned_away.text
        assert turned_away.json()["error"]["code"] == "overloaded"
        assert turned_away.headers["retry-after"] == "1"
        assert (await client.get(f"{gateway}/v1/models")).status_code == 429
        assert (await client.get(f"{gateway}/health")).status_code == 200
        for stream, _ in streams:
            await stream.aclose()
        await _until_served(client, f"{gateway}/v1/models")


async def _open_stream(client: httpx.AsyncClient, url: str,
                       body: dict[str, Any]) -> tuple[httpx.Response, AsyncIterator[str]]:
    """A stream that has begun; its line iterator is kept, since dropping it closes the
    response (and the gateway rightly ends a stream whose client went away)."""
    request = client.build_request("POST", url, json=body)
    response = await client.send(request, stream=True)
    assert response.status_code == 200
    lines = response.aiter_lines()
    while not (await anext(lines)).startswith("data: "):
        pass
    return response, lines


async def _until_served(client: httpx.AsyncClient, url: str) -> None:
    deadline = time.monotonic() + 30
    while (await client.get(url)).status_code != 200:
        assert time.monotonic() < deadline, "slots were never given back"
        await asyncio.sleep(0.2)


async def _response(reader: asyncio.StreamReader) -> bytes:
    """One whole HTTP/1.1 response: its head, then as many body bytes as it declares (the
    two can arrive in separate reads)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


async def _trickle(host: str, port: int, path: str, stop: asyncio.Event) -> bytes:
    """A client that sends its headers, then one byte of its body every second."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 4096\r\n\r\n{".encode())
        await writer.drain()
        answer = asyncio.ensure_future(_response(reader))
        while not stop.is_set() and not answer.done():
            await asyncio.wait([answer], timeout=1.0)
            if not answer.done():
                writer.write(b" ")
                await writer.drain()
        return await asyncio.wait_for(answer, 30) if not stop.is_set() else b""
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        return b"connection closed"
    finally:
        writer.close()


async def _timed_completions(gateway: str, count: int) -> list[float]:
    body = {"model": "serve-app-demo", "prompt": "Hi", "max_tokens": 2}
    seconds = []
    async with httpx.AsyncClient(timeout=60, headers=bearer()) as client:
        for _ in range(count):
            started = time.perf_counter()
            response = await client.post(f"{gateway}/v1/completions", json=body)
            assert response.status_code == 200, response.text
            seconds.append(time.perf_counter() - started)
    return seconds


async def test_trickling_clients_cannot_lock_out_the_others(
    gateway: str, upstream: ServerProcess,
) -> None:
    url = httpx.URL(gateway)
    assert url.host and url.port
    calm = await _timed_completions(gateway, 10)
    stop = asyncio.Event()
    tricklers = [asyncio.ensure_future(_trickle(url.host, url.port, f"{PREFIX}/v1/completions",
                                                stop)) for _ in range(TRICKLERS)]
    await asyncio.sleep(2.0)  # every trickler is inside the gateway, holding a connection
    assert not any(t.done() for t in tricklers)
    started = time.monotonic()
    busy = await _timed_completions(gateway, 10)
    assert time.monotonic() - started < BODY_TIMEOUT_S - 2.0  # served while they trickle
    print(f"completions p50 {statistics.median(calm) * 1e3:.0f} ms calm, "
          f"{statistics.median(busy) * 1e3:.0f} ms beside {TRICKLERS} trickling clients")
    assert statistics.median(busy) < max(1.0, 5 * statistics.median(calm))
    # Each trickler gets its 408 once its body deadline has passed.
    answers = await asyncio.wait_for(asyncio.gather(*tricklers), BODY_TIMEOUT_S + 60)
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(timed_out) == TRICKLERS, {a[:40] for a in answers}
    assert b"body_timeout" in timed_out[0]
    stop.set()
