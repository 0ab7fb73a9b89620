"""End to end: the gateway against the seed-pattern baseline, both in front of the same
sink upstream, on a Llama-3.1-8B-sized checkpoint, with equal cores, measured in one run.

    pip install -e '.[bench]' && python benchmarks/end_to_end.py                 # many cores
    pip install -e '.[bench]' && python benchmarks/end_to_end.py --preset two-core

The host's cores are split three ways (`--serving-cores`, the rest shared out): the gateway
and the baseline each run confined to the same serving cores (measured in turn), the sink on
its own, and the load generator (`load.py`: several processes started together) on its own,
its CPU reported beside each row. The baseline is the seed pattern (`bench_servers.py`) with
one uvicorn worker per serving core; the sink decodes every payload as vLLM does.

Before them the floor runs on the serving cores (`floor.py`): the CPU per request of the
work no design can avoid (the rows' lookup and copy to the host, one encode into the JSON
body, one write to the sink), which every gateway row is divided by.

The gateway runs once per Serve mode (`--modes`): Serve's defaults, `throughput`
(RAY_SERVE_THROUGHPUT_OPTIMIZED=1) and `haproxy` (that plus RAY_SERVE_ENABLE_HA_PROXY=1),
each in a child process with a fresh Ray, replica counts from `--replicas`, and a no-op
three-deployment graph beside it (Ray's own floor). Its object store holds every
Dispatcher's payload budget. CPU per request counts every process of that Ray (replicas,
proxy or HAProxy, controller, raylet, GCS, agents); the sink's is reported beside it.
`--profile S` records S seconds of py-spy on every Python process of the gateway at the
highest concurrency of each prompt length and summarizes each flame graph's hottest
functions. The bench model's context is set to Llama-3.1-8B's (128k), so prompts of 8192
tokens and more fit (`--tokens 128 2048 8192`).

Writes `end_to_end.md`, `end_to_end.json` and `end_to_end.png` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama8b_sized import HIDDEN, VOCAB, ensure_llama8b_sized  # noqa: E402
from load import LoadResult, LoadSpec, run_load  # noqa: E402
from processes import (  # noqa: E402
    CpuMeter,
    by_role,
    start_profiles,
    summarize_profile,
    tree,
)

from serve_app import envs  # noqa: E402
from serve_app.config import UpstreamConfig  # noqa: E402

MODEL = "llama-3.1-8b-sized"
HERE = Path(__file__).resolve().parent
MODES = {
    "defaults": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
# Processes that serve no request themselves: their CPU is reported apart.
RAY_DAEMONS = frozenset({"controller", "raylet", "gcs", "ray other"})
# The upstream stand-in: measured beside every cell (on two cores it shares them), never
# counted as the client's.
SINK = "sink"
# The sink answers every request at once, so no backend slot is ever the limit here.
_SINK_SLOTS = 512
# A request waits this long for an upstream slot or payload room before a 429.
_QUEUE_WAIT_S = 120.0
# Llama-3.1-8B's context: the bench checkpoint's config says 8192 (one layer stands in for
# 32), which an 8192-token prompt and its answer token would not fit.
_CONTEXT = 131072


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(*argv: str, cores: tuple[int, ...] = (),
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    prefix = ["taskset", "-c", ",".join(map(str, cores))] if cores else []
    process = subprocess.Popen([*prefix, sys.executable, str(HERE / "bench_servers.py"), *argv,
                                "--port", str(port)], env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError(f"{argv[0]} did not start")


def start_serve(port: int, num_cpus: int, object_store_bytes: int) -> None:
    """A local Ray with Serve's proxy (or HAProxy) on `port`, its object store sized for the
    payloads the Dispatchers may hold (`upstream.payload_budget_bytes` each)."""
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=object_store_bytes)
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def object_store_bytes(layout: Layout) -> int:
    """Room for every Dispatcher's payload budget, and a quarter more for the rest."""
    budget = UpstreamConfig().payload_budget_bytes
    return int(layout.replicas.get("Dispatcher", 1) * budget * 1.25) + (1 << 30)


