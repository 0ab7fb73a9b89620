"""The upstream fleet as one Dispatcher replica sees it: health, routing and in-flight slots.

Each backend is `healthy`, `ejected` (cooling down after consecutive failures), `half_open`
(cooldown over, its probe running) or `retired` (removed by a config change, finishing its
in-flight requests). Among the healthy backends with a free slot, `upstream.routing` picks
one (`routing`: by prefix affinity under bounded loads, or by load). All state is per
Dispatcher replica: with R replicas a backend may see up to R x `max_in_flight` requests.

One module for the fleet's one state machine: routing, slots, outcomes and probes all
read and write the same backend states.

Everything here runs on the replica's event loop; only `acquire`, `ready` and the probes
await. Each backend's state, in-flight count and ejections are exported as metrics, labelled by
its configured url (`observability.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx

from serve_app import envs
from serve_app.config import BackendConfig, HealthConfig, UpstreamConfig
from serve_app.errors import GatewayError
from serve_app.observability import metrics
from serve_app.upstream.failures import failure_kind
from serve_app.upstream.routing import by_affinity, least_loaded

Clock = Callable[[], float]

_WAIT_SLICE_S = 0.5
"""Longest single sleep of a queued request, so it also sees throttles and cooldowns end."""
GAUGE_REFRESH_S = 5.0
"""Ray drops a gauge value that is not set again within two metric reports (about 20 s),
so each backend's state and in-flight gauges are set again this often."""


class BackendState(str, enum.Enum):
    HEALTHY = "healthy"
    EJECTED = "ejected"
    HALF_OPEN = "half_open"
    RETIRED = "retired"


class Backend:
    """One upstream server: its settings, load and health record."""

    def __init__(self, config: BackendConfig, health: HealthConfig) -> None:
        self.configure(config, health)
        self.state = BackendState.HEALTHY
        self.in_flight = 0
        self.answered = False
        """Whether it has passed a probe or answered a request: until then it is starting."""
        self.failures = 0
        """Consecutive failures since the last success."""
        self.ejections = 0
        self.routed = {"affinity": 0, "spilled_in": 0, "spilled_out": 0}
        """Keyed requests it took as their first choice, took for a first choice that was
        full or over its bound, and passed on while being that first choice."""
        self.last_error: str | None = None
        self.ejected_until = 0.0
        self.throttled_until = 0.0
        self.changed = asyncio.Event()
        """Set when the backend is ejected, so its prober re-plans at once."""
        self.cooldown_s = health.cooldown_s

    def configure(self, config: BackendConfig, health: HealthConfig) -> None:
        self.config = config
        self.health = health
        self.completions_url = f"{config.url}/completions"
        self.headers = {"content-type": "application/json"}
        api_key = envs.secret(config.api_key_env)
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"

    @property
    def state(self) -> BackendState:
        return self._state

    @state.setter
    def state(self, state: BackendState) -> None:
        self._state = state
        metrics.set_upstream_state(self.config.url, state.value,
                                   [each.value for each in BackendState])

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @in_flight.setter
    def in_flight(self, in_flight: int) -> None:
        self._in_flight = in_flight
        metrics.set_upstream_in_flight(self.config.url, in_flight)

    def publish(self) -> None:
        """Set the state and in-flight gauges again, unchanged."""
        self.state, self.in_flight = self._state, self._in_flight

    def routable(self, now: float) -> bool:
        return self.state is BackendState.HEALTHY and now >= self.throttled_until

    @property
    def has_slot(self) -> bool:
        return self.in_flight < self.config.max_in_flight

    def succeeded(self) -> None:
        self.failures = 0
        self.answered = True

    def failed(self, reason: str, now: float) -> None:
        self.failures += 1
        self.last_error = reason
        if self.state is BackendState.HEALTHY and self.failures >= self.health.failure_threshold:
            self._eject(failure_kind(reason), now)

    def throttle(self, seconds: float, now: float) -> None:
        self.throttled_until = max(self.throttled_until, now + seconds)
        self.last_error = "HTTP 429"

    def probed(self, ok: bool, reason: str, now: float) -> bool:
        """Record a probe; True when it readmits the backend.

        Before its first answer a backend is starting, not failing (a fleet and its
        gateway start together): its cooldown does not grow, and a passed probe readmits
        it even while ejected (readiness probes come before the cooldown ends), so it
        takes traffic as soon as it is up."""
        starting = not self.answered
        self.answered |= ok
        if self.state is BackendState.HALF_OPEN or (
                starting and ok and self.state is BackendState.EJECTED):
            if ok:
                self.state = BackendState.HEALTHY
                self.failures = 0
                self.cooldown_s = self.health.cooldown_s
                return True
            self.last_error = reason
            if not starting:
                self.cooldown_s = min(self.cooldown_s * 2, self.health.max_cooldown_s)
            self._eject("probe_failed", now)
        elif not ok and self.state is BackendState.HEALTHY:
            self.failed(reason, now)
        return False

    def _eject(self, kind: str, now: float) -> None:
        """Set aside for the cooldown; `kind` is one of `metrics.FAILURE_KINDS`."""
        self.state = BackendState.EJECTED
        self.ejections += 1
        metrics.record_upstream_ejection(self.config.url, kind)
        self.ejected_until = now + self.cooldown_s
        self.changed.set()

    def status(self, now: float) -> dict[str, Any]:
        return {
            "url": self.config.url,
            "dialect": self.config.dialect,
            "state": self.state.value,
            "in_flight": self.in_flight,
            "max_in_flight": self.config.max_in_flight,
            "weight": self.config.weight,
            "consecutive_failures": self.failures,
            "ejections": self.ejections,
            "routed_by_affinity": self.routed["affinity"],
            "spilled_in": self.routed["spilled_in"],
            "spilled_out": self.routed["spilled_out"],
            "cooldown_remaining_s": round(max(0.0, self.ejected_until - now), 3)
            if self.state is BackendState.EJECTED else 0.0,
            "throttled_remaining_s": round(max(0.0, self.throttled_until - now), 3),
            "last_error": self.last_error,
        }


