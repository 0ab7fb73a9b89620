"""The pipeline behind the completions and chat routes: a request's prompts become prompt
embeddings (Embedder), which go to the upstream fleet (Dispatcher).

`Pipeline` is what the served model (`api.served_model`) needs of it. In Serve it is the
Dispatcher's handle (`handles.ServePipeline`), and the Dispatcher asks the Embedder for the
embeddings (`upstream.payloads`); `InProcessPipeline` runs the same path over the plain
cores in this process, for tests and for running without Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from serve_app.errors import GatewayError
from serve_app.prompts.codec import EncodedPromptEmbeds
from serve_app.prompts.embedder import EmbedderCore, EmbedRequest, PromptInput
from serve_app.upstream.call import EventStream, UpstreamCall, UpstreamReply, split_stream
from serve_app.upstream.dispatcher import DispatcherCore
from serve_app.upstream.payloads import PromptDispatcher


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
    """The Serve path's parts in this process, for running without Ray: the Dispatcher's
    `PromptDispatcher` over its core, asking the embedder core for each request's payload
    (on a worker thread, as the Embedder deployment runs it)."""

    def __init__(self, embedder: EmbedderCore, dispatcher: DispatcherCore) -> None:
        self.embedder = embedder
        self.dispatcher = dispatcher
        self.prompts = PromptDispatcher(dispatcher, self._embed)

    async def _embed(self, prompts: Sequence[PromptInput], tenant: str,
                     adapter: str | None) -> list[EncodedPromptEmbeds]:
        """The request's prompts in one lookup, or its error (an adapter the core does not
        hold), as the Embedder deployment answers a request."""
        [answer], _ = await asyncio.to_thread(
            self.embedder.embed_requests, [EmbedRequest(tuple(prompts), tenant, adapter)],
            len(prompts))
        if isinstance(answer, GatewayError):
            raise answer
        return answer

    async def complete(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                       tenant: str) -> UpstreamReply:
        return await self.prompts.complete(call, prompts, tenant)

    async def open_stream(
        self, call: UpstreamCall, prompts: Sequence[PromptInput], tenant: str
    ) -> tuple[UpstreamReply, EventStream]:
        return await split_stream(self.prompts.stream(call, prompts, tenant))

    async def upstream_status(self) -> list[dict[str, Any]]:
        return self.dispatcher.status()

    async def upstream_ready(self) -> bool:
        return await self.dispatcher.ready()
