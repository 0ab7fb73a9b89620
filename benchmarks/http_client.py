"""CPU per request of async HTTP clients posting prompt-embeddings bodies the way the
gateway's Dispatcher does: `httpx.AsyncClient` on its own pool, `aiohttp.ClientSession`,
`httpcore.AsyncConnectionPool` used directly, and `httpx-aiohttp`: the Dispatcher's own
client (`serve_app.upstream.http.make_http_client`, httpx over aiohttp's pool).

Each client is set up like `make_http_client` (no connection cap, a keep-alive pool) and
sends like `DispatcherCore._send`: POST `/v1/completions` of the `bench_servers.py` sink, the
body `{"model", "max_tokens": 1, "prompt_embeds": base64 of a torch.save'd (tokens, 4096) bf16
tensor}` built once as buffers and streamed with an explicit content-length, the response
read whole and parsed as JSON. Each (client, tokens, concurrency) runs in a fresh spawned
process with that many tasks on one client; after a warm-up in which every task has finished
a request, that process's own CPU time (user + sys, getrusage) and completed requests are
counted over `--seconds` of wall time. The sink is one separate process with
`--sink-workers` uvicorn workers. Writes `results/http_client.md`.

    python benchmarks/http_client.py
    python benchmarks/http_client.py --tokens 128 2048 --concurrency 1 16 128 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import resource
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from multiprocessing import get_context
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HIDDEN = 4096  # as llama8b_sized.HIDDEN, which would import torch into every child
CLIENTS = ("httpx", "aiohttp", "httpcore", "httpx-aiohttp")
_KEEPALIVE_CONNECTIONS, _KEEPALIVE_EXPIRY_S = 256, 30.0  # as the Dispatcher's
_HEADERS = {"content-type": "application/json"}
_WARMUP_LIMIT_S = 300.0

Post = Callable[[], Awaitable[bytes]]
Close = Callable[[], Awaitable[None]]


@dataclass
class Run:
    client: str
    tokens: int
    concurrency: int
    requests: int
    wall_s: float
    user_s: float
    sys_s: float

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def build_body(tokens: int) -> list[bytes]:
    """The request body as the Dispatcher's buffers: fields, then the one payload."""
    import orjson
    import pybase64
    import torch

    buffer = io.BytesIO()
    torch.save(torch.randn(tokens, HIDDEN, dtype=torch.bfloat16), buffer)
    head = orjson.dumps({"model": "sink", "max_tokens": 1})
    return [head[:-1], b',"prompt_embeds":"', pybase64.b64encode(buffer.getvalue()), b'"}']


async def _stream(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def httpx_client(url: str, parts: list[bytes]) -> tuple[Post, Close]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=_KEEPALIVE_CONNECTIONS,
                          keepalive_expiry=_KEEPALIVE_EXPIRY_S)
    return await httpx_post(httpx.AsyncClient(limits=limits), url, parts)


async def gateway_client(url: str, parts: list[bytes]) -> tuple[Post, Close]:
    from serve_app.upstream.http import make_http_client

    return await httpx_post(make_http_client(), url, parts)


async def httpx_post(client: Any, url: str, parts: list[bytes]) -> tuple[Post, Close]:
    import httpx

    timeout = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=10.0)
    headers = {**_HEADERS, "content-length": str(sum(map(len, parts)))}

    async def post() -> bytes:
        request = client.build_request("POST", url, content=_stream(parts), headers=headers,
                                       timeout=timeout)
        response = await client.send(request, stream=True)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {content[:200]!r}")
        return content

    return post, client.aclose


async def aiohttp_client(url: str, parts: list[bytes]) -> tuple[Post, Close]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_EXPIRY_S)
    timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=None)
    session = aiohttp.ClientSession(connector=connector, timeout=timeout)
    headers = {**_HEADERS, "content-length": str(sum(map(len, parts)))}

    async def post() -> bytes:
        async with session.post(url, data=_stream(parts), headers=headers) as response:
            content = await response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {content[:200]!r}")
        return content

    return post, session.close


async def httpcore_client(url: str, parts: list[bytes]) -> tuple[Post, Close]:
    import httpcore

    pool = httpcore.AsyncConnectionPool(max_connections=None,
                                        max_keepalive_connections=_KEEPALIVE_CONNECTIONS,
                                        keepalive_expiry=_KEEPALIVE_EXPIRY_S)
    headers = [*((k.encode(), v.encode()) for k, v in _HEADERS.items()),
               (b"content-length", str(sum(map(len, parts))).encode())]
    extensions = {"timeout": {"connect": 10.0, "read": None, "write": 60.0, "pool": 10.0}}

    async def post() -> bytes:
        async with pool.stream("POST", url, headers=headers, content=_stream(parts),
                               extensions=extensions) as response:
            content = await response.aread()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {content[:200]!r}")
        return content

    return post, pool.aclose


