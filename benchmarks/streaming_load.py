"""Streamed completions at a fixed concurrency, and what they say: each request's time to
first token (the first event carrying a choice), its time per output token after that, and
the cell's output tokens/s; the gateway's added latency is its quantiles minus the direct
path's. `vllm_upstream.py` drives the gateway and vLLM itself with it.

One process, one aiohttp session: at the concurrencies measured (64 at most) the client's
own CPU is reported beside each cell, so a cell where the client is the limit shows it.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

# An answer must be whole within this long, or the cell fails rather than hangs.
REQUEST_TIMEOUT_S = 120.0


class StreamError(RuntimeError):
    """A request the server refused or ended with an error event."""


@dataclass(frozen=True)
class Timing:
    """One streamed request, in seconds of `time.perf_counter`."""

    sent: float
    first: float  # the first event carrying a choice
    done: float  # `data: [DONE]`
    completion_tokens: int
    prompt_tokens: int

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None for a one-token answer."""
        if self.completion_tokens < 2:
            return None
        return (self.done - self.first) / (self.completion_tokens - 1)


def timing_of(sent: float, events: Iterable[tuple[float, bytes]]) -> Timing:
    """A request's timing from its SSE lines, each with the time it arrived. The counts come
    from the usage event (`stream_options.include_usage`); an error event or a stream that
    ends without `[DONE]` raises."""
    first: float | None = None
    usage: dict[str, Any] | None = None
    for arrived, line in events:
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, keep-alives
        data = line[5:].strip()
        if data == b"[DONE]":
            if first is None or usage is None:
                raise StreamError("the stream ended without a choice or without usage")
            return Timing(sent, first, arrived, int(usage["completion_tokens"]),
                          int(usage["prompt_tokens"]))
        event = orjson.loads(data)
        if "error" in event:
            raise StreamError(f"error event: {event['error'].get('message', '')[:300]}")
        if event.get("choices") and first is None:
            first = arrived
        if event.get("usage"):
            usage = event["usage"]
    raise StreamError("the stream closed before [DONE]")


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile, interpolated between order statistics (one value: itself)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


@dataclass
class Cell:
    """One target at one concurrency: the measured requests (warm-up left out)."""

    target: str  # "direct" (text to vLLM) or "gateway"
    concurrency: int
    timings: list[Timing] = field(default_factory=list)
    client_cpu_s: float = 0.0  # the client's CPU from the first measured send to the end
    complete: bool = True  # False: the run's deadline stopped it early

    @property
    def seconds(self) -> float:
        """From the first measured send to the last answer's end."""
        return max(t.done for t in self.timings) - min(t.sent for t in self.timings)

    def summary(self) -> dict[str, Any]:
        ttft = [t.ttft for t in self.timings]
        tpot = [value for t in self.timings if (value := t.tpot) is not None]
        return {
            "target": self.target, "concurrency": self.concurrency,
            "requests": len(self.timings), "complete": self.complete,
            "ttft_p50_ms": quantile(ttft, 0.5) * 1e3,
            "ttft_p90_ms": quantile(ttft, 0.9) * 1e3,
            "tpot_p50_ms": quantile(tpot, 0.5) * 1e3 if tpot else None,
            "output_tokens_per_s": sum(t.completion_tokens for t in self.timings)
            / self.seconds,
            "completion_tokens": sorted({t.completion_tokens for t in self.timings}),
            "prompt_tokens": sorted({t.prompt_tokens for t in self.timings}),
            "client_cores": self.client_cpu_s / self.seconds,
        }


def added_latency(direct: dict[str, Any], gateway: dict[str, Any]) -> dict[str, float]:
    """What the gateway adds to the time to first token: its quantiles minus the direct
    path's (the requests are not paired, so the quantiles are compared, not each pair)."""
    return {"added_p50_ms": gateway["ttft_p50_ms"] - direct["ttft_p50_ms"],
            "added_p90_ms": gateway["ttft_p90_ms"] - direct["ttft_p90_ms"]}


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def stream_one(session: Any, url: str, body: dict[str, Any]) -> Timing:
    """POST one streamed completion and time it."""
    sent = time.perf_counter()
    async with session.post(f"{url}/completions", json=body) as response:
        if response.status != 200:
            text = (await response.read())[:300].decode(errors="replace")
            raise StreamError(f"HTTP {response.status} from {url}: {text}")
        lines = [(time.perf_counter(), line) async for line in response.content]
    return timing_of(sent, lines)


async def run_cell(target: str, url: str, bodies: Sequence[dict[str, Any]], concurrency: int,
                   deadline: float) -> Cell:
    """`bodies` in order, `concurrency` in flight; the first `concurrency` (each worker's
    first request) are a warm-up and not counted. No request starts after `deadline`
    (`time.monotonic`): the cell is then marked incomplete, and may hold no timing."""
    import aiohttp

    cell = Cell(target, concurrency)
    pending = iter(enumerate(bodies))
    cpu_start = cpu_now()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:

        async def worker() -> None:
            nonlocal cpu_start
            for index, body in pending:
                if time.monotonic() > deadline:
                    cell.complete = False
                    return
                if index == concurrency:
                    cpu_start = cpu_now()
                timing = await stream_one(session, url, body)
                if index >= concurrency:
                    cell.timings.append(timing)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cell.client_cpu_s = cpu_now() - cpu_start
    return cell