def gateway_config(model_dir: Path, sink: str) -> Any:
    """The default config but for the sink as the one backend, with slots to spare, and
    requests that wait for room rather than be refused: what is measured is throughput,
    the seed pattern queues every request too, and the load generator counts a refusal as
    a failed run."""
    from serve_app.config import AppConfig, BackendConfig, ModelConfig

    return AppConfig(
        model=ModelConfig(source=str(model_dir), served_name=MODEL, max_model_len=_CONTEXT),
        upstream=UpstreamConfig(backends=[BackendConfig(url=sink, max_in_flight=_SINK_SLOTS)],
                                max_queue_wait_s=_QUEUE_WAIT_S))


def gateway_app(model_dir: Path, sink: str, replicas: dict[str, int] | None = None) -> Any:
    """The gateway graph on the bench checkpoint, with the sink as its only backend and,
    where given, a fixed replica count per deployment instead of autoscaling."""
    from serve_app.deployments import gateway_graph

    overrides = {name: {"num_replicas": count} for name, count in (replicas or {}).items()}
    return gateway_graph(gateway_config(model_dir, sink), overrides)


def noop_graph() -> Any:
    """Ingress -> one deployment -> another, each doing nothing: Serve's own cost."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Last:
        def __call__(self, value: int) -> int:
            return value

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Middle:
        def __init__(self, last: Any) -> None:
            self.last = last

        async def __call__(self, value: int) -> int:
            result: int = await self.last.remote(value)
            return result

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Front:
        def __init__(self, middle: Any) -> None:
            self.middle = middle

        async def __call__(self, request: Request) -> dict[str, int]:
            return {"value": await self.middle.remote(1)}

    return Front.bind(Middle.bind(Last.bind()))


def resident_gib(pid: int) -> dict[str, float]:
    """Resident memory by kind (Linux): private heap, mapped files, shared memory."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 2**20
    return fields




@dataclass
class Cell:
    """One (target, mode, prompt length, concurrency) measurement."""

    target: str  # "gateway" or "baseline"
    mode: str  # the Serve mode, "" for the baseline
    tokens: int
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    load_cores: float  # cores the load generator kept busy
    cpu_by_role: dict[str, float] = field(default_factory=dict)  # CPU seconds per request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_ms(self) -> float:
        """CPU per request of the processes a request passes through (replicas, proxy or
        HAProxy; for the baseline, its workers)."""
        return sum(seconds for role, seconds in self.cpu_by_role.items()
                   if role not in RAY_DAEMONS and role != SINK) * 1e3

    @property
    def sink_ms(self) -> float:
        return self.cpu_by_role.get(SINK, 0.0) * 1e3

    @property
    def daemons_ms(self) -> float:
        """Ray's own daemons' CPU over the window, per request: mostly spent whether or not
        requests come, so it shrinks per request as throughput grows."""
        return sum(seconds for role, seconds in self.cpu_by_role.items()
                   if role in RAY_DAEMONS) * 1e3


@dataclass
class Layout:
    """Where each party runs, and how many of each."""

    serving: tuple[int, ...]  # gateway, then baseline, confined here; () = anywhere
    sink: tuple[int, ...]
    load: tuple[int, ...]
    sink_workers: int
    baseline_workers: int
    load_processes: int
    replicas: dict[str, int]


def sink_processes(pid: int) -> list[psutil.Process]:
    return [psutil.Process(pid), *tree(pid)]


def measure(target: str, mode: str, spec: LoadSpec,
            processes: dict[str, list[psutil.Process]]) -> Cell:
    meter = CpuMeter(processes)
    result: LoadResult = run_load(spec)
    spent = meter.stop()
    cell = Cell(target, mode, spec.tokens, spec.concurrency, result.requests, result.seconds,
                result.quantile(0.5), result.quantile(0.99), result.cores,
                {role: seconds / result.requests for role, seconds in spent.items()})
    print(f"{target:8} {mode:10} {spec.tokens:5} tokens c={spec.concurrency:3}: "
          f"{cell.rps:7.1f} req/s, p50 {cell.p50_ms:7.1f} ms, p99 {cell.p99_ms:7.1f} ms, "
          f"{cell.cpu_ms:6.1f} CPU ms/req (sink {cell.sink_ms:.1f}), "
          f"load {cell.load_cores:.2f} cores", flush=True)
    return cell


