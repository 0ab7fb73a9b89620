"""Which processes serve a benchmark's target, by role, what CPU they spend, and where
(py-spy profiles of each, summarized to their hottest functions).

The gateway's processes are every descendant of the driver that started its Ray (GCS, raylet,
Ray's agents, Serve's controller and proxy, HAProxy, the replicas) except the ones the
benchmark started itself (sink, baseline, load generator).
"""

from __future__ import annotations

import collections
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

# Role by a needle in the command line (replica actors are named by their deployment), or by
# the executable's name; the first match wins.
_ROLES = (
    ("ingress", "ServeReplica:gateway:Gateway"),
    ("embedder", "ServeReplica:gateway:Embedder"),
    ("dispatcher", "ServeReplica:gateway:Dispatcher"),
    ("noop", "ServeReplica:noop"),
    ("proxy", "ProxyActor"),
    ("controller", "ServeController"),
    ("haproxy", "haproxy"),
    ("raylet", "raylet"),
    ("gcs", "gcs_server"),
)
# Counted as the gateway's, but summed as one column.
_OTHER = "ray other"


def role_of(process: psutil.Process) -> str:
    try:
        line = " ".join(process.cmdline())
        name = process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return _OTHER
    for role, needle in _ROLES:
        if needle in line or name == needle:
            return role
    return _OTHER


def tree(root: int, exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """`root`'s descendants, without the excluded processes and their own descendants."""
    excluded = set(exclude)
    found: list[psutil.Process] = []
    stack = [psutil.Process(root)]
    while stack:
        process = stack.pop()
        try:
            children = process.children()
        except psutil.NoSuchProcess:
            continue
        for child in children:
            if child.pid not in excluded:
                found.append(child)
                stack.append(child)
    return found


def by_role(processes: Iterable[psutil.Process]) -> dict[str, list[psutil.Process]]:
    roles: dict[str, list[psutil.Process]] = collections.defaultdict(list)
    for process in processes:
        roles[role_of(process)].append(process)
    return dict(roles)


def cpu_seconds(processes: Iterable[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


class CpuMeter:
    """CPU seconds each role spent between `__init__` and `stop`. The process set is read at
    both ends: a replica that starts in between counts from zero."""

    def __init__(self, processes: dict[str, list[psutil.Process]]) -> None:
        self.processes = processes
        self.start = {process.pid: cpu_seconds([process])
                      for group in processes.values() for process in group}

    def stop(self) -> dict[str, float]:
        """A process that exited in between (HAProxy reloads) counts nothing: what it spent
        after the start is gone with it."""
        return {role: sum(max(0.0, cpu_seconds([p]) - self.start.get(p.pid, 0.0))
                          for p in group if p.is_running())
                for role, group in self.processes.items()}


def py_spy() -> str | None:
    return shutil.which("py-spy")


PROFILE_RATE = 100  # samples per second


def start_profiles(roles: dict[str, list[psutil.Process]], seconds: float,
                   out: Path, label: str) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
    """One `py-spy record --gil` per Python process of the gateway (not HAProxy or Ray's
    C++ daemons), writing collapsed stacks: only the thread holding the GIL is sampled, so
    the samples are the process's Python (and the C it calls with the GIL held), and their
    count over `seconds` x the rate is the share of time the GIL was busy."""
    binary = py_spy()
    if binary is None:
        return []
    started = []
    for role, group in roles.items():
        if role in ("haproxy", "raylet", "gcs", "noop", _OTHER):
            continue
        for process in group:
            path = out / f"{label}-{role}-{process.pid}.txt"
            command = [binary, "record", "--format", "raw", "--gil", "--nonblocking",
                       "--rate", str(PROFILE_RATE), "-d", str(int(seconds)),
                       "-p", str(process.pid), "-o", str(path)]
            started.append((role, subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL), path))
    return started


# Leaf frames of a thread that py-spy samples but that spends no CPU: Ray's main thread
# waiting in C++, and an event loop thread polling in C with no Python frame above it.
_WAITING = ("Worker.main_loop", "Thread.run")


@dataclass
class ProfileSummary:
    busy: float  # share of the profiled time in which the GIL was held
    own: list[tuple[str, float]]  # hottest functions by their own time, share of busy samples
    inclusive: list[tuple[str, float]]  # by time including callees, without the roots


def summarize_profile(path: Path, seconds: float, top: int = 10) -> ProfileSummary:
    """The hottest functions of one collapsed-stack file, among the samples that were busy."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = busy = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        if frames[-1].split(" (")[0] in _WAITING:
            continue
        busy += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not busy:
        return ProfileSummary(0.0, [], [])
    # Frames under nearly every busy sample (thread and event-loop roots) say nothing.
    below_roots = [(frame, n / busy) for frame, n in inclusive.most_common()
                   if n / busy < 0.9][:top]
    hottest = [(frame, n / busy) for frame, n in own.most_common(top)]
    return ProfileSummary(busy / (seconds * PROFILE_RATE), hottest, below_roots)


def _short(frame: str) -> str:
    """`function (path/to/module.py:line)` -> `function (module.py)`."""
    function, _, where = frame.partition(" (")
    module = where.rstrip(")").rsplit("/", 1)[-1].split(":")[0]
    return f"{function} ({module})" if module else function
