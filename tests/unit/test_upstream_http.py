"""The Dispatcher's HTTP client (httpx over aiohttp) against raw sockets: which failures say
that nothing reached the backend (safe to retry) and which say the request may have."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import httpx
import pytest

from serve_app.upstream.http import as_httpx_error, make_http_client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
RETRIED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # dispatcher.py


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)


async def close_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.close()


async def die_mid_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                 b"content-length: 1000\r\n\r\ndata: {}\n\n")
    await writer.drain()
    writer.close()


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await asyncio.sleep(30)


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions"

    yield start
    for server in servers:
        server.close()


async def post(url: str, read_s: float | None = None) -> httpx.Response:
    async with make_http_client() as client:
        body = [b'{"prompt_embeds": "', b"A" * 100_000, b'"}']

        async def stream() -> AsyncIterator[bytes]:
            for part in body:
                yield part

        request = client.build_request(
            "POST", url, content=stream(), timeout=httpx.Timeout(5.0, read=read_s),
            headers={"content-length": str(sum(map(len, body)))})
        response = await client.send(request, stream=True)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response


async def test_an_answer_arrives_whole(serve) -> None:
    response = await post(await serve(answer))
    assert (response.status_code, response.content) == (200, b"ok")


async def test_nothing_listening_is_a_connect_error() -> None:
    with pytest.raises(httpx.ConnectError):
        await post("http://127.0.0.1:9/v1/completions")


async def test_a_connection_closed_after_the_request_is_not_a_connect_failure(serve) -> None:
    """The backend read the request: it may have run it, so this must not be retried."""
    with pytest.raises(httpx.TransportError) as caught:
        await post(await serve(close_after_request))
    assert not isinstance(caught.value, RETRIED + (httpx.TimeoutException,))


async def test_a_connection_lost_mid_answer_is_a_read_error_not_a_timeout(serve) -> None:
    with pytest.raises(httpx.TransportError) as caught:
        await post(await serve(die_mid_answer))
    assert not isinstance(caught.value, RETRIED + (httpx.TimeoutException,))


async def test_a_silent_backend_is_a_read_timeout(serve) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await post(await serve(never_answer), read_s=0.3)


@pytest.mark.parametrize(("error", "expected"), [
    (aiohttp.ConnectionTimeoutError(), httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError(), httpx.ReadTimeout),
    (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
    (aiohttp.ClientOSError(104, "reset"), httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError(), httpx.ReadError),
    (ConnectionResetError(), httpx.RemoteProtocolError),
])
def test_aiohttp_errors_map_to_what_the_dispatcher_retries(error, expected) -> None:
    assert type(as_httpx_error(error)) is expected
