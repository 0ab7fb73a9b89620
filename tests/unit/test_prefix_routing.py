"""Prefix-affinity routing without servers: the prefix key of a prompt, the backend order
it gives, bounded loads, a fleet that changes, and the gateway keying its requests.

(The same routing against real server processes, several Dispatchers and keyed
transforms: tests/loopback/test_prefix_affinity.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import torch

from serve_app.config import BackendConfig, HealthConfig, RoutingConfig, UpstreamConfig
from serve_app.prompts.embedder import SplicedPrompt
from serve_app.prompts.prefix import prefix_hashes, prefix_key
from serve_app.upstream.fleet import Backend, BackendState, Fleet
from tests.unit.gateway_client import GatewayFactory, ok

URLS = [f"http://b{index}/v1" for index in range(4)]
AFFINITY = RoutingConfig(policy="prefix_affinity", block_size=4, prefix_blocks=2,
                         load_bound=0.25)


# ----------------------------------------------------------------- the prefix key


def test_keys_are_equal_exactly_when_the_first_blocks_are() -> None:
    base = list(range(100, 140))
    assert prefix_key([base], 16, 2) == prefix_key([base[:32] + [7] * 8], 16, 2)
    changed = base.copy()
    changed[31] = 7  # the last row of the second block
    assert prefix_key([base], 16, 2) != prefix_key([changed], 16, 2)
    assert prefix_key([base[:15]], 16, 2) is None  # shorter than one block
    assert prefix_key([base[:20]], 16, 2) != prefix_key([base], 16, 2)  # one block, not two


def test_the_chain_extends_the_shorter_prompts_chain() -> None:
    ids = list(range(64))
    assert prefix_hashes(ids, 8, 8)[:3] == prefix_hashes(ids[:24], 8, 8)
    assert len(prefix_hashes(ids, 8, 3)) == 3


def test_keys_read_rows_not_runs_and_tensors_never_match_token_ids() -> None:
    tensor = torch.randn(6, 4, dtype=torch.bfloat16)
    whole = SplicedPrompt(([1, 2, 3], tensor, list(range(20))))
    split = SplicedPrompt(([1], [2, 3], tensor[:2], tensor[2:], list(range(5)),
                           list(range(5, 20))))
    assert prefix_hashes(whole, 4, 6) == prefix_hashes(split, 4, 6)
    other = SplicedPrompt(([1, 2, 3], tensor + 1, list(range(20))))
    assert prefix_hashes(other, 4, 6)[0] != prefix_hashes(whole, 4, 6)[0]
    as_ids = [1, 2, 3] + [0] * 6 + list(range(20))
    assert prefix_hashes(as_ids, 4, 6)[0] != prefix_hashes(whole, 4, 6)[0]


# ----------------------------------------------------------------- the fleet's choice


def fleet_of(*backends: BackendConfig, routing: RoutingConfig = AFFINITY,
             **settings: Any) -> Fleet:
    config = UpstreamConfig(backends=list(backends), routing=routing, **settings)
    return Fleet(config, httpx.AsyncClient())


def plain(*urls: str, **settings: Any) -> list[BackendConfig]:
    return [BackendConfig(url=url, **settings) for url in urls]


async def take(fleet: Fleet, key: int | None) -> Backend:
    return await fleet.acquire(set(), time.monotonic() + 5, key)


async def route(fleet: Fleet, key: int) -> str:
    backend = await take(fleet, key)
    fleet.release(backend)
    return backend.config.url


async def test_every_replica_sends_a_key_to_the_same_backend() -> None:
    replicas = [fleet_of(*plain(*URLS)) for _ in range(3)]
    for key in range(200):
        choices = {await route(fleet, key) for fleet in replicas}
        assert len(choices) == 1, (key, choices)
    by_backend = Counter([await route(replicas[0], key) for key in range(2000)])
    assert set(by_backend) == set(URLS)
    assert all(350 < count < 650 for count in by_backend.values()), by_backend
    for fleet in replicas:
        await fleet.close()


async def test_keys_split_by_weight() -> None:
    fleet = fleet_of(BackendConfig(url=URLS[0], weight=3), BackendConfig(url=URLS[1]))
    share = Counter([await route(fleet, key) for key in range(4000)])[URLS[0]] / 4000
    await fleet.close()
    assert 0.72 < share < 0.78, share


async def test_least_loaded_policy_ignores_the_key() -> None:
    fleet = fleet_of(*plain(*URLS), routing=RoutingConfig(policy="least_loaded"))
    assert len({await route(fleet, 42) for _ in range(200)}) == len(URLS)
    await fleet.close()


async def test_a_hot_key_spills_past_its_bound_and_returns() -> None:
    fleet = fleet_of(*plain(*URLS))
    first = await route(fleet, 7)
    held = [await take(fleet, 7) for _ in range(8)]
    owners = Counter(backend.config.url for backend in held)
    # With eight in flight the bound is ceil(1.25 x 8 / 4) = 3 on each backend: the first
    # choice takes three, the rest spill to the key's later choices.
    assert owners[first] == 3 and len(owners) >= 3, owners
    assert max(owners.values()) == 3
    rows = {row["url"]: row for row in fleet.status()}
    assert rows[first]["spilled_out"] == 5
    assert rows[first]["routed_by_affinity"] == 1 + 3
    assert sum(row["spilled_in"] for row in rows.values()) == 5
    for backend in held:
        fleet.release(backend)
    assert await route(fleet, 7) == first
    await fleet.close()


async def test_a_full_first_choice_passes_the_key_on() -> None:
    fleet = fleet_of(*plain(*URLS, max_in_flight=1), routing=AFFINITY.model_copy(
        update={"load_bound": 100.0}))
    first = await take(fleet, 9)
    second = await take(fleet, 9)
    assert second is not first
    assert {row["url"]: row["spilled_out"] for row in fleet.status()}[first.config.url] == 1
    fleet.release(first)
    fleet.release(second)
    await fleet.close()


async def test_an_ejected_backend_passes_its_keys_on_and_gets_them_back() -> None:
    fleet = fleet_of(*plain(*URLS), health=HealthConfig(failure_threshold=1))
    keys = range(300)
    before = {key: await route(fleet, key) for key in keys}
    [ejected] = [b for b in fleet.backends if b.config.url == before[0]]
    fleet.failed(ejected, "HTTP 503")
    assert ejected.state is BackendState.EJECTED
    during = {key: await route(fleet, key) for key in keys}
    assert ejected.config.url not in during.values()
    # Only its keys move; every other key keeps its backend.
    assert {k for k in keys if during[k] != before[k]} == {
        k for k in keys if before[k] == ejected.config.url}
    ejected.state = BackendState.HEALTHY  # as a passed half-open probe readmits it
    assert {key: await route(fleet, key) for key in keys} == before
    await fleet.close()


async def test_a_new_backend_takes_only_the_keys_it_wins() -> None:
    fleet = fleet_of(*plain(*URLS[:3]))
    keys = range(600)
    before = {key: await route(fleet, key) for key in keys}
    fleet.update(UpstreamConfig(backends=plain(*URLS), routing=AFFINITY))
    after = {key: await route(fleet, key) for key in keys}
    moved = [key for key in keys if after[key] != before[key]]
    assert all(after[key] == URLS[3] for key in moved)
    assert 100 < len(moved) < 200, len(moved)  # about a quarter
    fleet.update(UpstreamConfig(backends=plain(*URLS[:3]), routing=AFFINITY))
    assert {key: await route(fleet, key) for key in keys} == before
    await fleet.close()


async def test_failover_takes_the_keys_next_choice() -> None:
    fleet = fleet_of(*plain(*URLS))
    order = []
    tried: set[Backend] = set()
    for _ in URLS:
        backend = await fleet.acquire(tried, time.monotonic() + 5, 11)
        tried.add(backend)
        order.append(backend.config.url)
        fleet.release(backend)
    assert sorted(order) == sorted(URLS)
    assert order[0] == await route(fleet, 11)
    await fleet.close()


# ----------------------------------------------------------------- through the gateway


async def test_the_gateway_keys_requests_by_their_prompt_prefix(
        make_gateway: GatewayFactory) -> None:
    hosts: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(200, json={"choices": [
            {"index": 0, "text": request.url.host, "finish_reason": "length"}]})

    routing = RoutingConfig(policy="prefix_affinity", block_size=4, prefix_blocks=4)
    gateway = make_gateway(httpx.MockTransport(answer),
                           upstream=UpstreamConfig(backends=plain(*URLS), routing=routing))
    system = "You are a helpful assistant for the city library. Answer briefly. "
    shared = [await ok(gateway, model="serve-app-demo", prompt=system + question,
                       max_tokens=2)
              for question in ("Opening hours?", "Where is the map room?", "Fines?",
                               "Can I print?", "Is there wifi?", "Who runs it?")]
    assert len({answer["choices"][0]["text"] for answer in shared}) == 1
    apart = await asyncio.gather(*[
        ok(gateway, model="serve-app-demo", prompt=f"Topic number {i}: {system}",
           max_tokens=2) for i in range(24)])
    assert len({answer["choices"][0]["text"] for answer in apart}) >= 3
