"""The Dispatcher's HTTP client: httpx's API over aiohttp's connection pool.

httpcore's pool (under httpx) spends CPU per request that grows with the connections it
holds: at 128 requests in flight it costs about 100 times what aiohttp's does
(`benchmarks/http_client.py`). The Dispatcher keeps httpx's request and response types,
which its tests drive through `httpx.MockTransport`, and sends through `httpx-aiohttp`'s
transport (the one the OpenAI SDK offers).

That transport maps every aiohttp connection error to `httpx.ConnectTimeout`, which would
tell the Dispatcher that nothing reached the backend and a retry is safe. Here only a
failure to connect says so; a connection lost after it is `httpx.RemoteProtocolError`, as
httpcore reports it, so such a request is never sent twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

_KEEPALIVE_EXPIRY_S = 30.0


def make_http_client() -> httpx.AsyncClient:
    """One pool for the whole fleet; timeouts are set per request from the fleet config.
    The number of connections is bounded by the backends' in-flight slots, not here."""

    def session() -> aiohttp.ClientSession:
        # Made on the first request, inside the replica's event loop, as aiohttp requires.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_EXPIRY_S)
        return aiohttp.ClientSession(connector=connector)

    return httpx.AsyncClient(transport=_Transport(client=session))


def as_httpx_error(exc: BaseException) -> BaseException:
    """The httpx error for an aiohttp one, telling a failed connect from a lost connection."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(exc))
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc))
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(str(exc))
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx.ReadError(str(exc))
    if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError):
        return httpx.RemoteProtocolError(str(exc) or type(exc).__name__)
    return exc


def _remapped(exc: httpx.TransportError) -> httpx.TransportError:
    mapped = as_httpx_error(exc.__cause__) if exc.__cause__ is not None else exc
    return mapped if isinstance(mapped, httpx.TransportError) else exc


class _Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx.TransportError as exc:
            raise _remapped(exc) from exc.__cause__
        response.stream = _Stream(response.stream)  # type: ignore[arg-type]
        return response


class _Stream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self.inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.inner:
                yield chunk
        except httpx.TransportError as exc:
            raise _remapped(exc) from exc.__cause__

    async def aclose(self) -> None:
        await self.inner.aclose()
