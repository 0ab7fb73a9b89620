"""The routing policies: which of the free backends a request takes.

`least_loaded`: power of two choices, two distinct backends drawn by weight, the one with
less in flight per unit of weight wins.

`prefix_affinity`: weighted rendezvous hashing on the request's prefix key
(`prompts.prefix`). Every backend gets a score from (key, url); the key's backends in
score order are its choices, and the same on every Dispatcher replica, with no shared
state. A backend that leaves rotation (ejected, throttled, retired, already tried) passes
its keys to their next choices and gets them back when it returns; adding or removing a
backend moves only the keys it wins or held. Loads are bounded: a backend with more than
ceil((1 + ε) x the fleet's mean in-flight per unit of weight x its weight) yields to the
key's next choice, so a hot prefix spreads instead of overloading one server.

Functions here are pure over anything shaped like a backend, so the simulation in
benchmarks/prefix_routing.py runs the very code the Fleet runs.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar


class _Settings(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def weight(self) -> float: ...


class Routable(Protocol):
    @property
    def config(self) -> _Settings: ...

    @property
    def in_flight(self) -> int: ...


B = TypeVar("B", bound=Routable)

_UNIT = float(1 << 64)


def load(backend: Routable) -> float:
    """In-flight per unit of weight; equal loads (an idle fleet) split by weight."""
    return backend.in_flight / backend.config.weight


def least_loaded(free: Sequence[B], rng: random.Random) -> B:
    """Power of two choices: two distinct backends drawn by weight, the less loaded wins."""
    if len(free) == 1:
        return free[0]
    first = rng.choices(free, weights=[b.config.weight for b in free])[0]
    rest = [backend for backend in free if backend is not first]
    second = rng.choices(rest, weights=[b.config.weight for b in rest])[0]
    return second if load(second) < load(first) else first


def rendezvous_order(key: int, backends: Sequence[B]) -> list[B]:
    """The key's backends, best first, by weighted rendezvous score -weight / ln(u)."""
    return sorted(backends, key=lambda backend: _score(key, backend), reverse=True)


def _score(key: int, backend: Routable) -> float:
    digest = hashlib.blake2b(key.to_bytes(8, "little") + backend.config.url.encode(),
                             digest_size=8).digest()
    unit = (int.from_bytes(digest, "little") + 0.5) / _UNIT  # in (0, 1)
    return -backend.config.weight / math.log(unit)


def capacity(backend: Routable, in_flight: int, weight: float, bound: float) -> int:
    """Most requests `backend` may hold once one more arrives, under bounded loads, in a
    fleet holding `in_flight` requests over a total `weight`."""
    return math.ceil((1 + bound) * (in_flight + 1) / weight * backend.config.weight)


def by_affinity(key: int, candidates: Sequence[B], fleet: Sequence[Routable],
                bound: float, has_slot: Callable[[B], bool]) -> tuple[B | None, B]:
    """The key's first candidate with a free slot within its bounded load (None when there
    is none: the caller then routes by load), and the key's first choice.

    `candidates` are the backends that may take traffic now (routable, untried); `fleet`
    the routable backends, whose in-flight requests set the mean."""
    in_flight = sum(backend.in_flight for backend in fleet)
    weight = sum(backend.config.weight for backend in fleet)
    order = rendezvous_order(key, candidates)
    for backend in order:
        if has_slot(backend) and backend.in_flight + 1 <= capacity(
                backend, in_flight, weight, bound):
            return backend, order[0]
    return None, order[0]