def noop_p50(base: str, requests: int = 200) -> float:
    with httpx.Client(timeout=30) as client:
        for _ in range(10):
            client.get(f"{base}/noop").raise_for_status()
        samples = []
        for _ in range(requests):
            start = time.perf_counter()
            client.get(f"{base}/noop").raise_for_status()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


# --------------------------------------------------------------------- one Serve mode


def gateway_run(args: argparse.Namespace, layout: Layout) -> None:
    """In a child process with the mode's variables set: a fresh Ray confined to the serving
    cores, the gateway and the no-op graph, every cell, and the results as JSON."""
    import ray
    from ray import serve

    if layout.serving:
        os.sched_setaffinity(0, layout.serving)
    port = free_port()
    start_serve(port, max(8, len(layout.serving)), object_store_bytes(layout))
    model_dir = ensure_llama8b_sized(envs.cache_dir() / "bench-llama8b-sized")
    serve.run(gateway_app(model_dir, args.sink_url, layout.replicas), name="gateway",
              route_prefix="/")
    serve.run(noop_graph(), name="noop", route_prefix="/noop")
    show_gpu_processes()
    url = f"http://127.0.0.1:{port}/v1"
    cells: list[Cell] = []
    profiles: dict[str, list[tuple[str, str]]] = {}
    try:
        for tokens in args.tokens:
            for concurrency in args.concurrency:
                roles = by_role(tree(os.getpid()))
                roles.pop("noop", None)
                roles[SINK] = sink_processes(args.sink_pid)
                profiled = (args.profile > 0 and concurrency == max(args.concurrency)
                            and args.gateway_run == args.profile_mode)
                seconds = max(args.seconds, args.profile + 3) if profiled else args.seconds
                label = f"{args.gateway_run}-{tokens}"
                spies = start_profiles(roles, args.profile, args.out, label) if profiled else []
                cells.append(measure("gateway", args.gateway_run, LoadSpec(
                    url, MODEL, tokens, concurrency, seconds, layout.load_processes,
                    layout.load), roles))
                for role, spy, path in spies:
                    spy.wait(timeout=args.profile + 30)
                    if path.exists():
                        profiles.setdefault(label, []).append((role, path.name))
        # Serve's own floor under load: the no-op graph's CPU per request at concurrency 16.
        noop_roles = {role: group for role, group in by_role(tree(os.getpid())).items()
                      if role in ("noop", "proxy", "haproxy")}
        cells.append(measure("noop", args.gateway_run, LoadSpec(
            f"http://127.0.0.1:{port}/noop", MODEL, 0, 16, args.seconds,
            layout.load_processes, layout.load), noop_roles))
        floor = noop_p50(f"http://127.0.0.1:{port}")
        embedder = resident_gib(next(p.pid for p in by_role(tree(os.getpid()))["embedder"]))
    finally:
        # Not serve.shutdown(): its graceful drain takes 30 s; this Ray ends with the process.
        ray.shutdown()
    Path(args.result_json).write_text(json.dumps({
        "cells": [asdict(cell) for cell in cells], "noop_p50_ms": floor,
        "embedder_memory_gib": embedder, "profiles": profiles}))


def show_gpu_processes() -> None:
    """Which processes hold the GPU (the Embedder replicas, where one is present)."""
    try:
        subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                        "--format=csv"], check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pass


def run_mode(mode: str, args: argparse.Namespace, sink_url: str,
             sink_pid: int) -> dict[str, Any]:
    result = args.out / f".end_to_end-{mode}.json"
    argv = [sys.executable, __file__, "--gateway-run", mode, "--sink-url", sink_url,
            "--sink-pid", str(sink_pid), "--result-json", str(result), *sys.argv[1:]]
    subprocess.run(argv, env={**os.environ, **MODES[mode]}, check=True, timeout=3600)
    data: dict[str, Any] = json.loads(result.read_text())
    result.unlink()
    data["cells"] = [Cell(**cell) for cell in data["cells"]]
    return data