def _count_route(chosen: Backend, first: Backend) -> None:
    if chosen is first:
        outcome = "affinity"
    else:
        outcome = "spilled_in"
        first.routed["spilled_out"] += 1
        metrics.record_upstream_route(first.config.url, "spilled_out")
    chosen.routed[outcome] += 1
    metrics.record_upstream_route(chosen.config.url, outcome)


class Fleet:
    """The backends of one model, the probes that watch them, and requests waiting for a slot."""

    def __init__(
        self, config: UpstreamConfig, client: httpx.AsyncClient, clock: Clock = time.monotonic
    ) -> None:
        self.config = config
        self.client = client
        self.clock = clock
        self.backends = [Backend(backend, config.health) for backend in config.backends]
        self.retired: list[Backend] = []
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._probes: dict[Backend, asyncio.Task[None]] = {}
        self._gauges: asyncio.Task[None] | None = None
        self._readiness_probes: asyncio.Task[None] | None = None
        self._next_readiness_probes = 0.0
        self._rng = random.Random()
        self._closed = False
        with contextlib.suppress(RuntimeError):  # else on first use, once a loop runs
            self.start_probes()

    # ----------------------------------------------------------------- configuration

    def update(self, config: UpstreamConfig) -> None:
        """Apply a new fleet config; requests in flight finish on the backends they hold."""
        current = {backend.config.url: backend for backend in self.backends}
        backends = []
        for backend_config in config.backends:
            backend = current.pop(backend_config.url, None)
            if backend is None:
                backend = Backend(backend_config, config.health)
            else:
                backend.configure(backend_config, config.health)
            backends.append(backend)
        for backend in current.values():
            backend.state = BackendState.RETIRED
            backend.changed.set()
            if backend.in_flight:
                self.retired.append(backend)
        self.config = config
        self.backends = backends
        self.start_probes()
        self._wake_all()

    # ----------------------------------------------------------------- routing

    async def acquire(self, tried: set[Backend], deadline: float,
                      key: int | None = None) -> Backend:
        """A slot on the best untried backend for the request's prefix `key` (None: by
        load alone), waiting up to `max_queue_wait_s` for one.

        Raises 429 when every candidate stays full, and 503 (or 429 when all are throttled)
        when no untried backend can take traffic at all.
        """
        self.start_probes()
        queue_deadline = min(deadline, self.clock() + self.config.max_queue_wait_s)
        while True:
            now = self.clock()
            candidates = [b for b in self.backends if b not in tried and b.routable(now)]
            if not candidates:
                raise self._unavailable(tried, now)
            backend = self._pick(candidates, key, now)
            if backend is not None:
                backend.in_flight += 1
                return backend
            if now >= queue_deadline:
                raise GatewayError(
                    "Every upstream backend is at its in-flight limit; retry shortly.", 429,
                    code="upstream_saturated", headers={"Retry-After": "1"},
                )
            await self._wait(min(queue_deadline - now, _WAIT_SLICE_S))

    def release(self, backend: Backend) -> None:
        backend.in_flight -= 1
        if backend.state is BackendState.RETIRED and backend.in_flight == 0:
            with contextlib.suppress(ValueError):
                self.retired.remove(backend)
        self._wake_one()

    def _pick(self, candidates: list[Backend], key: int | None, now: float) -> Backend | None:
        """The policy's backend among the candidates with a free slot; None when all are full."""
        free = [backend for backend in candidates if backend.has_slot]
        routing = self.config.routing
        if key is None or routing.policy != "prefix_affinity":
            return least_loaded(free, self._rng) if free else None
        fleet = [backend for backend in self.backends if backend.routable(now)]
        chosen, first = by_affinity(key, candidates, fleet, routing.load_bound,
                                    lambda backend: backend.has_slot)
        if chosen is None and free:
            chosen = least_loaded(free, self._rng)
        if chosen is not None:
            _count_route(chosen, first)
        return chosen

    def _unavailable(self, tried: set[Backend], now: float) -> GatewayError:
        untried = [backend for backend in self.backends if backend not in tried]
        throttled = [b for b in untried if b.state is BackendState.HEALTHY]
        if throttled:
            wait = min(backend.throttled_until for backend in throttled) - now
            return GatewayError(
                "Every upstream backend is rate limiting; retry after the delay.", 429,
                code="upstream_rate_limited",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        cooling = [b.ejected_until - now for b in untried if b.state is BackendState.EJECTED]
        wait = max(1, math.ceil(min(cooling))) if cooling else 1
        return GatewayError(
            "No upstream backend is healthy; retry shortly.", 503,
            code="no_healthy_upstream", headers={"Retry-After": str(wait)},
        )

    async def _wait(self, timeout: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # ----------------------------------------------------------------- outcomes

    def succeeded(self, backend: Backend) -> None:
        backend.succeeded()

    def failed(self, backend: Backend, reason: str) -> None:
        backend.failed(reason, self.clock())

    def throttled(self, backend: Backend, retry_after_s: float) -> None:
        backend.throttle(min(retry_after_s, self.config.retry.max_retry_after_s), self.clock())

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [backend.status(now) for backend in self.backends + self.retired]

    # ----------------------------------------------------------------- readiness

    async def ready(self) -> bool:
        """Whether a backend has answered and is healthy: the gateway's readiness.

        While none has, a check probes the backends that have not answered at once, at
        most every `probe_interval_s` (checks in between share the last round), so
        readiness follows a starting fleet within seconds and no caller's checks reach
        the upstream faster than the probes do."""
        if self._has_answered():
            return True
        now = self.clock()
        if self._readiness_probes is None or (
                self._readiness_probes.done() and now >= self._next_readiness_probes):
            self._next_readiness_probes = now + self.config.health.probe_interval_s
            self._readiness_probes = asyncio.get_running_loop().create_task(
                self._probe_unanswered(), name="readiness probes")
        # Not cancelled with this caller: later checks read the round's outcome.
        await asyncio.wait({self._readiness_probes})
        return self._has_answered()

    def _has_answered(self) -> bool:
        return any(backend.answered and backend.state is BackendState.HEALTHY
                   for backend in self.backends)

    async def _probe_unanswered(self) -> None:
        backends = [backend for backend in self.backends if not backend.answered]
        outcomes = await asyncio.gather(*(self._probe(backend) for backend in backends))
        for backend, (ok, reason) in zip(backends, outcomes, strict=True):
            if backend.state is not BackendState.RETIRED and backend.probed(
                    ok, reason, self.clock()):
                self._wake_all()

    # ----------------------------------------------------------------- health probes

    def start_probes(self) -> None:
        """One prober task per backend; idempotent, and it stops those of removed ones."""
        if self._closed:
            return
        if self._gauges is None:
            self._gauges = asyncio.get_running_loop().create_task(
                self._publish_gauges(), name="fleet gauges")
        for backend, task in list(self._probes.items()):
            if backend.state is BackendState.RETIRED:
                task.cancel()
                del self._probes[backend]
        for backend in self.backends:
            if backend not in self._probes:
                self._probes[backend] = asyncio.get_running_loop().create_task(
                    self._watch(backend), name=f"probe {backend.config.url}")

    async def close(self) -> None:
        # Probers also stop at their next turn: Python 3.11's `wait_for` drops a
        # cancellation that arrives as its inner wait ends (an ejection sets `changed`).
        self._closed = True
        tasks = [*self._probes.values(),
                 *(task for task in (self._gauges, self._readiness_probes) if task)]
        self._probes.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._wake_all()

    async def _publish_gauges(self) -> None:
        """Every backend's gauges, set again while the fleet runs (retired ones until
        they drain, after which their series fade from the scrape)."""
        while not self._closed:
            for backend in self.backends + self.retired:
                backend.publish()
            await asyncio.sleep(GAUGE_REFRESH_S)

    async def _watch(self, backend: Backend) -> None:
        """Probe every interval; an ejected backend right when its cooldown ends."""
        next_probe = self.clock() + backend.health.probe_interval_s
        while backend.state is not BackendState.RETIRED and not self._closed:
            now = self.clock()
            due = backend.ejected_until if backend.state is BackendState.EJECTED else next_probe
            if now < due:
                backend.changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(backend.changed.wait(), due - now)
                continue
            if backend.state is BackendState.EJECTED:
                backend.state = BackendState.HALF_OPEN
            ok, reason = await self._probe(backend)
            next_probe = self.clock() + backend.health.probe_interval_s
            if backend.state is not BackendState.RETIRED and backend.probed(
                    ok, reason, self.clock()):
                self._wake_all()

    async def _probe(self, backend: Backend) -> tuple[bool, str]:
        timeout = backend.health.probe_timeout_s
        try:
            response = await self.client.get(
                backend.config.probe_url, headers=backend.headers, timeout=timeout)
        except httpx.TimeoutException:
            return False, "probe timed out"
        except httpx.HTTPError as exc:
            return False, f"probe failed ({type(exc).__name__})"
        if response.is_success:
            return True, ""
        return False, f"probe answered HTTP {response.status_code}"
