"""DispatcherCore: sends encoded prompt embeddings to a fleet of NIM / vLLM servers.

The upstream body is assembled from bytes: orjson serialises the small sampling part and
the base64 payloads are spliced in unescaped (base64 needs no JSON escaping). Each request
goes to one backend chosen by the `Fleet`; before the first byte of the answer has gone to
the client it may fail over to another (connect errors, 429, 502, 503, 504 only), and after
that an upstream failure ends the stream with an error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar, cast

import httpx
import orjson

from serve_app.config import UpstreamConfig
from serve_app.errors import GatewayError
from serve_app.prompts.codec import EncodedPromptEmbeds, Piece
from serve_app.protocol import SSE_DONE, SamplingFields
from serve_app.upstream.answers import ChatShape, ChatStreamConverter, chat_completion
from serve_app.upstream.fleet import Backend, Fleet

_WRITE_TIMEOUT_S = 60.0
_KEEPALIVE_CONNECTIONS = 256
_KEEPALIVE_EXPIRY_S = 30.0
_RETRIED_STATUSES = frozenset({429, 502, 503, 504})
"""Statuses that mean the backend did not take the request on: safe to send elsewhere."""

_T = TypeVar("_T")


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
    """The base64 of all its prompts' embeddings, known before they are made: the ingress
    picks the transport between replicas by it."""


@dataclass(frozen=True)
class UpstreamReply:
    """A complete answer (non-stream), or the head of a stream (`body` empty, status 200)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, error: GatewayError) -> UpstreamReply:
        return cls(error.status, error.to_body(), error.headers)


def make_http_client() -> httpx.AsyncClient:
    """One pool for the whole fleet; timeouts are set per request from the fleet config.

    The number of connections is bounded by the backends' in-flight slots, not here.
    """
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=_KEEPALIVE_CONNECTIONS,
                          keepalive_expiry=_KEEPALIVE_EXPIRY_S)
    return httpx.AsyncClient(limits=limits)


def build_upstream_body(
    fields: dict[str, Any], embeds: Sequence[EncodedPromptEmbeds], dialect: str
) -> list[Piece]:
    """The JSON body as pieces sent back to back: orjson for the small fields, and each
    payload's base64 pieces spliced in as they are (base64 needs no JSON escaping), so the
    megabytes of embeddings are never copied into one buffer."""
    head = orjson.dumps(fields)
    parts: list[Piece] = [head[:-1], b"," if len(head) > 2 else b""]
    parts.append(b'"prompt":"","prompt-embeds":' if dialect == "nim" else b'"prompt_embeds":')
    if len(embeds) == 1:
        parts += [b'"', *embeds[0].parts, b'"']
    else:
        parts.append(b"[")
        for index, item in enumerate(embeds):
            parts += [b',"' if index else b'"', *item.parts, b'"']
        parts.append(b"]")
    parts.append(b"}")
    return parts


async def _pieces(parts: list[Piece]) -> AsyncIterator[bytes]:
    """The body for httpx; memoryview pieces (payloads read in place from Ray's object
    store) pass through h11's writer like bytes, so they are not copied here."""
    for part in parts:
        yield cast(bytes, part)


def retry_after_seconds(value: str | None) -> float:
    """Retry-After as seconds (delta-seconds or an HTTP date); 1 when absent or unreadable."""
    if not value:
        return 1.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 1.0
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _upstream_error(status: int, body: bytes) -> GatewayError:
    """The upstream's own message for its 4xx; a 5xx is named and kept as 502, 503 or 504."""
    message = "upstream error"
    try:
        parsed = orjson.loads(body)
        detail = parsed.get("error", parsed) if isinstance(parsed, dict) else {}
        if isinstance(detail, dict) and isinstance(detail.get("message"), str):
            message = detail["message"]
        elif isinstance(detail, str):
            message = detail
    except orjson.JSONDecodeError:
        pass
    if status == 429:
        return GatewayError(message, 429, code="upstream_rate_limited")
    if 400 <= status < 500:
        return GatewayError(message, status, code="upstream_error")
    return GatewayError(f"upstream failed with HTTP {status}: {message}",
                        status if status in _RETRIED_STATUSES else 502, code="upstream_error")


def _transport_error(exc: httpx.HTTPError, when: str) -> GatewayError:
    if isinstance(exc, httpx.TimeoutException):
        return GatewayError(f"upstream timed out {when}", 504, code="upstream_timeout")
    return GatewayError(f"upstream connection lost {when} ({type(exc).__name__})", 502,
                        code="upstream_error")


