"""Fleet routing and bookkeeping without servers: weights, status, Retry-After parsing.

(Failover, health, timeouts and cancellation run against real processes in
tests/loopback/test_fleet.py.)
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import orjson
import pytest
import torch

from serve_app.config import BackendConfig, UpstreamConfig
from serve_app.prompts.codec import encode_prompt_embeds
from serve_app.upstream.call import UpstreamCall
from serve_app.upstream.dispatcher import DispatcherCore
from serve_app.upstream.failures import retry_after_seconds

EMBEDS = [encode_prompt_embeds(torch.randn(2, 4))]


def answer_by_host(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"index": 0, "text": request.url.host,
                                                  "finish_reason": "length"}]})


async def test_idle_fleet_splits_traffic_by_weight() -> None:
    config = UpstreamConfig(backends=[BackendConfig(url="http://heavy/v1", weight=3),
                                      BackendConfig(url="http://light/v1", weight=1)])
    core = DispatcherCore(config, httpx.AsyncClient(transport=httpx.MockTransport(
        answer_by_host)))
    hosts: Counter[str] = Counter()
    for _ in range(400):
        reply = await core.complete(UpstreamCall("m"), EMBEDS)
        hosts[httpx.Response(200, content=reply.body).json()["choices"][0]["text"]] += 1
    await core.aclose()
    assert 0.66 < hosts["heavy"] / 400 < 0.84, hosts


async def test_status_lists_every_backend() -> None:
    config = UpstreamConfig(backends=[BackendConfig(url="http://a/v1", max_in_flight=3),
                                      BackendConfig(url="http://b/v1", dialect="nim")])
    core = DispatcherCore(config, httpx.AsyncClient(transport=httpx.MockTransport(
        answer_by_host)))
    rows = core.status()
    await core.aclose()
    assert [(row["url"], row["dialect"], row["state"], row["max_in_flight"]) for row in rows] == [
        ("http://a/v1", "vllm", "healthy", 3), ("http://b/v1", "nim", "healthy", 64)]
    assert all(row["in_flight"] == 0 and row["last_error"] is None for row in rows)


async def test_gateway_shows_the_upstreams(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/health/upstreams")
    [row] = response.json()["data"]
    assert row["url"] == "http://ref/v1" and row["state"] == "healthy"


async def test_unknown_failure_status_is_not_retried() -> None:
    seen: list[str] = []

    def respond(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(500, json={"error": {"message": "bug"}})

    config = UpstreamConfig(backends=[BackendConfig(url="http://a/v1"),
                                      BackendConfig(url="http://b/v1")])
    core = DispatcherCore(config, httpx.AsyncClient(transport=httpx.MockTransport(respond)))
    reply = await core.complete(UpstreamCall("m"), EMBEDS)
    await core.aclose()
    assert len(seen) == 1
    assert reply.status == 502
    assert orjson.loads(reply.body)["error"]["code"] == "upstream_error"


@pytest.mark.parametrize(("value", "seconds"), [
    (None, 1.0), ("", 1.0), ("7", 7.0), ("2.5", 2.5), ("-3", 0.0), ("soon", 1.0)])
def test_retry_after_values(value: str | None, seconds: float) -> None:
    assert retry_after_seconds(value) == seconds


def test_retry_after_http_date() -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 28 < retry_after_seconds(format_datetime(when, usegmt=True)) <= 30
