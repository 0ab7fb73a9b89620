"""The transport between replicas: the ingress sizes each request's embeddings before any
lookup, and `ServePipeline` sends small requests by value and large ones by reference."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pybase64
import pytest
import torch

from serve_app.api.completions import CompletionsService
from serve_app.config import GRPC_PAYLOAD_LIMIT, AppConfig, BackendConfig, UpstreamConfig
from serve_app.handles import ServePipeline
from serve_app.prompts.codec import base64_length, encode_prompt_embeds
from serve_app.prompts.embedder import PromptInput, SplicedPrompt, prompt_rows
from serve_app.upstream.call import UpstreamCall, UpstreamReply

LIMIT = 10_000


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


class FakeHandle:
    """A DeploymentHandle's surface: `.options(...)` and `.method.remote(...)`; every call
    is recorded with the options of the handle it went through."""

    def __init__(self, name: str, calls: list[tuple[str, dict[str, Any], tuple[Any, ...]]],
                 options: dict[str, Any] | None = None) -> None:
        self.name, self.calls, self.opts = name, calls, options or {}
        self.streams: list[FakeEvents] = []

    def options(self, **options: Any) -> FakeHandle:
        handle = FakeHandle(self.name, self.calls, {**self.opts, **options})
        handle.streams = self.streams
        return handle

    def __getattr__(self, method: str) -> Any:
        handle = self

        class Method:
            def remote(self, *args: Any) -> Any:
                handle.calls.append((f"{handle.name}.{method}", handle.opts, args))
                if method == "embed":
                    return ("response", args[0], handle.opts["_by_reference"])
                if handle.opts.get("stream"):
                    handle.streams.append(FakeEvents([UpstreamReply(200), b"data: [DONE]\n\n"]))
                    return handle.streams[-1]

                async def reply() -> UpstreamReply:
                    return UpstreamReply(200, b"{}")

                return reply()

        return Method()


@pytest.fixture
def calls() -> list[tuple[str, dict[str, Any], tuple[Any, ...]]]:
    return []


@pytest.fixture
def dispatcher() -> FakeHandle:
    return FakeHandle("dispatcher", [])


@pytest.fixture
def backend(calls: list[tuple[str, dict[str, Any], tuple[Any, ...]]],
            dispatcher: FakeHandle) -> ServePipeline:
    dispatcher.calls = calls
    return ServePipeline(FakeHandle("embedder", calls), dispatcher, LIMIT)


CLIENT = SplicedPrompt((torch.ones(1, 4),))
TENANT = "key:0123456789abcdef"


@pytest.mark.parametrize(("payload", "by_reference"),
                         [(1, False), (LIMIT, False), (LIMIT + 1, True), (10**9, True)])
async def test_complete_picks_the_transport_by_payload_size(
    backend: ServePipeline, calls: list[Any], payload: int, by_reference: bool
) -> None:
    call = UpstreamCall("m", payload_bytes=payload)
    reply = await backend.complete(call, [CLIENT, [1, 2, 3], [4]], TENANT)

    assert reply.status == 200
    assert [(name, opts["_by_reference"]) for name, opts, _ in calls] == [
        ("embedder.embed", by_reference), ("embedder.embed", by_reference),
        ("embedder.embed", by_reference), ("dispatcher.complete", by_reference)]
    # Every prompt, client tensors included, goes through the embedder with the request's
    # tenant; the dispatcher gets the embedder's responses unawaited, as top-level arguments
    # in the request's order.
    assert calls[-1][2] == (call, ("response", (CLIENT, TENANT), by_reference),
                            ("response", ([1, 2, 3], TENANT), by_reference),
                            ("response", ([4], TENANT), by_reference))


@pytest.mark.parametrize(("payload", "by_reference"), [(LIMIT, False), (LIMIT + 1, True)])
async def test_stream_picks_the_transport_and_cancels_at_the_end(
    backend: ServePipeline, dispatcher: FakeHandle, calls: list[Any], payload: int,
    by_reference: bool
) -> None:
    call = UpstreamCall("m", stream=True, payload_bytes=payload)
    head, events = await backend.open_stream(call, [[7, 8]], TENANT)
    [stream] = dispatcher.streams
    assert head == UpstreamReply(200) and not stream.cancelled
    assert [event async for event in events] == [b"data: [DONE]\n\n"]

    assert stream.cancelled
    name, opts, args = calls[-1]
    assert (name, opts) == ("dispatcher.stream", {"_by_reference": by_reference, "stream": True})
    assert args == (call, ("response", ([7, 8], TENANT), by_reference))


async def test_a_stream_left_after_its_head_is_cancelled(
    backend: ServePipeline, dispatcher: FakeHandle
) -> None:
    """A client that goes away before the first event: closing the events cancels the
    Dispatcher's stream, which closes the upstream request."""
    _, events = await backend.open_stream(UpstreamCall("m", stream=True), [[7, 8]], TENANT)
    [stream] = dispatcher.streams
    assert not stream.cancelled
    await events.aclose()  # type: ignore[attr-defined]
    assert stream.cancelled