class _AttemptFailed(Exception):
    """One attempt's failure before any byte went to the client; `retry` if another may."""

    def __init__(self, error: GatewayError, retry: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry = retry


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

    async def aclose(self) -> None:
        await self.fleet.close()
        await self.client.aclose()

    # ----------------------------------------------------------------- whole answers

    async def complete(
        self, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds]
    ) -> UpstreamReply:
        if not embeds:
            return UpstreamReply.of(_NO_PROMPT)
        deadline = time.monotonic() + self.fleet.config.timeouts.total_s
        try:
            backend, content = await self._failover(
                lambda backend: self._complete_once(backend, call, embeds, deadline), deadline)
        except GatewayError as exc:
            return UpstreamReply.of(exc)
        self.fleet.release(backend)
        payload = _json_object(content)
        if payload is None:
            return UpstreamReply.of(
                GatewayError("upstream sent invalid JSON", 502, code="upstream_error"))
        answer = self._patch(payload, call, sum(item.rows for item in embeds))
        if call.chat is not None:
            answer = chat_completion(answer, call.chat)
        return UpstreamReply(200, orjson.dumps(answer))

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
            raise _AttemptFailed(GatewayError(
                f"upstream did not answer within timeouts.total_s ({total:g} s)", 504,
                code="upstream_timeout"), retry=False) from None
        except httpx.HTTPError as exc:
            self.fleet.failed(backend, type(exc).__name__)
            raise _AttemptFailed(_transport_error(exc, "before answering"), retry=False) from exc
        self.fleet.succeeded(backend)
        return content

    # ----------------------------------------------------------------- streams

    async def stream(
        self, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds]
    ) -> AsyncIterator[UpstreamReply | bytes]:
        """Yield an `UpstreamReply` head, then (when it is 200) SSE event bytes to `[DONE]`.

        The head waits for the upstream's first event, so every failure before it is still
        a plain error status (and a retry where that is safe); after it, an error event.
        """
        if not embeds:
            yield UpstreamReply.of(_NO_PROMPT)
            return
        deadline = time.monotonic() + self.fleet.config.timeouts.total_s
        try:
            backend, (response, events, first) = await self._failover(
                lambda backend: self._open_stream(backend, call, embeds, deadline), deadline)
        except GatewayError as exc:
            yield UpstreamReply.of(exc)
            return
        rows = sum(item.rows for item in embeds)
        try:
            yield UpstreamReply(200)
            async for event in self._relay_events(backend, events, first, call, rows, deadline):
                yield event
        finally:
            # Also when the client went away: closing the response drops the upstream
            # connection, which is how vLLM and NIM learn to stop generating.
            await events.aclose()
            await response.aclose()
            self.fleet.release(backend)

    async def _open_stream(self, backend: Backend, call: UpstreamCall,
                           embeds: Sequence[EncodedPromptEmbeds], deadline: float) -> _Opened:
        body = self._body(call, embeds, backend)
        first_token_s = self.fleet.config.timeouts.first_token_s
        opened: list[httpx.Response] = []

        async def first_event() -> tuple[AsyncGenerator[bytes, None], bytes | None]:
            opened.append(await self._send(backend, body))
            events = _sse_data(opened[0])
            return events, await anext(events, None)

        try:
            events, first = await asyncio.wait_for(
                first_event(), min(first_token_s, deadline - time.monotonic()))
        except BaseException as exc:
            if opened:
                await opened[0].aclose()
            if isinstance(exc, asyncio.TimeoutError):
                self.fleet.failed(backend, "no first token in time")
                raise _AttemptFailed(GatewayError(
                    f"upstream sent no token within timeouts.first_token_s "
                    f"({first_token_s:g} s) or the total deadline", 504,
                    code="upstream_timeout"), retry=False) from None
            if isinstance(exc, httpx.HTTPError):
                self.fleet.failed(backend, type(exc).__name__)
                raise _AttemptFailed(_transport_error(exc, "before the first token"),
                                     retry=False) from exc
            raise
        if first is None:
            await opened[0].aclose()
            self.fleet.failed(backend, "empty stream")
            raise _AttemptFailed(GatewayError("upstream stream ended before any event", 502,
                                              code="upstream_error"), retry=False)
        self.fleet.succeeded(backend)
        return opened[0], events, first

    async def _relay_events(
        self, backend: Backend, events: AsyncIterator[bytes], first: bytes,
        call: UpstreamCall, rows: int, deadline: float,
    ) -> AsyncIterator[bytes]:
        """Re-emit each upstream SSE data event, patched; end with `[DONE]` in every case."""
        chat = ChatStreamConverter(call.chat) if call.chat is not None else None
        idle_s = self.fleet.config.timeouts.idle_s
        data: bytes | None = first
        while data is not None:
            if data == b"[DONE]":
                yield SSE_DONE
                return
            payload = _json_object(data)
            if payload is None:
                yield _stream_failure("upstream sent an invalid stream event", 502)
                yield SSE_DONE
                return
            if "error" in payload:
                yield b"data: " + data + b"\n\n"
            else:
                patched = self._patch(payload, call, rows)
                for event in chat.convert(patched) if chat else [patched]:
                    yield b"data: " + orjson.dumps(event) + b"\n\n"
            remaining = deadline - time.monotonic()
            try:
                data = await asyncio.wait_for(anext(events, None), min(idle_s, remaining))
            except asyncio.TimeoutError:
                limit = (f"timeouts.idle_s ({idle_s:g} s) between events" if idle_s < remaining
                         else "the timeouts.total_s deadline")
                self.fleet.failed(backend, "stream stalled")
                yield _stream_failure(f"upstream stream stalled: {limit}", 504, "upstream_timeout")
                yield SSE_DONE
                return
            except httpx.HTTPError as exc:
                self.fleet.failed(backend, type(exc).__name__)
                yield _transport_error(exc, "mid-stream").to_sse_event()
                yield SSE_DONE
                return
        self.fleet.failed(backend, "stream ended before [DONE]")
        yield _stream_failure("upstream stream ended before [DONE]", 502)
        yield SSE_DONE

    # ----------------------------------------------------------------- attempts

    async def _failover(
        self, attempt: Callable[[Backend], Awaitable[_T]], deadline: float
    ) -> tuple[Backend, _T]:
        """Run `attempt` on one backend after another until one succeeds, retrying only
        failures marked safe to retry. The winner's slot is the caller's to release."""
        tried: set[Backend] = set()
        last: GatewayError | None = None
        for _ in range(self.fleet.config.retry.max_attempts):
            try:
                backend = await self.fleet.acquire(tried, deadline)
            except GatewayError as exc:
                raise (last or exc) from None
            tried.add(backend)
            try:
                return backend, await attempt(backend)
            except _AttemptFailed as failure:
                self.fleet.release(backend)
                if not failure.retry:
                    raise failure.error from None
                last = failure.error
            except BaseException:
                self.fleet.release(backend)
                raise
        assert last is not None
        raise last

    async def _send(self, backend: Backend, body: list[Piece]) -> httpx.Response:
        """POST to one backend; its 200 response, unread, or `_AttemptFailed`."""
        timeouts = self.fleet.config.timeouts
        timeout = httpx.Timeout(connect=timeouts.connect_s, read=None,
                                write=_WRITE_TIMEOUT_S, pool=timeouts.connect_s)
        # The pieces go to the socket one by one; the explicit length keeps the request
        # a plain (not chunked) body, as vLLM and NIM expect.
        headers = {**backend.headers, "content-length": str(sum(map(len, body)))}
        request = self.client.build_request("POST", backend.completions_url,
                                            content=_pieces(body), headers=headers,
                                            timeout=timeout)
        try:
            response = await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached the backend: always safe to try another.
            self.fleet.failed(backend, "connect error")
            raise _AttemptFailed(GatewayError("upstream is unreachable", 503,
                                              code="upstream_unreachable"), retry=True) from exc
        except httpx.HTTPError as exc:
            self.fleet.failed(backend, type(exc).__name__)
            raise _AttemptFailed(_transport_error(exc, "before answering"),
                                 retry=False) from exc
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
                 headers: httpx.Headers) -> _AttemptFailed:
        """An upstream error status: 429 sets the backend aside for its Retry-After, 5xx
        count towards ejection; 429, 502, 503 and 504 are retried on another backend."""
        error = _upstream_error(status, content)
        if status == 429:
            seconds = retry_after_seconds(headers.get("retry-after"))
            self.fleet.throttled(backend, seconds)
            error.headers = {"Retry-After": str(max(1, math.ceil(seconds)))}
        elif status >= 500:
            self.fleet.failed(backend, f"HTTP {status}")
        return _AttemptFailed(error, retry=status in _RETRIED_STATUSES)

    def _body(self, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds],
              backend: Backend) -> list[Piece]:
        fields = {**call.fields.to_upstream(), "model": backend.config.model or call.served_model}
        return build_upstream_body(fields, embeds, backend.config.dialect)

    def _patch(self, payload: dict[str, Any], call: UpstreamCall,
               prompt_rows: int) -> dict[str, Any]:
        """Report the served name and the true prompt length (NIM may report 0)."""
        payload["model"] = call.served_model
        usage = payload.get("usage")
        if isinstance(usage, dict):
            completion = usage.get("completion_tokens") or 0
            usage["prompt_tokens"] = prompt_rows
            usage["total_tokens"] = prompt_rows + completion
        return payload


_NO_PROMPT = GatewayError("no prompt to send upstream", 400, param="prompt")


def _stream_failure(message: str, status: int, code: str = "upstream_error") -> bytes:
    return GatewayError(message, status, code=code).to_sse_event()


def _json_object(data: bytes) -> dict[str, Any] | None:
    """The upstream's JSON object, or None for invalid JSON or any other JSON type."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


async def _sse_data(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """The `data:` payload of each server-sent event (multi-line data joined by newlines)."""
    lines: list[bytes] = []
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            line = raw.rstrip(b"\r")
            if line:
                if line.startswith(b"data:"):
                    lines.append(line[5:].lstrip(b" "))
                continue
            if lines:
                yield b"\n".join(lines)
                lines = []
    if lines:
        yield b"\n".join(lines)
