"""Overload: a full queue behind the ingress is an OpenAI-shaped 429 with Retry-After,
which the OpenAI SDK retries until it gets through."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest

from serve_app.config import AppConfig, BackendConfig, UpstreamConfig
from serve_app.deployments import Dispatcher, Embedder, Gateway
from tests.integration.conftest import delete_app

pytestmark = pytest.mark.integration

PREFIX = "/overloaded"
BODY = {"model": "serve-app-demo", "prompt": "Tell me about France", "max_tokens": 400,
        "temperature": 0}


@pytest.fixture(scope="module")
def overloaded_url(serve_graph) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The real Gateway with a Dispatcher that holds one request and queues one more."""
    from ray import serve

    backend = BackendConfig(url=f"{serve_graph.base_url}/reference/v1")
    config = AppConfig(upstream=UpstreamConfig(backends=[backend]))
    plain = config.model_dump(mode="json")
    embedder = Embedder.options(user_config=plain["batching"]).bind(plain)
    dispatcher = Dispatcher.options(max_ongoing_requests=1, max_queued_requests=1,
                                    user_config=plain["upstream"]).bind(embedder)
    serve.run(Gateway.bind(plain, dispatcher, {}), name="overloaded",
              route_prefix=PREFIX)
    try:
        yield f"{serve_graph.base_url}{PREFIX}"
    finally:
        delete_app("overloaded")


async def test_full_queue_is_an_openai_429_with_retry_after(overloaded_url: str) -> None:
    async with httpx.AsyncClient(timeout=120) as client:

        def post() -> asyncio.Task[httpx.Response]:
            return asyncio.ensure_future(
                client.post(f"{overloaded_url}/v1/completions", json=BODY))

        # Serve checks a handle's queue when the call is made; calls made while earlier
        # ones wait for the one busy dispatcher replica find it full.
        first = [post() for _ in range(4)]
        await asyncio.sleep(0.3)
        later = [post() for _ in range(4)]
        responses = await asyncio.gather(*first, *later)
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code", "request_id"}
            assert error["code"] == "overloaded"


async def test_the_sdk_retries_429_until_served(overloaded_url: str) -> None:
    statuses: list[int] = []

    async def record(response: httpx.Response) -> None:
        statuses.append(response.status_code)

    http = httpx.AsyncClient(timeout=120, event_hooks={"response": [record]})
    client = openai.AsyncOpenAI(base_url=f"{overloaded_url}/v1", api_key="EMPTY",
                                max_retries=20, http_client=http)
    first = [asyncio.ensure_future(client.completions.create(**BODY)) for _ in range(3)]
    await asyncio.sleep(0.3)
    later = [asyncio.ensure_future(client.completions.create(**BODY)) for _ in range(3)]
    answers = await asyncio.gather(*first, *later)
    await http.aclose()
    assert 429 in statuses  # the SDK was turned away at least once ...
    assert len(answers) == 6  # ... and retried until every request was served
    assert len({a.choices[0].text for a in answers}) == 1