def test_zero_limit_sends_everything_by_reference(calls: list[Any]) -> None:
    backend = ServePipeline(FakeHandle("e", calls), FakeHandle("d", calls), 0)
    assert backend.transport(UpstreamCall("m", payload_bytes=1)) is backend.by_reference


def test_the_limit_cannot_pass_grpcs_message_limit() -> None:
    with pytest.raises(ValueError, match="by_value_max_bytes"):
        AppConfig.model_validate({"transport": {"by_value_max_bytes": GRPC_PAYLOAD_LIMIT + 1}})
    assert GRPC_PAYLOAD_LIMIT < 4 * 1024 * 1024


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
def capture(cache_dir: Path) -> tuple[CompletionsService, CapturingBackend]:
    backend = CapturingBackend()
    config = AppConfig(upstream=UpstreamConfig(backends=[BackendConfig(url="http://ref/v1")]))
    return CompletionsService.from_config(config, backend), backend


def _wire_bytes(service: CompletionsService, prompt: PromptInput) -> int:
    """What the embedder will actually send for a prompt (the archive around the data
    included)."""
    rows = prompt_rows(prompt)
    return encode_prompt_embeds(torch.zeros(rows, service.model.hidden_size,
                                            dtype=service.model.dtype)).nbytes


async def test_payload_size_of_text_and_client_embeddings(
    capture: tuple[CompletionsService, CapturingBackend], embed: Callable[[str], str]
) -> None:
    service, backend = capture
    body = {"model": service.served_name, "prompt": ["short", "a longer prompt " * 8],
            "prompt_embeds": embed("client side"), "max_tokens": 1}
    response = await service.completions(orjson.dumps(body))
    assert response.status_code == 200

    [(call, prompts)] = backend.seen
    assert isinstance(prompts[0], SplicedPrompt)  # vLLM's order: embeddings first
    assert [type(p) for p in prompts[1:]] == [list, list]
    row_bytes = service.model.hidden_size * service.model.dtype.itemsize
    assert call.payload_bytes == sum(
        base64_length(prompt_rows(prompt) * row_bytes) for prompt in prompts)
    # The estimate leaves out only the archive around each tensor's data (about 1.5 KiB).
    actual = sum(_wire_bytes(service, prompt) for prompt in prompts)
    assert 0 <= actual - call.payload_bytes <= 2 * 4096


async def test_payload_size_of_a_chat_with_embeddings_spliced_in(
    capture: tuple[CompletionsService, CapturingBackend], embed: Callable[[str], str]
) -> None:
    service, backend = capture
    body = {"model": service.served_name, "max_tokens": 1, "messages": [{"role": "user",
            "content": [{"type": "text", "text": "look:"},
                        {"type": "prompt_embeds", "data": embed("three words here")}]}]}
    response = await service.chat_completions(orjson.dumps(body))
    assert response.status_code == 200

    [(call, [prompt])] = backend.seen
    assert isinstance(prompt, SplicedPrompt)
    row_bytes = service.model.hidden_size * service.model.dtype.itemsize
    assert call.payload_bytes == base64_length(prompt.rows * row_bytes)
