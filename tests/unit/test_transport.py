"""The calls between replicas: the ingress sends a request's prompts to the Dispatcher
alone (`ServePipeline`), the Dispatcher asks the Embedder for their embeddings in one call
by reference (`ServeEmbedder`), and the ingress sizes each request's embeddings before any
lookup (the payload budget counts them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pybase64
import pytest
import torch

from serve_app.api.chat import ChatService
from serve_app.api.completions import CompletionsService
from serve_app.api.served_model import ServedModel
from serve_app.config import AppConfig, BackendConfig, UpstreamConfig
from serve_app.handles import _GRPC_SAFE_TOKEN_IDS, ServeEmbedder, ServePipeline
from serve_app.prompts.codec import base64_length, encode_prompt_embeds
from serve_app.prompts.embedder import EmbedRequest, PromptInput, SplicedPrompt, prompt_rows
from serve_app.upstream.call import UpstreamCall, UpstreamReply


class FakeEvents:
    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        for item in self.items:
            yield item

    def cancel(self) -> None:
        self.cancelled = True


class FakeResponse:
    """A DeploymentResponse's surface: awaited for its value, or cancelled."""

    def __init__(self, value: Any, delay_s: float = 0.0) -> None:
        self.value, self.delay_s = value, delay_s
        self.cancelled = False

    def __await__(self) -> Generator[Any, None, Any]:
        return self._get().__await__()

    async def _get(self) -> Any:
        await asyncio.sleep(self.delay_s)
        return self.value

    def cancel(self) -> None:
        self.cancelled = True


Calls = list[tuple[str, dict[str, Any], tuple[Any, ...]]]


class FakeHandle:
    """A DeploymentHandle's surface: `.options(...)` and `.method.remote(...)`; every call
    is recorded with the options of the handle it went through."""

    def __init__(self, name: str, calls: Calls, options: dict[str, Any] | None = None,
                 answer: Callable[[tuple[Any, ...]], FakeResponse] | None = None) -> None:
        self.name, self.calls, self.opts = name, calls, options or {}
        self.answer = answer or (lambda args: FakeResponse(UpstreamReply(200, b"{}")))
        self.streams: list[FakeEvents] = []

    def options(self, **options: Any) -> FakeHandle:
        handle = FakeHandle(self.name, self.calls, {**self.opts, **options}, self.answer)
        handle.streams = self.streams
        return handle

    def __getattr__(self, method: str) -> Any:
        handle = self

        class Method:
            def remote(self, *args: Any) -> Any:
                handle.calls.append((f"{handle.name}.{method}", handle.opts, args))
                if handle.opts.get("stream"):
                    handle.streams.append(FakeEvents([UpstreamReply(200), b"data: [DONE]\n\n"]))
                    return handle.streams[-1]
                return handle.answer(args)

        return Method()


@pytest.fixture
def calls() -> Calls:
    return []


@pytest.fixture
def dispatcher(calls: Calls) -> FakeHandle:
    return FakeHandle("dispatcher", calls)


@pytest.fixture
def pipeline(dispatcher: FakeHandle) -> ServePipeline:
    return ServePipeline(dispatcher)  # type: ignore[arg-type]


CLIENT = SplicedPrompt((torch.ones(1, 4),))
TENANT = "key:0123456789abcdef"


@pytest.mark.parametrize(("prompts", "by_reference"), [
    ([[1, 2, 3], [4]], None),  # token ids: Serve's default transport
    ([CLIENT, [1, 2, 3]], True),  # client tensors can pass gRPC's message limit
    ([list(range(_GRPC_SAFE_TOKEN_IDS + 1))], True),
])
async def test_the_ingress_sends_prompts_to_the_dispatcher_alone(
    pipeline: ServePipeline, calls: Calls, prompts: list[PromptInput], by_reference: bool | None
) -> None:
    call = UpstreamCall("m")
    reply = await pipeline.complete(call, prompts, TENANT)

    assert reply.status == 200
    # One call, to the Dispatcher: the prompts as they are, in the request's order, and
    # the request's tenant. The Embedder is the Dispatcher's to call.
    [(name, opts, args)] = calls
    assert (name, opts.get("_by_reference")) == ("dispatcher.complete", by_reference)
    assert args == (call, prompts, TENANT)


@pytest.mark.parametrize(("prompts", "by_reference"), [([[7, 8]], None), ([CLIENT], True)])
async def test_stream_goes_to_the_dispatcher_and_cancels_at_the_end(
    pipeline: ServePipeline, dispatcher: FakeHandle, calls: Calls,
    prompts: list[PromptInput], by_reference: bool | None
) -> None:
    call = UpstreamCall("m", stream=True)
    head, events = await pipeline.open_stream(call, prompts, TENANT)
    [stream] = dispatcher.streams
    assert head == UpstreamReply(200) and not stream.cancelled
    assert [event async for event in events] == [b"data: [DONE]\n\n"]

    assert stream.cancelled
    [(name, opts, args)] = calls
    assert (name, opts.get("_by_reference"), opts["stream"]) == (
        "dispatcher.stream", by_reference, True)
    assert args == (call, prompts, TENANT)


