"""DispatcherCore: sends encoded prompt embeddings to the fleet and relays the answers.

Each request goes to one backend chosen by the `Fleet`. Before the first byte of the answer
has gone to the client it may fail over to another (connect errors, 429, 502, 503, 504
only); after that an upstream failure ends the stream with an error event and `[DONE]`.
Bodies and events are in `wire`, failures in `failures`, answer shaping in `answers`, the
gateway's own stop strings in `stopped`; what is left here is the one exchange with a
backend, whole or streamed, and failover. A call with stop strings is always streamed from
the upstream, and its upstream request is closed as soon as every choice has stopped.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson

from serve_app.config import UpstreamConfig
from serve_app.errors import GatewayError
from serve_app.observability import metrics, request_id
from serve_app.prompts.codec import Buffer, EncodedPromptEmbeds
from serve_app.protocol import SSE_DONE
from serve_app.protocol.common import sse_event
from serve_app.upstream.answers import AnswerShaper, shaper_for
from serve_app.upstream.call import (
    EventStream,
    StreamItem,
    UpstreamCall,
    UpstreamReply,
    split_stream,
)
from serve_app.upstream.failures import (
    RETRIED_STATUSES,
    AttemptFailed,
    StreamFailed,
    bad_upstream,
    error_event,
    retry_after_seconds,
    transport_error,
    upstream_error,
)
from serve_app.upstream.fleet import Backend, Fleet
from serve_app.upstream.http import make_http_client
from serve_app.upstream.stopped import STREAM_FIELDS, StopFilter, WholeAnswer
from serve_app.upstream.wire import body_stream, build_upstream_body, json_object, sse_data

_NO_PROMPT = GatewayError("no prompt to send upstream", 400, param="prompt")

_T = TypeVar("_T")
_Opened = tuple[httpx.Response, AsyncGenerator[bytes, None], bytes]


class DispatcherCore:
    """Sends each request to the fleet: one backend at a time, failing over before the
    first byte of the answer, relaying the answer once one backend has started it."""

    def __init__(self, config: UpstreamConfig, client: httpx.AsyncClient) -> None:
        self.client = client
        self.fleet = Fleet(config, client)

    @classmethod
    def from_config(cls, config: UpstreamConfig) -> DispatcherCore:
        return cls(config, make_http_client())

    async def reconfigure(self, config: UpstreamConfig) -> None:
        """A new fleet config; streams in flight continue on the backends they hold."""
        self.fleet.update(config)

    def status(self) -> list[dict[str, Any]]:
        return self.fleet.status()

    async def ready(self) -> bool:
        """Whether a backend has answered and is healthy (`Fleet.ready`)."""
        return await self.fleet.ready()

    async def aclose(self) -> None:
        await self.fleet.close()
        await self.client.aclose()

    # ----------------------------------------------------------------- whole answers

    async def complete(
        self, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds]
    ) -> UpstreamReply:
        request_id.bind(call.request_id)
        if not embeds:
            return UpstreamReply.of(_NO_PROMPT)
        stops = _stop_filter(call, _Shape.of(embeds))
        if stops is not None:
            return await self._complete_cut(call, embeds, stops)
        deadline = time.monotonic() + self.fleet.config.timeouts.total_s
        try:
            backend, content = await self._failover(
                lambda backend: self._complete_once(backend, call, embeds, deadline), deadline,
                call.prefix_key)
        except GatewayError as exc:
            return UpstreamReply.of(exc)
        self.fleet.release(backend)
        payload = json_object(content)
        if payload is None:
            return UpstreamReply.of(bad_upstream("upstream sent invalid JSON"))
        return UpstreamReply(200, _shaper(call, _Shape.of(embeds)).whole(payload),
                             backend=backend.config.url)

    async def _complete_once(self, backend: Backend, call: UpstreamCall,
                             embeds: Sequence[EncodedPromptEmbeds], deadline: float) -> bytes:
        body = self._body(call, embeds, backend)

        async def exchange() -> bytes:
            response = await self._send(backend, body)
            try:
                return await response.aread()
            finally:
                await response.aclose()

        try:
            content = await asyncio.wait_for(exchange(), deadline - time.monotonic())
        except asyncio.TimeoutError:
            self.fleet.failed(backend, "timed out")
            total = self.fleet.config.timeouts.total_s
            raise AttemptFailed(bad_upstream(
                f"upstream did not answer within timeouts.total_s ({total:g} s)", 504,
                "upstream_timeout"), retry=False) from None
        except httpx.HTTPError as exc:
            self.fleet.failed(backend, type(exc).__name__)
            raise AttemptFailed(transport_error(exc, "before answering"), retry=False) from exc
        self.fleet.succeeded(backend)
        return content

    async def _complete_cut(self, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds],
                            stops: StopFilter) -> UpstreamReply:
        """A whole answer cut at the gateway's stop strings: the upstream streams it, and
        the answer is joined here from the cut events."""
        deadline = time.monotonic() + self.fleet.config.timeouts.total_s
        try:
            backend, opened = await self._failover(
                lambda backend: self._open_once(backend, call, embeds, deadline), deadline,
                call.prefix_key)
        except GatewayError as exc:
            return UpstreamReply.of(exc)
        whole = WholeAnswer()
        try:
            async with aclosing(self._cut(backend, opened, stops, deadline)) as chunks:
                async for chunk in chunks:
                    if "error" in chunk:
                        return UpstreamReply.of(error_event(chunk))
                    whole.add(chunk)
        except StreamFailed as failure:
            return UpstreamReply.of(failure.error)
        finally:
            await _close(opened)
            self.fleet.release(backend)
        return UpstreamReply(200, _shaper(call, _Shape.of(embeds)).whole(
            whole.payload(stops.usage())),
                             backend=backend.config.url)

    # ----------------------------------------------------------------- streams

    async def open_stream(
        self, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds]
    ) -> tuple[UpstreamReply, EventStream]:
        """The stream's head and its SSE events to `[DONE]`.

        The head waits for the upstream's first event, so every failure before it is still
        a plain error status (and a retry where that is safe); after it, an error event.
        """
        return await split_stream(self.stream(call, embeds))

    async def stream(
        self, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds]
    ) -> AsyncGenerator[StreamItem, None]:
        """`open_stream` in the form a Serve streaming call returns: the head, then the
        events. The backend is held from the head on, so a consumer that goes away at any
        point (even before the first event) closes the upstream request."""
        request_id.bind(call.request_id)
        if not embeds:
            yield UpstreamReply.of(_NO_PROMPT)
            return
        deadline = time.monotonic() + self.fleet.config.timeouts.total_s
        shape = _Shape.of(embeds)
        opening = self._failover(
            functools.partial(self._open_once, call=call, embeds=embeds, deadline=deadline),
            deadline, call.prefix_key)
        # Only the attempts hold the payload: it is let go once the stream has opened, so
        # a long stream does not keep megabytes of embeddings (`upstream.payloads`).
        del embeds
        try:
            backend, opened = await opening
        except GatewayError as exc:
            yield UpstreamReply.of(exc)
            return
        try:
            yield UpstreamReply(200, backend=backend.config.url)
            try:
                async for event in self._relay(backend, opened, call, shape, deadline):
                    yield event
            except StreamFailed as failure:
                yield failure.error.to_sse_event()
            yield SSE_DONE
        finally:
            # Also when the client went away.
            await _close(opened)
            self.fleet.release(backend)

    async def _relay(self, backend: Backend, opened: _Opened, call: UpstreamCall,
                     shape: _Shape, deadline: float) -> AsyncIterator[bytes]:
        """The client's events: the upstream's, cut at the gateway's stops if the call has
        any, in the shape the client asked for."""
        shaper = _shaper(call, shape)
        stops = _stop_filter(call, shape)
        payloads = (self._payloads(backend, opened, deadline) if stops is None
                    else self._cut(backend, opened, stops, deadline))
        async with aclosing(payloads):
            async for payload in payloads:
                if "error" in payload:
                    yield sse_event(orjson.dumps(payload))
                else:
                    for event in shaper.events(payload):
                        yield event
        if stops is not None and call.fields.include_usage:
            for event in shaper.events(stops.usage_chunk()):
                yield event

    async def _cut(self, backend: Backend, opened: _Opened, stops: StopFilter,
                   deadline: float) -> AsyncGenerator[dict[str, Any], None]:
        """The upstream's events cut at the call's stop strings (error events as they
        came). Once the upstream only generates past them, its request is closed."""
        async with aclosing(self._payloads(backend, opened, deadline)) as payloads:
            async for payload in payloads:
                if "error" in payload:
                    yield payload
                    continue
                for chunk in stops.apply(payload):
                    yield chunk
                if stops.finished:
                    await _close(opened)
                    return

    async def _open_once(self, backend: Backend, call: UpstreamCall,
                         embeds: Sequence[EncodedPromptEmbeds], deadline: float) -> _Opened:
        body = self._body(call, embeds, backend)
        first_token_s = self.fleet.config.timeouts.first_token_s

        async def first_event() -> _Opened:
            response = await self._send(backend, body)
            try:
                events = sse_data(response)
                first = await anext(events, None)
            except BaseException:
                await response.aclose()
                raise
            if first is None:
                await response.aclose()
                self.fleet.failed(backend, "empty stream")
                raise AttemptFailed(bad_upstream("upstream stream ended before any event"),
                                    retry=False)
            return response, events, first

        started = time.monotonic()
        try:
            opened = await asyncio.wait_for(
                first_event(), min(first_token_s, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.fleet.failed(backend, "no first token in time")
            raise AttemptFailed(bad_upstream(
                f"upstream sent no token within timeouts.first_token_s ({first_token_s:g} s) "
                "or the total deadline", 504, "upstream_timeout"), retry=False) from None
        except httpx.HTTPError as exc:
            self.fleet.failed(backend, type(exc).__name__)
            raise AttemptFailed(transport_error(exc, "before the first token"),
                                retry=False) from exc
        self.fleet.succeeded(backend)
        metrics.record_upstream_first_token(backend.config.url, time.monotonic() - started)
        return opened

    async def _payloads(self, backend: Backend, opened: _Opened,
                        deadline: float) -> AsyncGenerator[dict[str, Any], None]:
        """Each upstream event's JSON object until the upstream's `[DONE]`; `StreamFailed`
        for anything else that ends the stream."""
        _, events, first = opened
        data: bytes | None = first
        while data is not None:
            if data == b"[DONE]":
                return
            payload = json_object(data)
            if payload is None:
                raise StreamFailed(bad_upstream("upstream sent an invalid stream event"))
            yield payload
            data = await self._next_event(backend, events, deadline)
        self.fleet.failed(backend, "stream ended before [DONE]")
        raise StreamFailed(bad_upstream("upstream stream ended before [DONE]"))

    async def _next_event(self, backend: Backend, events: AsyncIterator[bytes],
                          deadline: float) -> bytes | None:
        idle_s = self.fleet.config.timeouts.idle_s
        remaining = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(anext(events, None), min(idle_s, remaining))
        except asyncio.TimeoutError:
            limit = (f"timeouts.idle_s ({idle_s:g} s) between events" if idle_s < remaining
                     else "the timeouts.total_s deadline")
            self.fleet.failed(backend, "stream stalled")
            raise StreamFailed(bad_upstream(f"upstream stream stalled: {limit}", 504,
                                            "upstream_timeout")) from None
        except httpx.HTTPError as exc:
            self.fleet.failed(backend, type(exc).__name__)
            raise StreamFailed(transport_error(exc, "mid-stream")) from exc

    # ----------------------------------------------------------------- attempts

    async def _failover(
        self, attempt: Callable[[Backend], Awaitable[_T]], deadline: float, key: int | None
    ) -> tuple[Backend, _T]:
        """Run `attempt` on one backend after another (the prefix `key`'s choices, in
        order, under `prefix_affinity`) until one succeeds, retrying only
        failures marked safe to retry. The winner's slot is the caller's to release.
        Each attempt is counted by its backend and outcome, each retry by the backend and
        outcome it moved away from."""
        tried: set[Backend] = set()
        last: GatewayError | None = None
        retrying: tuple[str, int | str] | None = None
        for _ in range(self.fleet.config.retry.max_attempts):
            try:
                backend = await self.fleet.acquire(tried, deadline, key)
            except GatewayError as exc:
                raise (last or exc) from None
            if retrying is not None:
                metrics.record_upstream_retry(*retrying)
            tried.add(backend)
            try:
                result = await attempt(backend)
            except AttemptFailed as failure:
                self.fleet.release(backend)
                metrics.record_upstream_attempt(backend.config.url, failure.outcome)
                if not failure.retry:
                    raise failure.error from None
                last, retrying = failure.error, (backend.config.url, failure.outcome)
            except BaseException:
                self.fleet.release(backend)
                metrics.record_upstream_attempt(backend.config.url, "cancelled")
                raise
            else:
                metrics.record_upstream_attempt(backend.config.url, 200)
                return backend, result
        if last is None:  # max_attempts >= 1, so an attempt ran and failed
            raise RuntimeError("failover ended without an attempt")
        raise last

    async def _send(self, backend: Backend, body: list[Buffer]) -> httpx.Response:
        """POST to one backend; its 200 response, unread, or `AttemptFailed`."""
        timeouts = self.fleet.config.timeouts
        # The aiohttp transport applies connect, read and pool only: a body write that
        # stalls is bounded by the attempt's deadline (`timeouts.total_s` for a whole
        # answer, `timeouts.first_token_s` for a stream), which wraps this send.
        timeout = httpx.Timeout(connect=timeouts.connect_s, read=None, write=None,
                                pool=timeouts.connect_s)
        # The buffers go to the socket one by one; the explicit length keeps the request
        # a plain (not chunked) body, as vLLM and NIM expect.
        headers = {**backend.headers, "content-length": str(sum(map(len, body)))}
        rid = request_id.current()
        if rid is not None:  # the one header of the client's request that goes upstream
            headers[request_id.HEADER] = rid
        request = self.client.build_request("POST", backend.completions_url,
                                            content=body_stream(body), headers=headers,
                                            timeout=timeout)
        try:
            response = await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached the backend: always safe to try another.
            self.fleet.failed(backend, "connect error")
            raise AttemptFailed(bad_upstream("upstream is unreachable", 503,
                                             "upstream_unreachable"), retry=True) from exc
        except httpx.HTTPError as exc:
            self.fleet.failed(backend, type(exc).__name__)
            raise AttemptFailed(transport_error(exc, "before answering"), retry=False) from exc
        if response.status_code < 400:
            return response
        try:
            content = await response.aread()
        except httpx.HTTPError:
            content = b""
        finally:
            await response.aclose()
        raise self._refused(backend, response.status_code, content, response.headers)

    def _refused(self, backend: Backend, status: int, content: bytes,
                 headers: httpx.Headers) -> AttemptFailed:
        """An upstream error status: 429 sets the backend aside for its Retry-After, 5xx
        count towards ejection; 429, 502, 503 and 504 are retried on another backend."""
        error = upstream_error(status, content)
        if status == 429:
            seconds = retry_after_seconds(headers.get("retry-after"))
            self.fleet.throttled(backend, seconds)
            error.headers = {"Retry-After": str(max(1, math.ceil(seconds)))}
        elif status >= 500:
            self.fleet.failed(backend, f"HTTP {status}")
        return AttemptFailed(error, retry=status in RETRIED_STATUSES, upstream_status=status)

    def _body(self, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds],
              backend: Backend) -> list[Buffer]:
        fields = {**call.fields.to_upstream(), "model": backend.config.model or call.served_model}
        if call.stops is not None:
            fields.update(STREAM_FIELDS)
        return build_upstream_body(fields, embeds, backend.config.dialect)


@dataclass(frozen=True)
class _Shape:
    """What answering needs of a call's payload once it has gone: its prompts and rows."""

    prompts: int
    rows: int

    @classmethod
    def of(cls, embeds: Sequence[EncodedPromptEmbeds]) -> _Shape:
        return cls(len(embeds), sum(item.rows for item in embeds))


def _shaper(call: UpstreamCall, shape: _Shape) -> AnswerShaper:
    return shaper_for(call, shape.rows)


def _stop_filter(call: UpstreamCall, shape: _Shape) -> StopFilter | None:
    """The call's stop strings over its choices (prompts × n), when the gateway applies them."""
    if call.stops is None:
        return None
    options = call.fields.stream_options
    continuous = call.fields.include_usage and bool(options and options.continuous_usage_stats)
    return StopFilter(call.stops, shape.prompts * call.fields.n, usage_in_chunks=continuous)


async def _close(opened: _Opened) -> None:
    """End the upstream request: dropping its connection is how vLLM and NIM learn to stop
    generating."""
    response, events, _ = opened
    await events.aclose()
    await response.aclose()
