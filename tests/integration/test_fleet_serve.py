"""The fleet through the real Serve graph: a client that hangs up closes the upstream
request, a new fleet given as the Dispatcher's `user_config` applies in place while a
stream runs, the backends' state is visible, an upstream's 429 reaches the client
with its Retry-After in the OpenAI shape, and two Dispatcher replicas send prompts that
share a prefix to one backend.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import FleetApp
from tests.upstream_servers import ServerProcess

pytestmark = pytest.mark.integration


def body(tag: str, stream: bool = True) -> dict[str, Any]:
    return {"model": "serve-app-demo", "prompt": "Tell me about France", "max_tokens": 4,
            "stream": stream, "cache_salt": tag}


def sdk_args(tag: str) -> dict[str, Any]:
    """`body` for the OpenAI SDK: the tag (which the fakes log) as vLLM's cache salt."""
    return {"model": "serve-app-demo", "prompt": "Tell me about France", "max_tokens": 4,
            "extra_body": {"cache_salt": tag}}


async def test_client_disconnect_reaches_the_upstream_within_a_second(
        fleet_app: FleetApp, fakes: dict[str, ServerProcess]) -> None:
    fleet_app.deploy(fakes["a"])
    fakes["a"].set_mode(events=400, gap_s=0.05)
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", f"{fleet_app.url}/v1/completions",
                                 json=body("serve-cancel")) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
            hung_up = time.time()
    deadline = time.monotonic() + 5
    while not fakes["a"].events("disconnect", "serve-cancel"):
        assert time.monotonic() < deadline, "the upstream request was never closed"
        await asyncio.sleep(0.05)
    [disconnect] = fakes["a"].events("disconnect", "serve-cancel")
    assert disconnect["t"] - hung_up < 1.0
    assert fakes["a"].events("done", "serve-cancel") == []
    await asyncio.sleep(0.2)
    assert fleet_app.upstreams()[fakes["a"].url]["in_flight"] == 0


async def test_new_fleet_applies_in_place_without_dropping_a_stream(
        fleet_app: FleetApp, fakes: dict[str, ServerProcess]) -> None:
    fleet_app.deploy(fakes["a"])
    fakes["a"].set_mode(events=40, gap_s=0.1)  # a 4-second stream

    async def read_stream() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", f"{fleet_app.url}/v1/completions",
                                     json=body("serve-inplace")) as response:
                return [line async for line in response.aiter_lines() if line]

    running = asyncio.ensure_future(read_stream())
    await asyncio.sleep(1.0)
    await asyncio.to_thread(fleet_app.deploy, fakes["b"])
    # The same replica, its state kept: a is retired, still holding the running stream.
    states = fleet_app.upstreams()
    assert states[fakes["a"].url]["state"] == "retired"
    assert states[fakes["a"].url]["in_flight"] == 1 and not running.done()
    client = openai.OpenAI(base_url=f"{fleet_app.url}/v1", api_key="EMPTY", max_retries=0)
    answer = await asyncio.to_thread(client.completions.create, **sdk_args("serve-new"))
    assert answer.choices[0].text == "b"

    lines = await running
    assert lines[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in lines)
    assert '"a39 "' in lines[-2]
    assert fakes["a"].events("done", "serve-inplace")
    assert list(fleet_app.upstreams()) == [fakes["b"].url]


async def test_upstream_state_is_visible_and_a_429_keeps_its_retry_after(
        fleet_app: FleetApp, fakes: dict[str, ServerProcess]) -> None:
    fleet_app.deploy(fakes["c"])
    fakes["c"].set_mode(status=429, retry_after=7)
    client = openai.OpenAI(base_url=f"{fleet_app.url}/v1", api_key="EMPTY", max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        await asyncio.to_thread(client.completions.create, **sdk_args("serve-429"))
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.code == "upstream_rate_limited"
    state = fleet_app.upstreams()[fakes["c"].url]
    assert state["state"] == "healthy" and 5 < state["throttled_remaining_s"] <= 7
    assert state["last_error"] == "HTTP 429"


async def test_dispatcher_replicas_send_a_shared_prefix_to_one_backend(
        fleet_app: FleetApp, fakes: dict[str, ServerProcess]) -> None:
    # Both replicas start from one fleet state: the 429 test before this one leaves its
    # backend throttled for up to 7 s in the replica it ran on, which then routes that
    # backend's prefixes to their next choice while a new replica does not.
    await asyncio.to_thread(fleet_app.redeploy, *fakes.values(), dispatchers=2)
    try:
        system = "You answer for the city library, briefly and politely. " * 3
        questions = ["Opening hours?", "Fines?", "Wifi?", "Printing?", "Maps?", "Parking?"]
        async with httpx.AsyncClient(timeout=30) as client:
            for round_ in range(2):
                for index, question in enumerate(questions):
                    response = await client.post(
                        f"{fleet_app.url}/v1/completions",
                        json={**body(f"serve-affinity-{round_}-{index}", stream=False),
                              "prompt": system + question})
                    assert response.status_code == 200, response.text
            for index in range(12):
                response = await client.post(
                    f"{fleet_app.url}/v1/completions",
                    json={**body(f"serve-spread-{index}", stream=False),
                          "prompt": f"Question {index} of many. {system}"})
                assert response.status_code == 200, response.text
        shared = {name for name, server in fakes.items()
                  if server.events("request", "serve-affinity-")}
        spread = {name for name, server in fakes.items()
                  if server.events("request", "serve-spread-")}
        assert len(shared) == 1, shared
        assert len(spread) >= 2, spread
        rows = fleet_app.upstreams()
        assert sum(row["routed_by_affinity"] for row in rows.values()) > 0
    finally:
        await asyncio.to_thread(fleet_app.deploy, fakes["a"])
