"""A Dispatcher replica that dies mid-stream, in the real Serve graph: the client gets the
events sent so far, then an OpenAI error event and `[DONE]`, without waiting on a stream
that will never end; Serve replaces the replica and the gateway serves again.

The gateway is an app of its own under its own prefix, so killing its replica touches no
other test's app; its upstream is a fake vLLM server whose stream is slow enough for the
kill to land in the middle of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest

from serve_app.config import AppConfig, BackendConfig, UpstreamConfig
from tests.integration.conftest import delete_app
from tests.upstream_servers import ServerProcess

pytestmark = pytest.mark.integration

APP = "replica_failure"
PREFIX = "/replica-failure"
EVENTS = 400
GAP_S = 0.05
"""The fake's stream: 400 events 50 ms apart, twenty seconds that the kill cuts short."""
ENDED_WITHIN_S = 15.0
RECOVERED_WITHIN_S = 90.0


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess("fake", "rf", tmp_path_factory.mktemp("rf") / "rf.jsonl")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def gateway(serve_graph: Any, fake: ServerProcess) -> Iterator[str]:
    from ray import serve

    from serve_app.deployments import build_app

    config = AppConfig(upstream=UpstreamConfig(backends=[BackendConfig(url=fake.url)]))
    serve.run(build_app(config), name=APP, route_prefix=PREFIX)
    try:
        yield f"{serve_graph.base_url}{PREFIX}"
    finally:
        delete_app(APP)


def dispatcher_replicas() -> list[str]:
    """The names of this app's live Dispatcher replica actors (Serve's namespace)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#Dispatcher#"
    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["name"].startswith(prefix))


def kill_replica(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def body(tag: str, stream: bool) -> dict[str, Any]:
    # The tag rides in cache_salt, an allowlisted field the fake logs.
    return {"model": "serve-app-demo", "prompt": "Tell me about France", "max_tokens": EVENTS,
            "stream": stream, "cache_salt": tag}


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """Each event's data, in order; every line of the stream is checked to be SSE."""
    async for line in response.aiter_lines():
        if line:
            assert line.startswith("data: "), line
            yield line.removeprefix("data: ")


async def served_again(client: httpx.AsyncClient, gateway: str, tag: str) -> list[str]:
    """Wait until a request is served; the errors answered before it. Until Serve notices
    a dead replica and starts another, requests may fail, as OpenAI-shaped errors."""
    deadline = time.monotonic() + RECOVERED_WITHIN_S
    errors = []
    while True:
        response = await client.post(f"{gateway}/v1/completions", json=body(tag, stream=False))
        if response.status_code == 200:
            return errors
        assert set(response.json()) == {"error"}, response.text
        errors.append(f"{response.status_code} {response.json()['error']['type']}")
        assert time.monotonic() < deadline, f"never served again: {response.text}"
        await asyncio.sleep(0.5)


async def test_a_dispatcher_dying_mid_stream_ends_the_stream_with_an_error(
    gateway: str, fake: ServerProcess,
) -> None:
    before: list[str] = []
    after: list[str] = []
    async with httpx.AsyncClient(timeout=60) as client:
        await served_again(client, gateway, "replica-ready")
        [replica] = dispatcher_replicas()
        fake.set_mode(events=EVENTS, gap_s=GAP_S)
        async with client.stream("POST", f"{gateway}/v1/completions",
                                 json=body("replica-kill", stream=True)) as response:
            assert response.status_code == 200, await response.aread()
            data = sse_data(response)
            while len(before) < 3:
                before.append(await anext(data))
            killed = time.monotonic()
            kill_replica(replica)

            async def rest() -> None:
                async for item in data:  # to the end of the response, [DONE] or not
                    after.append(item)

            await asyncio.wait_for(rest(), ENDED_WITHIN_S)  # no hang on a dead replica
            ended_s = time.monotonic() - killed

    # The events sent before the replica died, in order, none lost or repeated ...
    *chunks, error, done = before + after
    texts = [orjson.loads(chunk)["choices"][0]["text"] for chunk in chunks]
    assert texts == [f"rf{index} " for index in range(len(texts))]
    assert len(texts) < EVENTS  # the stream was cut short, not finished
    # ... then one OpenAI error event and [DONE], and nothing after them.
    assert set(orjson.loads(error)) == {"error"}, error
    assert set(orjson.loads(error)["error"]) == {"message", "type", "param", "code",
                                                 "request_id"}
    # A dead replica is a 503: Serve starts another, and the client may retry.
    assert orjson.loads(error)["error"]["type"] == "ServiceUnavailableError", error
    assert done == "[DONE]"
    print(f"stream ended {ended_s:.2f} s after the kill, {len(texts)} events in: {error}")
    # The dead replica's upstream connection closed with it: the fake stopped generating.
    deadline = time.monotonic() + 10
    while not fake.events("disconnect", "replica-kill"):
        assert time.monotonic() < deadline, "the upstream request outlived its replica"
        await asyncio.sleep(0.1)
    assert fake.events("done", "replica-kill") == []


async def test_the_gateway_serves_again_once_serve_has_replaced_the_replica(
    gateway: str, fake: ServerProcess,
) -> None:
    fake.set_mode(events=4)
    async with httpx.AsyncClient(timeout=60) as client:
        await served_again(client, gateway, "replica-before")  # whatever ran before
        [replica] = dispatcher_replicas()
        kill_replica(replica)
        killed = time.monotonic()
        errors = await served_again(client, gateway, "replica-back")
        print(f"served again {time.monotonic() - killed:.1f} s after the kill; before: {errors}")
        [new_replica] = dispatcher_replicas()
        assert new_replica != replica
        # Served by the new replica, every time, streamed or not.
        for index in range(5):
            whole = await client.post(f"{gateway}/v1/completions",
                                      json=body(f"replica-new-{index}", stream=False))
            assert whole.status_code == 200, whole.text
            assert whole.json()["choices"][0]["text"] == "rf"
            streamed = await client.post(f"{gateway}/v1/completions",
                                         json=body(f"replica-new-s{index}", stream=True))
            assert streamed.status_code == 200, streamed.text
            blocks = streamed.text.split("\n\n")
            assert blocks[-2:] == ["data: [DONE]", ""]
            texts = [orjson.loads(block.removeprefix("data: "))["choices"][0]["text"]
                     for block in blocks[:-2]]
            assert texts == ["rf0 ", "rf1 ", "rf2 ", "rf3 "]
