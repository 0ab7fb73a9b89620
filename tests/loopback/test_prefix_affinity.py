"""Prefix-affinity routing against real server processes (no Ray): several Dispatchers
agree on a prefix's backend, a hot prefix spills under bounded loads, an ejected backend's
prefixes move and come back, and keyed transforms give the chosen backend byte-identical
prefix rows, which is what its prefix cache needs.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch

from serve_app.config import (
    BackendConfig,
    HealthConfig,
    ModelConfig,
    RoutingConfig,
    TransformConfig,
    UpstreamConfig,
)
from serve_app.prompts.codec import EncodedPromptEmbeds, encode_prompt_embeds
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.prefix import prefix_key
from serve_app.protocol import SamplingFields
from serve_app.upstream.call import UpstreamCall, UpstreamReply
from serve_app.upstream.dispatcher import DispatcherCore
from tests.upstream_servers import ServerProcess

pytestmark = pytest.mark.loopback

HEALTH = HealthConfig(probe_interval_s=0.2, probe_timeout_s=0.5, failure_threshold=2,
                      cooldown_s=0.5, max_cooldown_s=1.0)
ROUTING = RoutingConfig(policy="prefix_affinity", block_size=16, prefix_blocks=2,
                        load_bound=0.25)
EMBEDS = [encode_prompt_embeds(torch.randn(3, 8))]
KEY_ENV = "SERVE_APP_TEST_PREFIX_KEY"
_tags = itertools.count()

Cores = Callable[..., DispatcherCore]


@pytest.fixture
async def make_core(fakes: dict[str, ServerProcess]) -> AsyncIterator[Cores]:
    """Dispatcher cores over fakes a, b and c: each one stands for a Dispatcher replica,
    with its own fleet state and nothing shared."""
    cores: list[DispatcherCore] = []

    def factory(**settings: Any) -> DispatcherCore:
        settings.setdefault("routing", ROUTING)
        config = UpstreamConfig(backends=[BackendConfig(url=s.url) for s in fakes.values()],
                                health=HEALTH, **settings)
        core = DispatcherCore.from_config(config)
        cores.append(core)
        return core

    yield factory
    for core in cores:
        await core.aclose()


def tagged(prefix: str, key: int | None) -> UpstreamCall:
    tag = f"{prefix}-{next(_tags)}"
    return UpstreamCall("serve-app-demo", SamplingFields(max_tokens=4, cache_salt=tag),
                        prefix_key=key)


async def send(core: DispatcherCore, call: UpstreamCall,
               embeds: list[EncodedPromptEmbeds] = EMBEDS) -> str:
    """The name of the fake that answered (it answers with its name)."""
    reply: UpstreamReply = await core.complete(call, embeds)
    assert reply.status == 200, reply.body
    return str(orjson.loads(reply.body)["choices"][0]["text"])


def owner(fakes: dict[str, ServerProcess], url: str) -> str:
    return next(name for name, server in fakes.items() if server.url == url)


async def test_dispatchers_agree_on_each_prefixs_backend(fakes, make_core) -> None:
    replicas = [make_core() for _ in range(3)]
    by_key: dict[int, set[str]] = {}
    for key in range(24):
        # One at a time: together they would spill under the bounded load (tested below).
        by_key[key] = {await send(replicas[i % 3], tagged("agree", key)) for i in range(6)}
    assert all(len(names) == 1 for names in by_key.values()), by_key
    assert len({name for names in by_key.values() for name in names}) == 3


async def test_a_hot_prefix_spills_under_bounded_load(fakes, make_core) -> None:
    for server in fakes.values():
        server.set_mode(delay_s=0.5)
    core = make_core()
    first = await send(core, tagged("warm", 5))
    answers = Counter(await asyncio.gather(*[send(core, tagged("hot", 5)) for _ in range(12)]))
    # 12 at once over 3 backends: the bound is ceil(1.25 x 12 / 3) = 5 per backend.
    assert answers[first] == 5 and max(answers.values()) == 5, answers
    assert len(answers) >= 2, answers
    rows = {owner(fakes, row["url"]): row for row in core.status()}
    assert rows[first]["spilled_out"] == 12 - 5
    assert sum(row["spilled_in"] for row in rows.values()) == 12 - 5
    assert sum(len(s.events("request", "hot-")) for s in fakes.values()) == 12


async def test_an_ejected_backends_prefixes_move_and_come_back(fakes, make_core) -> None:
    core = make_core()
    keys = list(range(40))
    before = {key: await send(core, tagged("eject", key)) for key in keys}
    down = before[0]
    fakes[down].set_mode(status=503, health_status=503)
    # Its first failures are retried on the key's next choice, then it is ejected.
    during = {key: await send(core, tagged("eject", key)) for key in keys}
    assert down not in during.values()
    assert {k for k in keys if during[k] != before[k]} == {
        k for k in keys if before[k] == down}
    [row] = [r for r in core.status() if owner(fakes, r["url"]) == down]
    assert row["state"] in ("ejected", "half_open"), row
    fakes[down].set_mode()
    for _ in range(100):  # readmitted by a passing probe after its cooldown
        [row] = [r for r in core.status() if owner(fakes, r["url"]) == down]
        if row["state"] == "healthy":
            break
        await asyncio.sleep(0.05)
    assert row["state"] == "healthy", row
    assert {key: await send(core, tagged("eject", key)) for key in keys} == before


@pytest.fixture(scope="module")
def keyed_embedder(demo_model_dir: Path) -> EmbedderCore:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, "a-test-key-of-at-least-16-chars")
        return EmbedderCore.from_checkpoint(
            demo_model_dir, ModelConfig(),
            TransformConfig(kind="keyed_gaussian", sigma=1.0, key_env=KEY_ENV))


async def test_keyed_transforms_give_the_chosen_backend_identical_prefix_rows(
        fakes, make_core, keyed_embedder: EmbedderCore, demo_model_dir: Path) -> None:
    for server in fakes.values():
        server.set_mode(row_digests=48)
    shared = [(7 * i + 3) % 200 + 10 for i in range(40)]
    prompts = [shared + [20 + i, 30 + i, 40 + i, 50 + i, 60 + i, 70 + i, 80 + i, 90 + i]
               for i in range(6)]
    replicas = [make_core() for _ in range(2)]
    served = set()
    for index, ids in enumerate(prompts):
        key = prefix_key([ids], ROUTING.block_size, ROUTING.prefix_blocks)
        embeds = keyed_embedder.embed_batch([ids])
        served.add(await send(replicas[index % 2], tagged("keyed", key), embeds))
    [name] = served
    rows = [event["digests"] for event in fakes[name].events("rows", "keyed-")]
    assert len(rows) == len(prompts)
    # The 40 shared rows are byte-identical in every request; the suffixes differ.
    assert all(digests[:40] == rows[0][:40] for digests in rows)
    assert len({tuple(digests[40:]) for digests in rows}) == len(prompts)
    # And the rows are not the raw embeddings: the transform did run.
    raw = EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig())
    for server in fakes.values():
        server.set_mode(row_digests=48)
    await send(replicas[0], tagged("raw", None), raw.embed_batch([prompts[0]]))
    [plain] = [event["digests"] for s in fakes.values() for event in s.events("rows", "raw-")]
    assert plain[:40] != rows[0][:40]