FACTORIES: dict[str, Callable[[str, list[bytes]], Awaitable[tuple[Post, Close]]]] = {
    "httpx": httpx_client, "aiohttp": aiohttp_client, "httpcore": httpcore_client,
    "httpx-aiohttp": gateway_client}


async def drive(client: str, url: str, parts: list[bytes], concurrency: int, seconds: float,
                warmup: float) -> tuple[int, float, float, float]:
    """Requests completed, wall s, user s and sys s of this process over the timed window."""
    import orjson

    post, close = await FACTORIES[client](url, parts)
    done, stopping = 0, False
    warmed: set[int] = set()

    async def worker(index: int) -> None:
        nonlocal done
        while not stopping:
            if "choices" not in orjson.loads(await post()):
                raise RuntimeError("no choices in the answer")
            done += 1
            warmed.add(index)

    tasks = [asyncio.create_task(worker(index)) for index in range(concurrency)]
    try:
        start = time.monotonic()
        while time.monotonic() - start < warmup or len(warmed) < concurrency:
            if any(task.done() for task in tasks) or time.monotonic() - start > _WARMUP_LIMIT_S:
                break
            await asyncio.sleep(0.02)
        before, count, t0 = resource.getrusage(resource.RUSAGE_SELF), done, time.perf_counter()
        finished, _ = await asyncio.wait(tasks, timeout=seconds,
                                         return_when=asyncio.FIRST_EXCEPTION)
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        requests = done - count
        for task in finished:
            task.result()  # a worker only ends by raising
        if len(warmed) < concurrency:
            raise TimeoutError(f"only {len(warmed)} of {concurrency} tasks warmed up")
        stopping = True  # let requests in flight finish, so the sink sees no disconnects
        await asyncio.wait(tasks, timeout=60)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close()
    return (requests, wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)


def run_child(client: str, url: str, parts: list[bytes], concurrency: int, seconds: float,
              warmup: float) -> tuple[int, float, float, float]:
    return asyncio.run(drive(client, url, parts, concurrency, seconds, warmup))


def start_sink(workers: int) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    process = subprocess.Popen([sys.executable, str(HERE / "bench_servers.py"), "sink",
                                "--port", str(port), "--workers", str(workers)])
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return process, f"{url}/completions"
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError("the sink did not start")


def report(runs: list[Run], sink_workers: int, seconds: float) -> str:
    versions = ", ".join(f"{name} {version(name)}" for name in CLIENTS)
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; "
        f"Python {platform.python_version()}; {versions}. Sink: `bench_servers.py sink` with "
        f"{sink_workers} worker(s). {seconds:g} s per run after warm-up, each in a fresh "
        "process; CPU is the client process's user + sys over that window.",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`",
        "",
        "| prompt tokens | concurrency | client | requests | req/s | CPU ms/req | user ms/req "
        "| sys ms/req | cores | CPU/req vs httpx |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    per_request = {(r.client, r.tokens, r.concurrency): r.cpu_s / max(r.requests, 1)
                   for r in runs}
    for r in runs:
        n = max(r.requests, 1)
        base = per_request.get(("httpx", r.tokens, r.concurrency))
        ratio = f"{per_request[(r.client, r.tokens, r.concurrency)] / base:.2f}x" if base else ""
        lines.append(
            f"| {r.tokens} | {r.concurrency} | {r.client} | {r.requests} | "
            f"{r.requests / r.wall_s:.1f} | {1e3 * r.cpu_s / n:.2f} | {1e3 * r.user_s / n:.2f} "
            f"| {1e3 * r.sys_s / n:.2f} | {r.cpu_s / r.wall_s:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="at least this long, and until every task has finished a request")
    parser.add_argument("--sink-workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "http_client.md")
    args = parser.parse_args()
    sink, url = start_sink(args.sink_workers)
    runs: list[Run] = []
    try:
        for tokens in args.tokens:
            parts = build_body(tokens)
            for concurrency in args.concurrency:
                for client in args.clients:  # alternating, so all see the same machine
                    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                        result = pool.submit(run_child, client, url, parts, concurrency,
                                             args.seconds, args.warmup).result()
                    runs.append(Run(client, tokens, concurrency, *result))
                    print(f"{client} tokens={tokens} concurrency={concurrency}: "
                          f"{result[0] / result[1]:.1f} req/s", file=sys.stderr)
    finally:
        sink.terminate()
        sink.wait(30)
    table = report(runs, args.sink_workers, args.seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
