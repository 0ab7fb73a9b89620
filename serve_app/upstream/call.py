"""What the gateway asks of the upstream and what comes back, as the Dispatcher takes it.

An `UpstreamCall` is a request less its embeddings; an `UpstreamReply` is a whole answer,
or the head of a stream, whose events follow as SSE bytes. Through Serve a stream is one
generator (its head, then its events); `split_stream` turns that form into the typed pair.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from serve_app.errors import GatewayError
from serve_app.protocol import SamplingFields
from serve_app.upstream.stops import StopRule


@dataclass(frozen=True)
class ChatShape:
    """How to answer a chat request: how many top logprobs per token, if any."""

    top_logprobs: int | None = None


@dataclass(frozen=True)
class UpstreamCall:
    """What the ingress asks of the upstream, less the embeddings themselves."""

    served_model: str
    fields: SamplingFields = field(default_factory=SamplingFields)
    """The sampling part of the body: the allowlist, nothing else reaches a backend."""
    stream: bool = False
    chat: ChatShape | None = None
    """Set for chat requests: answers are turned into the chat shape on the way back."""
    payload_bytes: int = 0
    """The base64 of all its prompts' embeddings, known before they are made: the
    Dispatcher holds that much of its payload budget before asking the Embedder."""
    request_id: str | None = None
    """The client request's id: in the Dispatcher's logs and error bodies, and sent
    upstream as `X-Request-Id`."""
    prefix_key: int | None = None
    """The hash of its first prompt's first blocks (`prompts.prefix`): the backends'
    order under `prefix_affinity` routing; None for a prompt shorter than one block."""
    stops: StopRule | None = None
    """The stop strings the gateway applies itself (`fields` carries none of them): the
    upstream streams, and each choice is cut here at its first stop."""
    adapter: str | None = None
    """The prompt adapter the request names as its model (`model.adapters`): the Embedder
    puts its rows before each prompt's, the upstream is asked for the served model, and
    the answers name the adapter."""

    @property
    def answered_model(self) -> str:
        """The model the client's answers name: the one it asked for."""
        return self.adapter or self.served_model


@dataclass(frozen=True)
class UpstreamReply:
    """A complete answer (non-stream), or the head of a stream (`body` empty, status 200)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    backend: str | None = None
    """The url of the backend that answered (for the access log)."""

    @classmethod
    def of(cls, error: GatewayError) -> UpstreamReply:
        return cls(error.status, error.to_body(), error.headers)


StreamItem = UpstreamReply | bytes
"""One item of a stream in its Serve form: the head first, then SSE event bytes."""


class EventStream(Protocol):
    """A stream's SSE events. Closing it, at any point, ends the upstream request."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


async def split_stream(
    items: AsyncGenerator[StreamItem, None]
) -> tuple[UpstreamReply, EventStream]:
    """The head and the events of a stream in its Serve form. `items` has started, so it
    is closed when the events are, or when it is collected, even if no event is read."""
    head = await anext(items, None)
    if not isinstance(head, UpstreamReply):
        await items.aclose()
        raise TypeError(f"a stream starts with its head, not {type(head).__name__}")
    return head, _Events(items)


class _Events:
    def __init__(self, items: AsyncGenerator[StreamItem, None]) -> None:
        self.items = items

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> bytes:
        item = await anext(self.items)
        if not isinstance(item, bytes):
            raise TypeError(f"stream events are bytes, not {type(item).__name__}")
        return item

    async def aclose(self) -> None:
        await self.items.aclose()
