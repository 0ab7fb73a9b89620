"""The pipeline and the encoder client over Serve deployment handles: how the Gateway
replica reaches the Embedder, Dispatcher and Encoder replicas, and by which transport."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from ray.serve.handle import DeploymentHandle

from serve_app.prompts.embedder import PromptInput
from serve_app.upstream.call import (
    EventStream,
    StreamItem,
    UpstreamCall,
    UpstreamReply,
    split_stream,
)


def via_object_store(handle: DeploymentHandle) -> DeploymentHandle:
    """Calls whose arguments and results travel through Ray's object store, whatever the
    cluster's default transport (`RAY_SERVE_THROUGHPUT_OPTIMIZED` makes it gRPC)."""
    return handle.options(_by_reference=True)


class ServeEncoderClient:
    """Encoder deployments by served model name (by reference: a chunk's vectors can pass
    gRPC's 4 MiB default message limit)."""

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self.handles = {model: via_object_store(handle) for model, handle in handles.items()}

    async def encode(self, model: str, chunk: list[list[int]]) -> torch.Tensor:
        vectors: torch.Tensor = await self.handles[model].encode.remote(chunk)
        return vectors


@dataclass(frozen=True)
class _Transport:
    """The embedder and dispatcher handles of one transport."""

    embedder: DeploymentHandle
    dispatcher: DeploymentHandle
    streaming_dispatcher: DeploymentHandle

    @classmethod
    def of(cls, embedder: DeploymentHandle, dispatcher: DeploymentHandle,
           by_reference: bool) -> _Transport:
        embedder = embedder.options(_by_reference=by_reference)
        dispatcher = dispatcher.options(_by_reference=by_reference)
        return cls(embedder, dispatcher, dispatcher.options(stream=True))

    def embeds(self, prompts: Sequence[PromptInput], tenant: str) -> list[Any]:
        """The dispatcher call's arguments: the embedder's responses, unawaited."""
        return [self.embedder.embed.remote((prompt, tenant)) for prompt in prompts]


class ServePipeline:
    """Embedder and dispatcher reached through Serve handles, by one of two transports.

    The embedder's DeploymentResponses go into the dispatcher call as top-level arguments.
    - By reference (Ray's object store), Serve hands the embeddings from replica to replica
      without this process reading them. Large requests go this way.
    - By value (Serve's gRPC channel), they pass through this process, but each call skips
      the object store's per-object bookkeeping, which costs more than copying a megabyte
      or so twice. Requests up to `TransportConfig.by_value_max_bytes` go this way.
    Both are pinned here, so `RAY_SERVE_THROUGHPUT_OPTIMIZED` (gRPC for every call by
    default) cannot send a large payload through gRPC, whose 4 MiB message limit would
    refuse it.
    """

    def __init__(self, embedder: DeploymentHandle, dispatcher: DeploymentHandle,
                 by_value_max_bytes: int) -> None:
        self.by_value = _Transport.of(embedder, dispatcher, by_reference=False)
        self.by_reference = _Transport.of(embedder, dispatcher, by_reference=True)
        self.by_value_max_bytes = by_value_max_bytes

    def transport(self, call: UpstreamCall) -> _Transport:
        small = call.payload_bytes <= self.by_value_max_bytes
        return self.by_value if small else self.by_reference

    async def complete(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                       tenant: str) -> UpstreamReply:
        transport = self.transport(call)
        reply: UpstreamReply = await transport.dispatcher.complete.remote(
            call, *transport.embeds(prompts, tenant))
        return reply

    async def open_stream(
        self, call: UpstreamCall, prompts: Sequence[PromptInput], tenant: str
    ) -> tuple[UpstreamReply, EventStream]:
        return await split_stream(self._items(call, prompts, tenant))

    async def _items(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                     tenant: str) -> AsyncGenerator[StreamItem, None]:
        """The Dispatcher's stream; cancelled when this generator closes, however early."""
        transport = self.transport(call)
        items = transport.streaming_dispatcher.stream.remote(
            call, *transport.embeds(prompts, tenant))
        try:
            async for item in items:
                yield item
        finally:
            items.cancel()

    async def upstream_status(self) -> list[dict[str, Any]]:
        status: list[dict[str, Any]] = await self.by_reference.dispatcher.upstream_status.remote()
        return status

    async def upstream_ready(self) -> bool:
        ready: bool = await self.by_reference.dispatcher.upstream_ready.remote()
        return ready
