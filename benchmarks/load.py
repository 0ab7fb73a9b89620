"""The end-to-end benchmark's load generator: P processes, started together, each holding
concurrency / P requests in flight for a fixed time, so that one client process's event loop
is not what limits the server. Each process measures its own CPU over the timed window; the
report puts the generator's cores next to every row, so a row where the generator saturates
its cores shows it.

Each process runs one aiohttp session (compiled HTTP parser, one connection per request in
flight) and sends OpenAI completions of distinct text prompts of a fixed token count.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from typing import Any

from llama8b_sized import prompt_of

# A request's answer must come within this long, or the run fails rather than hangs.
_REQUEST_TIMEOUT_S = 120.0


@dataclass
class LoadResult:
    """What all load processes together saw in one timed window."""

    requests: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    cpu_s: float = 0.0  # the load processes' own CPU (user + system) in the window
    errors: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cores(self) -> float:
        """Cores the generator itself kept busy."""
        return self.cpu_s / self.seconds

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


@dataclass(frozen=True)
class LoadSpec:
    url: str  # the OpenAI base URL; or, with tokens 0, a URL to GET
    model: str
    tokens: int
    concurrency: int
    seconds: float
    processes: int = 1
    cores: tuple[int, ...] = ()  # the load processes' CPU affinity; () leaves it as is


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(spec: LoadSpec, index: int, tasks: int, barrier: Barrier) -> dict[str, Any]:
    import aiohttp

    prompts = [prompt_of(spec.tokens, index * 100_003 + n) for n in range(64)]
    timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(n: int) -> bool:
            if not spec.tokens:
                async with session.get(spec.url) as response:
                    await response.read()
                    return response.status == 200
            body = {"model": spec.model, "prompt": prompts[n % len(prompts)], "max_tokens": 1}
            async with session.post(f"{spec.url}/completions", json=body) as response:
                await response.read()
                return response.status == 200

        # Warm-up: every task's connection is open before the window starts.
        await asyncio.gather(*(one(n) for n in range(tasks)))
        await asyncio.to_thread(barrier.wait)
        start, cpu_start = time.perf_counter(), cpu_now()
        deadline = start + spec.seconds

        async def worker(offset: int) -> None:
            nonlocal errors
            n = offset
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                if await one(n):
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1
                n += tasks

        await asyncio.gather(*(worker(offset) for offset in range(tasks)))
        return {"requests": len(latencies), "seconds": time.perf_counter() - start,
                "latencies": latencies, "cpu_s": cpu_now() - cpu_start, "errors": errors}


def _process(spec: LoadSpec, index: int, tasks: int, barrier: Barrier,
             results: multiprocessing.Queue[dict[str, Any]]) -> None:
    if spec.cores:
        os.sched_setaffinity(0, spec.cores)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results.put(asyncio.run(_drive(spec, index, tasks, barrier)))


def run_load(spec: LoadSpec) -> LoadResult:
    """Start the processes, release them together, and add up what they saw."""
    processes = max(1, min(spec.processes, spec.concurrency))
    shares = [spec.concurrency // processes + (i < spec.concurrency % processes)
              for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results: multiprocessing.Queue[dict[str, Any]] = context.Queue()
    children = [context.Process(target=_process, args=(spec, i, share, barrier, results))
                for i, share in enumerate(shares)]
    for child in children:
        child.start()
    deadline = _REQUEST_TIMEOUT_S * 2 + spec.seconds + 60
    parts = [results.get(timeout=deadline) for _ in children]
    for child in children:
        child.join()
    total = LoadResult(requests=sum(p["requests"] for p in parts),
                       seconds=max(p["seconds"] for p in parts),
                       cpu_s=sum(p["cpu_s"] for p in parts),
                       errors=sum(p["errors"] for p in parts))
    for part in parts:
        total.latencies.extend(part["latencies"])
    if total.errors:
        raise RuntimeError(f"{total.errors} requests failed at {spec.url} "
                           f"({spec.tokens} tokens, concurrency {spec.concurrency})")
    return total
