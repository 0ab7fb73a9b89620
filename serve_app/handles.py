"""The pipeline and the encoder clients over Serve deployment handles: how the Gateway
replica reaches the Dispatcher and Encoder replicas, and the Dispatcher the Embedder, and
by which transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import torch
from ray.serve.handle import DeploymentHandle

from serve_app.prompts.codec import EncodedPromptEmbeds
from serve_app.prompts.embedder import EmbedRequest, PromptInput, SplicedPrompt, prompt_rows
from serve_app.upstream.call import (
    EventStream,
    StreamItem,
    UpstreamCall,
    UpstreamReply,
    split_stream,
)

# Token ids pickle to at most 5 bytes each: this many stay well under gRPC's 4 MiB.
_GRPC_SAFE_TOKEN_IDS = 1 << 18


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


class ServeEmbedder:
    """The Embedder deployment as the Dispatcher's `Embed`: one call per request, answered
    through Ray's object store whatever Serve's default transport. The encoded embeddings
    are pickled out of band (`EncodedPromptEmbeds`), so Ray copies them into the store once
    and this replica reads them in place; Serve's gRPC channel would copy them through
    pickle streams and refuse any answer over 4 MiB."""

    def __init__(self, embedder: DeploymentHandle) -> None:
        self.handle = via_object_store(embedder)

    async def __call__(self, prompts: Sequence[PromptInput], tenant: str,
                       adapter: str | None = None) -> Sequence[EncodedPromptEmbeds]:
        response = self.handle.embed.remote(EmbedRequest(tuple(prompts), tenant, adapter))
        try:
            embeds: Sequence[EncodedPromptEmbeds] = await response
        except asyncio.CancelledError:
            response.cancel()  # the request is gone: so is its place in a batch
            raise
        return embeds


class ServePipeline:
    """The Dispatcher reached through its Serve handle; it calls the Embedder itself.

    The ingress sends a request's prompts as they are (token ids, or spliced prompts) and
    never sees their embeddings. A call goes by Serve's default transport (gRPC in
    throughput-optimized mode), unless its prompts carry client tensors, which can pass
    gRPC's 4 MiB message limit: those calls go through Ray's object store, as do calls
    with more token ids than fit in a message.
    """

    def __init__(self, dispatcher: DeploymentHandle) -> None:
        self.dispatcher = dispatcher
        self.dispatcher_by_reference = via_object_store(dispatcher)

    def _handle(self, prompts: Sequence[PromptInput]) -> DeploymentHandle:
        large = (any(isinstance(prompt, SplicedPrompt) for prompt in prompts)
                 or sum(map(prompt_rows, prompts)) > _GRPC_SAFE_TOKEN_IDS)
        return self.dispatcher_by_reference if large else self.dispatcher

    async def complete(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                       tenant: str) -> UpstreamReply:
        reply: UpstreamReply = await self._handle(prompts).complete.remote(
            call, list(prompts), tenant)
        return reply

    async def open_stream(
        self, call: UpstreamCall, prompts: Sequence[PromptInput], tenant: str
    ) -> tuple[UpstreamReply, EventStream]:
        return await split_stream(self._items(call, prompts, tenant))

    async def _items(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                     tenant: str) -> AsyncGenerator[StreamItem, None]:
        """The Dispatcher's stream; cancelled when this generator closes, however early."""
        items = self._handle(prompts).options(stream=True).stream.remote(
            call, list(prompts), tenant)
        try:
            async for item in items:
                yield item
        finally:
            items.cancel()

    async def upstream_status(self) -> list[dict[str, Any]]:
        status: list[dict[str, Any]] = await self.dispatcher.upstream_status.remote()
        return status

    async def upstream_ready(self) -> bool:
        ready: bool = await self.dispatcher.upstream_ready.remote()
        return ready
