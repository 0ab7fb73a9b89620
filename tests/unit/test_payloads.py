"""The Dispatcher's side of the pipeline (`upstream.payloads`): one Embedder call per
request, its failures answered in the OpenAI shape, the payload budget, and a payload let
go as soon as nothing can be retried with it."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch
from ray.serve.exceptions import BackPressureError

from serve_app.config import BackendConfig, UpstreamConfig
from serve_app.errors import GatewayError
from serve_app.prompts.codec import EncodedPromptEmbeds, encode_prompt_embeds
from serve_app.prompts.embedder import PromptInput
from serve_app.upstream.call import UpstreamCall, UpstreamReply, split_stream
from serve_app.upstream.dispatcher import DispatcherCore
from serve_app.upstream.payloads import PayloadBudget, PromptDispatcher
from tests.unit.test_dispatcher import completion_payload, sse, stream_reply

TENANT = "key:0123456789abcdef"
URLS = ("http://a.test/v1", "http://b.test/v1")


# --------------------------------------------------------------------------- the budget


def budget_of(limit: int) -> PayloadBudget:
    return PayloadBudget(lambda: limit)


async def test_the_budget_admits_in_line_and_gives_back() -> None:
    budget = budget_of(100)
    order: list[str] = []

    async def request(name: str, nbytes: int, hold_s: float) -> None:
        async with budget.holding(nbytes, wait_s=5):
            order.append(name)
            await asyncio.sleep(hold_s)

    first = asyncio.ensure_future(request("first", 60, 0.05))
    await asyncio.sleep(0)
    # The second does not fit beside the first; the third would, but waits its turn, so a
    # large request is not passed over for ever by small ones.
    rest = [asyncio.ensure_future(request("second", 60, 0.0)),
            asyncio.ensure_future(request("third", 10, 0.0))]
    await asyncio.sleep(0.01)
    assert order == ["first"] and budget.held == 60
    await asyncio.gather(first, *rest)
    assert order == ["first", "second", "third"] and budget.held == 0


async def test_a_request_larger_than_the_budget_runs_alone() -> None:
    budget = budget_of(100)
    async with budget.holding(500, wait_s=1):
        assert budget.held == 500
        with pytest.raises(GatewayError):
            async with budget.holding(1, wait_s=0.01):
                pass
    async with budget.holding(1, wait_s=0.01):
        assert budget.held == 1


async def test_a_full_budget_is_a_429_after_the_queue_wait() -> None:
    budget = budget_of(100)
    async with budget.holding(100, wait_s=1):
        with pytest.raises(GatewayError) as refused:
            async with budget.holding(1, wait_s=0.02):
                pass
    error = refused.value
    assert (error.status, error.code, error.headers) == (429, "payload_budget_full",
                                                         {"Retry-After": "1"})
    async with budget.holding(100, wait_s=0):  # the refused request left the line
        assert budget.held == 100


async def test_a_cancelled_wait_leaves_the_line() -> None:
    budget = budget_of(100)
    admitted: list[int] = []

    async def request(nbytes: int) -> None:
        async with budget.holding(nbytes, wait_s=5):
            admitted.append(nbytes)

    async with budget.holding(50, wait_s=1):
        waiting = asyncio.ensure_future(request(90))
        behind = asyncio.ensure_future(request(10))  # fits, but waits its turn
        await asyncio.sleep(0.01)
        assert admitted == []
        waiting.cancel()
        await asyncio.sleep(0.01)
        assert admitted == [10]  # the line moved on at once, while 50 bytes are held
    await behind
    assert budget.held == 0


# --------------------------------------------------------------------------- dispatch


class Embedder:
    """An `Embed` that records its calls and answers each prompt's rows as buffers this
    test can watch being let go (numpy arrays, as Ray hands them over in place)."""

    def __init__(self, failure: BaseException | None = None) -> None:
        self.calls: list[tuple[list[PromptInput], str]] = []
        self.failure = failure
        self.arrays: list[weakref.ref[np.ndarray]] = []

    async def __call__(self, prompts: Sequence[PromptInput], tenant: str,
                       adapter: str | None = None) -> list[EncodedPromptEmbeds]:
        self.calls.append((list(prompts), tenant))
        if self.failure is not None:
            raise self.failure
        answers = []
        for prompt in prompts:
            assert isinstance(prompt, list)
            encoded = encode_prompt_embeds(torch.full((len(prompt), 8), float(prompt[0])))
            array = np.frombuffer(encoded.data, dtype=np.uint8).copy()
            self.arrays.append(weakref.ref(array))
            answers.append(EncodedPromptEmbeds((memoryview(array),), encoded.rows))
        return answers

    def payloads_alive(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.arrays)


@pytest.fixture
async def make_dispatcher() -> AsyncIterator[Callable[..., PromptDispatcher]]:
    cores: list[DispatcherCore] = []

    def factory(respond: Callable[[httpx.Request], httpx.Response], embed: Embedder,
                backends: int = 1, **settings: Any) -> PromptDispatcher:
        config = UpstreamConfig(backends=[BackendConfig(url=url) for url in URLS[:backends]],
                                routing={"policy": "least_loaded"}, **settings)
        core = DispatcherCore(config, httpx.AsyncClient(transport=httpx.MockTransport(respond)))
        cores.append(core)
        return PromptDispatcher(core, embed)

    yield factory
    for core in cores:
        await core.aclose()


def prompt_embeds(request: httpx.Request) -> list[str]:
    embeds = orjson.loads(request.content)["prompt_embeds"]
    return embeds if isinstance(embeds, list) else [embeds]


async def test_a_request_makes_one_embedder_call_and_sends_its_payload(
        make_dispatcher: Callable[..., PromptDispatcher]) -> None:
    bodies: list[list[str]] = []

    def respond(request: httpx.Request) -> httpx.Response:
        bodies.append(prompt_embeds(request))
        return httpx.Response(200, json=completion_payload())

    embed = Embedder()
    dispatcher = make_dispatcher(respond, embed)
    prompts: list[PromptInput] = [[1, 2, 3], [2], [3, 4]]
    reply = await dispatcher.complete(UpstreamCall("m", payload_bytes=100), prompts, TENANT)

    assert reply.status == 200
    assert embed.calls == [(prompts, TENANT)]
    expected = [encode_prompt_embeds(torch.full((len(p), 8), float(p[0]))).data.decode()
                for p in prompts if isinstance(p, list)]
    assert bodies == [expected]
    assert dispatcher.budget.held == 0


async def test_a_request_without_prompts_asks_no_embedder(
        make_dispatcher: Callable[..., PromptDispatcher]) -> None:
    embed = Embedder()
    dispatcher = make_dispatcher(lambda request: httpx.Response(200), embed)
    reply = await dispatcher.complete(UpstreamCall("m"), [], TENANT)
    assert reply.status == 400 and embed.calls == []


@pytest.mark.parametrize(("failure", "status"), [
    (BackPressureError(num_queued_requests=4, max_queued_requests=4), 429),
    (RuntimeError("an embedder bug"), 500),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_embedder_failure_is_an_openai_error(
        make_dispatcher: Callable[..., PromptDispatcher], failure: BaseException,
        status: int, stream: bool) -> None:
    upstream: list[httpx.Request] = []
    dispatcher = make_dispatcher(lambda request: upstream.append(request) or httpx.Response(
        200), Embedder(failure))
    call = UpstreamCall("m", stream=stream, payload_bytes=10)
    if stream:
        reply, events = await split_stream(dispatcher.stream(call, [[1]], TENANT))
        assert [event async for event in events] == []
    else:
        reply = await dispatcher.complete(call, [[1]], TENANT)
    assert reply.status == status
    assert set(orjson.loads(reply.body)["error"]) >= {"message", "type", "code"}
    assert upstream == [] and dispatcher.budget.held == 0


async def test_a_retry_sends_the_same_payload_without_embedding_again(
        make_dispatcher: Callable[..., PromptDispatcher]) -> None:
    bodies: list[bytes] = []

    def respond(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) == 1:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, json=completion_payload())

    embed = Embedder()
    dispatcher = make_dispatcher(respond, embed, backends=2)
    reply = await dispatcher.complete(UpstreamCall("m", payload_bytes=10), [[5, 6]], TENANT)
    assert reply.status == 200
    assert len(embed.calls) == 1
    assert len(bodies) == 2 and bodies[0] == bodies[1]


async def test_a_whole_answer_holds_its_payload_until_it_has_come(
        make_dispatcher: Callable[..., PromptDispatcher]) -> None:
    held: list[int] = []
    dispatcher: PromptDispatcher

    def respond(request: httpx.Request) -> httpx.Response:
        held.append(dispatcher.budget.held)
        return httpx.Response(200, json=completion_payload())

    embed = Embedder()
    dispatcher = make_dispatcher(respond, embed)
    reply = await dispatcher.complete(UpstreamCall("m", payload_bytes=1234), [[1]], TENANT)
    assert reply.status == 200 and held == [1234]
    assert dispatcher.budget.held == 0 and embed.payloads_alive() == 0


async def test_a_stream_lets_its_payload_go_once_it_has_opened(
        make_dispatcher: Callable[..., PromptDispatcher]) -> None:
    """After the first event nothing is retried, so the payload's memory (Ray's object
    store, in Serve) is given back while the answer streams on."""
    events = sse(*({"id": "c", "object": "text_completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "text": str(n), "finish_reason": None}]}
                   for n in range(3)))
    embed = Embedder()
    dispatcher = make_dispatcher(stream_reply(events, size=64), embed)
    call = UpstreamCall("m", stream=True, payload_bytes=4096)
    head, stream = await split_stream(dispatcher.stream(call, [[1, 2], [3]], TENANT))

    assert head == UpstreamReply(200, backend=URLS[0])
    assert dispatcher.budget.held == 0
    assert embed.arrays and embed.payloads_alive() == 0
    relayed = [event async for event in stream]
    assert relayed[-1] == b"data: [DONE]\n\n" and len(relayed) == 4
