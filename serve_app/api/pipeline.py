"""The pipeline behind the completions routes: a request's prompts become prompt embeddings
(Embedder), which go to the upstream fleet (Dispatcher).

`Pipeline` is what the completions service needs of it. In Serve it is the deployment
handles (`handles.ServePipeline`); `InProcessPipeline` calls the plain cores in this
process, for tests and for running without Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from serve_app.prompts.embedder import EmbedderCore, PromptInput
from serve_app.upstream.call import EventStream, UpstreamCall, UpstreamReply
from serve_app.upstream.dispatcher import DispatcherCore


class Pipeline(Protocol):
    """Embedding and dispatch of one request's prompts, in vLLM's prompt order; `tenant`
    is the request's (`prompts.tenants`), which a keyed transform's rows depend on."""

    async def complete(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                       tenant: str) -> UpstreamReply: ...

    async def open_stream(
        self, call: UpstreamCall, prompts: Sequence[PromptInput], tenant: str
    ) -> tuple[UpstreamReply, EventStream]: ...

    async def upstream_status(self) -> list[dict[str, Any]]: ...

    async def upstream_ready(self) -> bool:
        """Whether the fleet has a backend that has answered and is healthy."""
        ...


class InProcessPipeline:
    """The embedder and dispatcher cores called directly, for running without Ray."""

    def __init__(self, embedder: EmbedderCore, dispatcher: DispatcherCore) -> None:
        self.embedder = embedder
        self.dispatcher = dispatcher

    async def complete(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                       tenant: str) -> UpstreamReply:
        embeds = await asyncio.to_thread(self.embedder.embed_batch, prompts,
                                         [tenant] * len(prompts))
        return await self.dispatcher.complete(call, embeds)

    async def open_stream(
        self, call: UpstreamCall, prompts: Sequence[PromptInput], tenant: str
    ) -> tuple[UpstreamReply, EventStream]:
        embeds = await asyncio.to_thread(self.embedder.embed_batch, prompts,
                                         [tenant] * len(prompts))
        return await self.dispatcher.open_stream(call, embeds)

    async def upstream_status(self) -> list[dict[str, Any]]:
        return self.dispatcher.status()

    async def upstream_ready(self) -> bool:
        return await self.dispatcher.ready()
