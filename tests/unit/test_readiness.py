"""Readiness: `/health` is 503 `starting` until an upstream backend has answered, then ready
for good; the fleet's readiness probes, and backends that are starting rather than failing."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from serve_app.config import BackendConfig, HealthConfig, UpstreamConfig
from serve_app.upstream.fleet import BackendState, Fleet
from tests.unit.gateway_client import GatewayFactory, RecordingASGITransport

URL = "http://ref/v1"


class Switchable(httpx.AsyncBaseTransport):
    """The reference upstream behind a switch: refused connections while `up` is False.
    Counts the probes (GETs) and completions (POSTs) that reach it."""

    def __init__(self, inner: httpx.AsyncBaseTransport, up: bool = False) -> None:
        self.inner = inner
        self.up = up
        self.probes = 0
        self.completions = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            self.probes += 1
        else:
            self.completions += 1
        if not self.up:
            raise httpx.ConnectError("refused", request=request)
        return await self.inner.handle_async_request(request)


def upstream(**health: Any) -> UpstreamConfig:
    return UpstreamConfig(backends=[BackendConfig(url=URL)], health=HealthConfig(**health))


async def test_health_is_starting_until_the_upstream_answers_then_ready_for_good(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport
) -> None:
    switch = Switchable(recorder)
    gateway = make_gateway(switch, upstream=upstream(probe_interval_s=0.05))
    starting = await gateway.get("/health")
    assert starting.status_code == 503
    assert starting.json() == {"status": "starting",
                               "detail": "no upstream backend has answered yet"}
    head = await gateway.head("/health")
    assert (head.status_code, head.content) == (503, b"")
    switch.up = True
    await asyncio.sleep(0.06)  # the next readiness probe is due
    ready = await gateway.get("/health")
    assert ready.status_code == 200 and ready.json()["status"] == "ok"
    head = await gateway.head("/health")
    assert (head.status_code, head.content) == (200, b"")
    switch.up = False  # an outage after the first answer: each request's 503, not /health's
    for _ in range(100):  # the fleet's own probes eject the backend
        await asyncio.sleep(0.05)
        [row] = (await gateway.get("/health/upstreams")).json()["data"]
        if row["state"] == "ejected":
            break
    assert row["state"] == "ejected"
    assert (await gateway.get("/health")).status_code == 200


async def test_checks_between_probe_rounds_do_not_reach_the_upstream(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport
) -> None:
    switch = Switchable(recorder)
    gateway = make_gateway(switch, upstream=upstream(probe_interval_s=60))
    answers = await asyncio.gather(*(gateway.get("/health") for _ in range(20)))
    assert {answer.status_code for answer in answers} == {503}
    assert switch.probes == 1  # one readiness probe for 20 checks, and none until the next
    assert switch.completions == 0


async def test_the_open_routes_answer_head(gateway: httpx.AsyncClient) -> None:
    for path in ("/health", "/openapi.json", "/docs"):
        response = await gateway.head(path)
        assert (response.status_code, response.content) == (200, b""), path
        assert response.headers["content-length"] == str(len((await gateway.get(path)).content))


# --------------------------------------------------------------------------- the fleet


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fleet_of(respond: Any, clock: Clock, **health: Any) -> Fleet:
    return Fleet(upstream(**health), httpx.AsyncClient(transport=httpx.MockTransport(respond)),
                 clock)


async def test_readiness_probes_follow_a_starting_backend_at_most_every_interval() -> None:
    state = {"up": False, "probes": 0}

    def respond(request: httpx.Request) -> httpx.Response:
        state["probes"] += 1
        return httpx.Response(200 if state["up"] else 503, json={"data": []})

    clock = Clock()
    fleet = fleet_of(respond, clock, probe_interval_s=5)
    assert not await fleet.ready()
    state["up"] = True
    assert not await fleet.ready()  # within the interval: the last round's outcome
    assert state["probes"] == 1
    clock.now = 5
    assert await fleet.ready()
    assert await fleet.ready() and state["probes"] == 2  # answered: no more probing
    await fleet.close()


async def test_a_backend_ejected_while_starting_is_readmitted_by_its_first_passed_probe() -> None:
    state = {"up": False}

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if state["up"] else 503, json={"data": []})

    clock = Clock()
    fleet = fleet_of(respond, clock, failure_threshold=1, cooldown_s=600, probe_interval_s=1)
    [backend] = fleet.backends
    fleet.failed(backend, "connect error")  # a request sent before the upstream was up
    assert backend.state is BackendState.EJECTED
    state["up"] = True
    assert await fleet.ready()  # long before its 600 s cooldown ends
    assert backend.state is BackendState.HEALTHY and backend.answered
    await fleet.close()


@pytest.mark.parametrize("answered", [False, True])
async def test_the_cooldown_grows_only_once_the_backend_has_answered(answered: bool) -> None:
    clock = Clock()
    fleet = fleet_of(lambda request: httpx.Response(503), clock, cooldown_s=10,
                     max_cooldown_s=120)
    [backend] = fleet.backends
    backend.answered = answered
    for _ in range(3):  # three failed half-open probes
        backend.state = BackendState.HALF_OPEN
        backend.probed(False, "probe answered HTTP 503", clock())
    assert backend.state is BackendState.EJECTED
    assert backend.cooldown_s == (80 if answered else 10)
    await fleet.close()