# --------------------------------------------------------------------- the whole run


def parse_cores(text: str) -> tuple[int, ...]:
    """`0-7,12` -> (0, ..., 7, 12)."""
    cores: list[int] = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        cores.extend(range(int(low), int(high or low) + 1))
    return tuple(cores)


def layout_of(args: argparse.Namespace) -> Layout:
    """The preset's split of this host's cores, with any explicit flag taking precedence."""
    available = tuple(sorted(os.sched_getaffinity(0)))
    serving: tuple[int, ...] = ()
    sink: tuple[int, ...] = ()
    load: tuple[int, ...] = ()
    replicas = {"Gateway": 1, "Dispatcher": 1, "Embedder": 1}
    if args.preset == "many-core" or (args.preset == "auto" and len(available) >= 8):
        half, quarter = len(available) // 2, len(available) // 4
        serving, sink, load = (available[:half], available[half:half + quarter],
                               available[half + quarter:])
        replicas = {"Gateway": max(1, half // 3), "Dispatcher": max(1, half // 3),
                    "Embedder": 2}
    if args.serving_cores is not None:
        serving = parse_cores(args.serving_cores)
        rest = tuple(core for core in available if core not in serving)
        sink, load = rest[:len(rest) // 2], rest[len(rest) // 2:]
    for item in filter(None, (args.replicas or "").split(",")):
        name, _, count = item.partition("=")
        replicas[name] = int(count)
    return Layout(serving, sink, load, args.sink_workers or max(1, len(sink)),
                  args.baseline_workers or max(1, len(serving)),
                  args.load_processes or max(1, len(load)), replicas)


def run_floor(args: argparse.Namespace, layout: Layout, model_dir: Path,
              sink_url: str) -> dict[str, Any]:
    """`floor.py` on the serving cores, against the sink: CPU ms per request by length."""
    result = args.out / ".end_to_end-floor.json"
    prefix = ["taskset", "-c", ",".join(map(str, layout.serving))] if layout.serving else []
    subprocess.run([*prefix, sys.executable, str(HERE / "floor.py"), "--model", str(model_dir),
                    "--sink", sink_url, "--tokens", *map(str, args.tokens),
                    "--seconds", str(min(args.seconds, 3.0)), "--result-json", str(result)],
                   check=True, timeout=1200)
    data: dict[str, Any] = json.loads(result.read_text())
    result.unlink()
    for tokens, measured in data["tokens"].items():
        print(f"floor             {tokens:>5} tokens: {measured['cpu_ms']:6.1f} CPU ms/req "
              f"({data['device']})", flush=True)
    return data


def run_all(args: argparse.Namespace, layout: Layout) -> None:
    model_dir = ensure_llama8b_sized(envs.cache_dir() / "bench-llama8b-sized")
    sink, sink_url = start_server("sink", "--workers", str(layout.sink_workers),
                                  cores=layout.sink)
    try:
        floor = run_floor(args, layout, model_dir, sink_url)
    except BaseException:
        sink.kill()
        raise
    # One torch thread per worker when the workers fill the cores: a tuned seed pattern.
    threads = max(1, len(layout.serving or range(os.cpu_count() or 1))
                  // layout.baseline_workers)
    baseline, baseline_url = start_server(
        "baseline", "--model", str(model_dir), "--upstream", sink_url,
        "--workers", str(layout.baseline_workers), cores=layout.serving,
        env={"OMP_NUM_THREADS": str(threads)})
    try:
        baseline_processes = {"baseline": [psutil.Process(baseline.pid),
                                           *tree(baseline.pid)],
                              SINK: sink_processes(sink.pid)}
        cells = [measure("baseline", "", LoadSpec(baseline_url, MODEL, tokens, concurrency,
                                                  args.seconds, layout.load_processes,
                                                  layout.load), baseline_processes)
                 for tokens in args.tokens for concurrency in args.concurrency]
        baseline_memory = sum(resident_gib(p.pid)["VmRSS"]
                              for p in baseline_processes["baseline"])
        modes: dict[str, dict[str, Any]] = {}
        for mode in args.modes:
            modes[mode] = run_mode(mode, args, sink_url, sink.pid)
            cells.extend(modes[mode].pop("cells"))
            text = report(args, layout, cells, modes, baseline_memory, floor)  # after each
    finally:
        baseline.kill()
        sink.kill()
    print(text)


# --------------------------------------------------------------------- the report


def machine_line(args: argparse.Namespace, layout: Layout) -> str:
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass

    def cores(chosen: tuple[int, ...]) -> str:
        return f"cores {chosen[0]}-{chosen[-1]}" if chosen else "all cores"

    return (f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB{gpu}, {platform.system()}. "
            f"Model: vocab {VOCAB}, hidden {HIDDEN}, bf16 (random weights); max_tokens 1. "
            f"Gateway and baseline each on {cores(layout.serving)}; sink "
            f"({layout.sink_workers} workers) on {cores(layout.sink)}; load generator "
            f"({layout.load_processes} processes) on {cores(layout.load)}. Baseline: "
            f"{layout.baseline_workers} uvicorn workers. Gateway replicas: "
            + ", ".join(f"{name} {count}" for name, count in layout.replicas.items())
            + f". {args.seconds:g} s per cell. Command: `python benchmarks/end_to_end.py "
            + " ".join(sys.argv[1:]) + "`.")


def report(args: argparse.Namespace, layout: Layout, cells: list[Cell],
           modes: dict[str, dict[str, Any]], baseline_memory: float,
           floor: dict[str, Any]) -> str:
    base = {(c.tokens, c.concurrency): c for c in cells if c.target == "baseline"}
    floor_ms = {int(tokens): measured["cpu_ms"] for tokens, measured in floor["tokens"].items()}
    lines = [machine_line(args, layout), "",
             "| prompt tokens | concurrency | floor CPU ms/req | baseline req/s, CPU ms/req "
             "(sink's), p50 ms | "
             + " | ".join(f"{mode}: req/s (x baseline), CPU ms/req (x floor) + Ray daemons, "
                          "p50 ms" for mode in modes)
             + " | load generator cores |",
             "|---:|---:|---:|---:|" + "---:|" * len(modes) + "---:|"]
    for (tokens, concurrency), b in base.items():
        row = [f"{tokens}", f"{concurrency}", f"{floor_ms[tokens]:.1f}",
               f"{b.rps:.1f}, {b.cpu_ms:.0f} ({b.sink_ms:.0f}), {b.p50_ms:.1f}"]
        load = [f"{b.load_cores:.2f}"]
        for mode in modes:
            g = next(c for c in cells if c.target == "gateway" and c.mode == mode
                     and (c.tokens, c.concurrency) == (tokens, concurrency))
            row.append(f"{g.rps:.1f} ({g.rps / b.rps:.1f}x), {g.cpu_ms:.1f} "
                       f"({g.cpu_ms / floor_ms[tokens]:.1f}x) + {g.daemons_ms:.1f}, "
                       f"{g.p50_ms:.1f}")
            load.append(f"{g.load_cores:.2f}")
        lines.append("| " + " | ".join(row) + " | " + " / ".join(load) + " |")
    noop = {c.mode: c for c in cells if c.target == "noop"}
    lines += ["", f"Floor: one process on the gateway's cores ({floor['device']} lookup), one "
              "request at a time: the rows' lookup and copy to the host, one encode into "
              "the JSON body, one write to the sink (`benchmarks/floor.py`).",
              "", "No-op three-deployment graph (Serve's floor): "
              + "; ".join(f"{mode}: p50 at concurrency 1 {data['noop_p50_ms']:.1f} ms, "
                          f"{noop[mode].rps:.0f} req/s and {noop[mode].cpu_ms:.1f} CPU ms/req "
                          "at concurrency 16 (proxy or HAProxy and the three replicas)"
                          for mode, data in modes.items() if mode in noop)
              + f". Baseline resident memory, all workers: {baseline_memory:.1f} GiB."]
    for mode, data in modes.items():
        lines += role_table(mode, [c for c in cells
                                   if c.mode == mode and c.target == "gateway"])
        lines += profile_summary(args.out, data.get("profiles", {}), args.profile)
    lines += targets(cells, modes, floor_ms, args.many)
    text = "\n".join(lines) + "\n"
    (args.out / "end_to_end.md").write_text(text)
    (args.out / "end_to_end.json").write_text(json.dumps(
        {"cells": [asdict(c) for c in cells], "floor": floor,
         "noop_p50_ms": {m: d["noop_p50_ms"] for m, d in modes.items()}}, indent=1))
    plot(cells, list(modes), args.out / "end_to_end.png")
    return text


def role_table(mode: str, cells: list[Cell]) -> list[str]:
    """CPU per request by process for one mode: where the time goes."""
    seen = {role for cell in cells for role in cell.cpu_by_role} - {SINK}
    roles = sorted(seen - RAY_DAEMONS) + sorted(seen & RAY_DAEMONS)
    lines = ["", f"Gateway CPU ms per request by process, `{mode}` (the sink's beside it):",
             "", "| prompt tokens | concurrency | " + " | ".join(roles)
             + " | request path | Ray daemons | sink |",
             "|---:|---:|" + "---:|" * (len(roles) + 3)]
    for cell in cells:
        lines.append(f"| {cell.tokens} | {cell.concurrency} | " + " | ".join(
            f"{cell.cpu_by_role.get(role, 0.0) * 1e3:.1f}" for role in roles)
            + f" | {cell.cpu_ms:.1f} | {cell.daemons_ms:.1f} | {cell.sink_ms:.1f} |")
    return lines


def profile_summary(out: Path, profiles: dict[str, list[list[str]]],
                    seconds: float) -> list[str]:
    """Each profiled process's hottest functions, by own time and including callees."""
    lines = []
    for label, files in profiles.items():
        for role, name in files:
            summary = summarize_profile(out / name, seconds)
            lines += ["", f"py-spy --gil, `{label}` tokens, {role} (`{name}`): the GIL held "
                      f"{summary.busy:.0%} of the time. Own time: "
                      + "; ".join(f"{frame} {share:.0%}" for frame, share in summary.own)
                      + ". Including callees: "
                      + "; ".join(f"{frame} {share:.0%}" for frame, share in summary.inclusive)
                      + "."]
    return lines


# Issue 29's targets: (prompt tokens, times the baseline at concurrency 16), request-path
# CPU per request at concurrency 16 against the floor (times) and in ms.
_TARGETS = {
    "two-core": {"ratio": ((128, 1.5), (2048, 6.0)), "floor": ((2048, 2.0),), "cpu_ms": ()},
    "many-core": {"ratio": ((128, 1.3), (2048, 5.0), (8192, 5.0)), "floor": ((2048, 2.0),),
                  "cpu_ms": ((128, 9.0),)},
}


def targets(cells: list[Cell], modes: dict[str, dict[str, Any]], floor_ms: dict[int, float],
            many: bool) -> list[str]:
    """The performance targets of the preset, each checked in every mode."""
    goals = _TARGETS["many-core" if many else "two-core"]

    def find(target: str, mode: str, tokens: int, concurrency: int) -> Cell | None:
        return next((c for c in cells if (c.target, c.mode, c.tokens, c.concurrency)
                     == (target, mode, tokens, concurrency)), None)

    def check(mode: str) -> list[tuple[str, str, bool]]:
        mine = [c for c in cells if c.mode == mode and c.target == "gateway"]
        found: list[tuple[str, str, bool]] = []
        for tokens, goal in goals["ratio"]:
            gateway, baseline = find("gateway", mode, tokens, 16), find("baseline", "", tokens, 16)
            if gateway and baseline:
                ratio = gateway.rps / baseline.rps
                found.append((f"x baseline at {tokens} tokens, c=16 >= {goal:g}",
                              f"{ratio:.1f}x", ratio >= goal))
        for tokens, times in goals["floor"]:
            gateway = find("gateway", mode, tokens, 16)
            if gateway and tokens in floor_ms:
                ratio = gateway.cpu_ms / floor_ms[tokens]
                found.append((f"request-path CPU at {tokens} tokens, c=16 <= {times:g}x the "
                              "floor", f"{ratio:.1f}x", ratio <= times))
        for tokens, limit in goals["cpu_ms"]:
            gateway = find("gateway", mode, tokens, 16)
            if gateway:
                found.append((f"request-path CPU ms/req at {tokens} tokens, c=16 <= {limit:g}",
                              f"{gateway.cpu_ms:.1f}", gateway.cpu_ms <= limit))
        if many:
            top = max(c.concurrency for c in mine)
            for tokens in sorted({c.tokens for c in mine}):
                busiest = find("gateway", mode, tokens, top)
                if busiest:
                    share = busiest.rps / max(c.rps for c in mine if c.tokens == tokens)
                    found.append((f"c={top} >= 90% of the best concurrency, {tokens} tokens",
                                  f"{share:.0%}", share >= 0.9))
            single, seed = find("gateway", mode, 128, 1), find("baseline", "", 128, 1)
            if single and seed:
                found.append(("p50 at c=1, 128 tokens <= the baseline's",
                              f"{single.p50_ms:.1f} / {seed.p50_ms:.1f} ms",
                              single.p50_ms <= seed.p50_ms))
        return found

    checked = {mode: check(mode) for mode in modes}
    names = [name for name, _, _ in next(iter(checked.values()), [])]
    lines = ["", "| target | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for index, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(
            f"{value} {'met' if met else 'missed'}"
            for value, met in ((checked[m][index][1], checked[m][index][2]) for m in modes))
            + " |")
    return lines


def plot(cells: list[Cell], modes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({cell.tokens for cell in cells if cell.target != "noop"})
    figure, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.5), squeeze=False)
    series = [("baseline", "", "s--")] + [("gateway", mode, "o-") for mode in modes]
    for axis, tokens in zip(axes[0], lengths, strict=True):
        for target, mode, style in series:
            chosen = sorted((c for c in cells if c.target == target and c.mode == mode
                             and c.tokens == tokens), key=lambda c: c.concurrency)
            axis.plot([c.concurrency for c in chosen], [c.rps * tokens for c in chosen],
                      style, label=f"gateway, {mode}" if mode else target)
        axis.set_title(f"{tokens}-token prompts")
        axis.set_xlabel("concurrency")
        axis.set_ylabel("prompt tokens/s")
        axis.set_xscale("log", base=2)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["auto", "many-core", "two-core"], default="auto",
                        help="how the host's cores are shared out (auto: two-core below 8)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=None,
                        help="Serve modes to run the gateway in (default: all three on many "
                        "cores, `defaults` on two)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="default: 1 16 128 on many cores, 1 4 16 on two")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed window per cell")
    parser.add_argument("--serving-cores", help="e.g. 0-7: the gateway's and the baseline's")
    parser.add_argument("--sink-workers", type=int)
    parser.add_argument("--baseline-workers", type=int)
    parser.add_argument("--load-processes", type=int)
    parser.add_argument("--replicas", help="e.g. Gateway=4,Dispatcher=4,Embedder=2")
    parser.add_argument("--profile", type=float, default=0.0,
                        help="seconds of py-spy per gateway process at the top concurrency")
    parser.add_argument("--profile-mode", choices=list(MODES), default="haproxy",
                        help="the Serve mode whose processes are profiled")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--gateway-run", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--sink-url", help=argparse.SUPPRESS)
    parser.add_argument("--sink-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.many = args.preset == "many-core" or (args.preset == "auto"
                                               and len(os.sched_getaffinity(0)) >= 8)
    args.modes = args.modes or (list(MODES) if args.many else ["defaults"])
    args.concurrency = args.concurrency or ([1, 16, 128] if args.many else [1, 4, 16])
    args.out.mkdir(parents=True, exist_ok=True)
    layout = layout_of(args)
    if args.gateway_run:
        gateway_run(args, layout)
    else:
        run_all(args, layout)


if __name__ == "__main__":
    main()