async def test_a_stream_left_after_its_head_is_cancelled(
    pipeline: ServePipeline, dispatcher: FakeHandle
) -> None:
    """A client that goes away before the first event: closing the events cancels the
    Dispatcher's stream, which closes the upstream request."""
    _, events = await pipeline.open_stream(UpstreamCall("m", stream=True), [[7, 8]], TENANT)
    [stream] = dispatcher.streams
    assert not stream.cancelled
    await events.aclose()  # type: ignore[attr-defined]
    assert stream.cancelled


async def test_the_dispatcher_asks_the_embedder_once_per_request_by_reference(
        calls: Calls) -> None:
    embeds = [encode_prompt_embeds(torch.ones(2, 4)), encode_prompt_embeds(torch.ones(1, 4))]
    handle = FakeHandle("embedder", calls, answer=lambda args: FakeResponse(embeds))
    embed = ServeEmbedder(handle)  # type: ignore[arg-type]

    assert await embed([CLIENT, [1, 2]], TENANT) is embeds
    # Every prompt of the request in one call, with its tenant, answered through the object
    # store whatever Serve's default transport.
    [(name, opts, args)] = calls
    assert (name, opts) == ("embedder.embed", {"_by_reference": True})
    assert args == (EmbedRequest((CLIENT, [1, 2]), TENANT),)
    await embed([[3]], TENANT, "tuned")  # a prompt adapter's name rides along
    assert calls[-1][2] == (EmbedRequest(([3],), TENANT, "tuned"),)


async def test_a_dispatcher_request_cancelled_cancels_its_embedding(calls: Calls) -> None:
    responses: list[FakeResponse] = []

    def answer(args: tuple[Any, ...]) -> FakeResponse:
        responses.append(FakeResponse([], delay_s=10))
        return responses[-1]

    embed = ServeEmbedder(FakeHandle("embedder", calls, answer=answer))  # type: ignore[arg-type]
    task = asyncio.ensure_future(embed([[1]], TENANT))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [response] = responses
    assert response.cancelled


@pytest.mark.parametrize("nbytes", [0, 1, 2, 3, 4, 5, 6, 1000, 4096 * 2 * 128])
def test_base64_length(nbytes: int) -> None:
    assert base64_length(nbytes) == len(pybase64.b64encode(b"\0" * nbytes))


class CapturingBackend:
    """Records what the service asks of the backend; answers like an upstream would."""

    def __init__(self) -> None:
        self.seen: list[tuple[UpstreamCall, list[PromptInput]]] = []

    async def complete(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                       tenant: str) -> UpstreamReply:
        self.seen.append((call, list(prompts)))
        return UpstreamReply(200, b'{"choices": []}')

    async def open_stream(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                          tenant: str) -> tuple[UpstreamReply, AsyncIterator[bytes]]:
        raise AssertionError("not used here")

    async def upstream_status(self) -> list[dict[str, Any]]:
        return []


@pytest.fixture
def capture(cache_dir: Path) -> tuple[ServedModel, CapturingBackend]:
    backend = CapturingBackend()
    config = AppConfig(upstream=UpstreamConfig(backends=[BackendConfig(url="http://ref/v1")]))
    return ServedModel.from_config(config, backend), backend


def _wire_bytes(served: ServedModel, prompt: PromptInput) -> int:
    """What the embedder will actually send for a prompt (the archive around the data
    included)."""
    rows = prompt_rows(prompt)
    return encode_prompt_embeds(torch.zeros(rows, served.spec.hidden_size,
                                            dtype=served.spec.dtype)).nbytes


async def test_payload_size_of_text_and_client_embeddings(
    capture: tuple[ServedModel, CapturingBackend], embed: Callable[[str], str]
) -> None:
    served, backend = capture
    body = {"model": served.served_name, "prompt": ["short", "a longer prompt " * 8],
            "prompt_embeds": embed("client side"), "max_tokens": 1}
    response = await CompletionsService(served).create_completion(orjson.dumps(body))
    assert response.status_code == 200

    [(call, prompts)] = backend.seen
    assert isinstance(prompts[0], SplicedPrompt)  # vLLM's order: embeddings first
    assert [type(p) for p in prompts[1:]] == [list, list]
    row_bytes = served.spec.hidden_size * served.spec.dtype.itemsize
    assert call.payload_bytes == sum(
        base64_length(prompt_rows(prompt) * row_bytes) for prompt in prompts)
    # The estimate leaves out only the archive around each tensor's data (about 1.5 KiB).
    actual = sum(_wire_bytes(served, prompt) for prompt in prompts)
    assert 0 <= actual - call.payload_bytes <= 2 * 4096


async def test_payload_size_of_a_chat_with_embeddings_spliced_in(
    capture: tuple[ServedModel, CapturingBackend], embed: Callable[[str], str]
) -> None:
    served, backend = capture
    body = {"model": served.served_name, "max_tokens": 1, "messages": [{"role": "user",
            "content": [{"type": "text", "text": "look:"},
                        {"type": "prompt_embeds", "data": embed("three words here")}]}]}
    response = await ChatService(served).create_chat_completion(orjson.dumps(body))
    assert response.status_code == 200

    [(call, [prompt])] = backend.seen
    assert isinstance(prompt, SplicedPrompt)
    row_bytes = served.spec.hidden_size * served.spec.dtype.itemsize
    assert call.payload_bytes == base64_length(prompt.rows * row_bytes)
