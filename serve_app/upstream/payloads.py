"""The Dispatcher's side of the pipeline: a request's prompts are embedded through an
injected `Embed` (the Embedder deployment, or the core in this process), within the
replica's payload budget, then sent by `DispatcherCore`.

The Dispatcher asks for the payload itself, so the encoded embeddings cross one process
boundary, from the Embedder to here, and the ingress sends only token ids. Each request's
payload is counted against `upstream.payload_budget_bytes` from before it is made until
the Dispatcher lets it go: once a stream's first event has come (nothing is retried
after it), or once a whole answer has. That budget bounds the payload memory of a
Dispatcher replica, and of Ray's object store, which holds what the Embedders return.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing

from serve_app.errors import GatewayError, to_gateway_error
from serve_app.observability import request_id
from serve_app.prompts.codec import EncodedPromptEmbeds
from serve_app.prompts.embedder import PromptInput
from serve_app.upstream.call import StreamItem, UpstreamCall, UpstreamReply
from serve_app.upstream.dispatcher import DispatcherCore

Embed = Callable[[Sequence[PromptInput], str, str | None],
                 Awaitable[Sequence[EncodedPromptEmbeds]]]
"""A request's prompts, tenant and prompt adapter (or None) to their encoded embeddings,
in the prompts' order: one call per request."""


class PayloadBudget:
    """Bytes of payload held at once, up to a limit read at each request (the fleet's
    config changes in place). Requests wait in line for room, so a large one is not
    passed over for ever by small ones; one larger than the whole limit runs alone."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.held = 0
        self._line: deque[tuple[asyncio.Future[None], int]] = deque()

    @contextlib.asynccontextmanager
    async def holding(self, nbytes: int, wait_s: float) -> AsyncIterator[PayloadHold]:
        """Room for `nbytes`, waiting up to `wait_s` for it (then a 429); given back when
        the block ends, or earlier by `PayloadHold.release`."""
        await self._take(nbytes, wait_s)
        hold = PayloadHold(self, nbytes)
        try:
            yield hold
        finally:
            hold.release()

    def _fits(self, nbytes: int) -> bool:
        return self.held == 0 or self.held + nbytes <= self.limit()

    async def _take(self, nbytes: int, wait_s: float) -> None:
        if not self._line and self._fits(nbytes):
            self.held += nbytes
            return
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (admitted, nbytes)
        self._line.append(entry)
        try:
            await asyncio.wait_for(admitted, wait_s)
        except BaseException as exc:
            if admitted.done() and not admitted.cancelled():
                self._give(nbytes)  # admitted as the wait ended: the room goes to the next
            else:
                with contextlib.suppress(ValueError):
                    self._line.remove(entry)
                self._admit()  # the head of the line may have left
            if isinstance(exc, TimeoutError):
                raise GatewayError(
                    "The gateway holds as much prompt payload as it may "
                    "(upstream.payload_budget_bytes); retry shortly.", 429,
                    code="payload_budget_full", headers={"Retry-After": "1"}) from None
            raise

    def _give(self, nbytes: int) -> None:
        self.held -= nbytes
        self._admit()

    def _admit(self) -> None:
        while self._line and self._fits(self._line[0][1]):
            admitted, nbytes = self._line.popleft()
            if admitted.done():  # its wait was cancelled
                continue
            self.held += nbytes
            admitted.set_result(None)


class PayloadHold:
    """One request's room in a `PayloadBudget`."""

    def __init__(self, budget: PayloadBudget, nbytes: int) -> None:
        self.budget = budget
        self.nbytes = nbytes
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget._give(self.nbytes)


class PromptDispatcher:
    """Embeds a request's prompts (`embed`) and sends them through `core`, holding the
    payload within the budget; any failure on the way is an OpenAI-shaped reply."""

    def __init__(self, core: DispatcherCore, embed: Embed) -> None:
        self.core = core
        self.embed = embed
        self.budget = PayloadBudget(lambda: self.core.fleet.config.payload_budget_bytes)

    def _holding(self, call: UpstreamCall) -> contextlib.AbstractAsyncContextManager[
            PayloadHold]:
        return self.budget.holding(call.payload_bytes, self.core.fleet.config.max_queue_wait_s)

    async def _embeds(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                      tenant: str) -> Sequence[EncodedPromptEmbeds]:
        return await self.embed(prompts, tenant, call.adapter) if prompts else []

    async def complete(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                       tenant: str) -> UpstreamReply:
        """A whole answer: the payload is held until it has come, as a refused attempt
        is retried on another backend with the same payload."""
        request_id.bind(call.request_id)
        try:
            async with self._holding(call):
                return await self.core.complete(call, await self._embeds(call, prompts, tenant))
        except Exception as exc:
            return UpstreamReply.of(to_gateway_error(exc))

    async def stream(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                     tenant: str) -> AsyncGenerator[StreamItem, None]:
        """The stream in its Serve form (`DispatcherCore.stream`); the payload is given
        back once the head has come, before the events are relayed."""
        request_id.bind(call.request_id)
        try:
            async with self._holding(call):
                items = self.core.stream(call, await self._embeds(call, prompts, tenant))
                head = await anext(items)  # the core keeps no payload past its head
        except Exception as exc:
            yield UpstreamReply.of(to_gateway_error(exc))
            return
        async with aclosing(items):
            yield head
            async for item in items:
                yield item
