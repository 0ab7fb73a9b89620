"""End to end: the gateway against the seed-pattern baseline, both in front of the same
sink upstream, on a Llama-3.1-8B-sized checkpoint, measured in one run.

    pip install -e '.[bench]' && python benchmarks/end_to_end.py

Starts the sink and the baseline (`bench_servers.py`) as processes, the gateway on a local
Ray + Serve, and a no-op three-deployment Serve graph (Ray's own floor). An async load
generator sends OpenAI completions requests (text prompts of 128, 512 and 2048 tokens,
`max_tokens` 1) at each concurrency. Reports requests/s, prompt tokens/s, p50/p99 latency
and CPU seconds per request (the serving processes only, not the sink or the load
generator), the gateway/baseline ratios, the replicas' resident memory, and writes
`end_to_end.md` and `end_to_end.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama8b_sized import HIDDEN, VOCAB, ensure_llama8b_sized, prompt_of  # noqa: E402

from serve_app import envs  # noqa: E402
from serve_app.config import TransportConfig  # noqa: E402

MODEL = "llama-3.1-8b-sized"
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(*argv: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(HERE / "bench_servers.py"), *argv,
                                "--port", str(port)])
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError(f"{argv[0]} did not start")


def start_serve(port: int) -> None:
    """A local Ray with Serve's proxy on `port`."""
    import ray
    from ray import serve

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def gateway_app(model_dir: Path, sink: str, by_value_max_bytes: int) -> Any:
    """The gateway graph on the bench checkpoint, with the sink as its only backend."""
    from serve_app.config import AppConfig, BackendConfig, ModelConfig, UpstreamConfig
    from serve_app.deployments import build_app

    config = AppConfig(model=ModelConfig(source=str(model_dir), served_name=MODEL),
                       upstream=UpstreamConfig(backends=[BackendConfig(url=sink)]),
                       transport=TransportConfig(by_value_max_bytes=by_value_max_bytes))
    return build_app(config)


def deploy_gateway(model_dir: Path, sink: str, port: int, by_value_max_bytes: int) -> str:
    from ray import serve

    start_serve(port)
    serve.run(gateway_app(model_dir, sink, by_value_max_bytes), name="gateway",
              route_prefix="/")
    serve.run(noop_graph(), name="noop", route_prefix="/noop")
    return f"http://127.0.0.1:{port}/v1"


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


def serving_processes(target: str, baseline: subprocess.Popen[bytes]) -> list[psutil.Process]:
    if target == "baseline":
        return [psutil.Process(baseline.pid)]
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if "ServeReplica:gateway" in line or "ProxyActor" in line:
            found.append(process)
    return found


def process_roles(sink: subprocess.Popen[bytes]) -> dict[str, list[psutil.Process]]:
    """Every process that spends CPU on a gateway request, by role (an autoscaled
    deployment's replicas share one)."""
    roles = {"sink": [psutil.Process(sink.pid)]}
    for process in psutil.process_iter(["cmdline", "name"]):
        line = " ".join(process.info["cmdline"] or [])
        for role, needle in (("proxy", "ProxyActor"), ("controller", "ServeController"),
                             ("ingress", "ServeReplica:gateway:Gateway"),
                             ("embedder", "ServeReplica:gateway:Embedder"),
                             ("dispatcher", "ServeReplica:gateway:Dispatcher"),
                             ("raylet", "raylet"), ("gcs", "gcs_server")):
            if needle in line or process.info["name"] == needle:
                roles.setdefault(role, []).append(process)
                break
    return roles


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class Run:
    target: str
    tokens: int
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    cpu: float
    by_role: dict[str, float] | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


async def load(url: str, tokens: int, concurrency: int, requests: int) -> tuple[float, list[float]]:
    prompts = [prompt_of(tokens, index) for index in range(requests)]
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(
            max_connections=concurrency)) as client:
        async def one(prompt: str) -> None:
            start = time.perf_counter()
            response = await client.post(f"{url}/completions", json={
                "model": MODEL, "prompt": prompt, "max_tokens": 1})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

        queue = list(prompts)

        async def worker() -> None:
            while queue:
                await one(queue.pop())

        await one(prompts[0])  # warm-up, not counted
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def measure(target: str, url: str, tokens: int, concurrency: int, requests: int,
            processes: Callable[[], list[psutil.Process]],
            roles: Callable[[], dict[str, list[psutil.Process]]] | None = None) -> Run:
    watched = processes()
    before = cpu_seconds(watched)
    watched_roles = roles() if roles else {}
    roles_before = {role: cpu_seconds(ps) for role, ps in watched_roles.items()}
    seconds, latencies = asyncio.run(load(url, tokens, concurrency, requests))
    cpu = (cpu_seconds(watched) - before) / requests
    by_role = {role: (cpu_seconds(ps) - roles_before[role]) / requests
               for role, ps in watched_roles.items()}
    run = Run(target, tokens, concurrency, requests, seconds, latencies, cpu, by_role)
    print(f"{target:8} {tokens:5} tokens c={concurrency:2}: {run.rps:7.2f} req/s, "
          f"p50 {run.quantile(0.5):8.1f} ms, p99 {run.quantile(0.99):8.1f} ms, "
          f"{cpu:.3f} CPU s/req", flush=True)
    return run


def noop_p50(base: str, requests: int = 50) -> float:
    with httpx.Client(timeout=30) as client:
        client.get(f"{base}/noop")
        samples = []
        for _ in range(requests):
            start = time.perf_counter()
            client.get(f"{base}/noop").raise_for_status()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def resident_gib(pid: int) -> dict[str, float]:
    """Resident memory by kind (Linux): private heap, mapped files, shared memory."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 2**20
    return fields


def embedder_pid() -> int:
    for process in psutil.process_iter(["cmdline"]):
        if "ServeReplica:gateway:Embedder" in " ".join(process.info["cmdline"] or []):
            return process.pid
    raise LookupError("no embedder replica")


def report(runs: list[Run], floor_ms: float, embedder: dict[str, float],
           baseline: dict[str, float], by_value_max_bytes: int, out: Path) -> str:
    by_key = {(r.target, r.tokens, r.concurrency): r for r in runs}
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.system()}. Model: "
        f"vocab {VOCAB}, hidden {HIDDEN}, bf16 (random weights). max_tokens 1. Gateway "
        f"`transport.by_value_max_bytes`: {by_value_max_bytes:,} (a {HIDDEN}-wide bf16 row "
        f"is {HIDDEN * 2 * 4 // 3:,} bytes of base64). RAY_SERVE_THROUGHPUT_OPTIMIZED="
        f"{os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED', '0')}.",
        "",
        "| prompt tokens | concurrency | target | req/s | prompt tokens/s | p50 ms | p99 ms "
        "| CPU s/req | gateway / baseline |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        ratio = ""
        if run.target == "gateway":
            base = by_key[("baseline", run.tokens, run.concurrency)]
            ratio = f"{run.rps / base.rps:.1f}x throughput"
        lines.append(
            f"| {run.tokens} | {run.concurrency} | {run.target} | {run.rps:.2f} | "
            f"{run.rps * run.tokens:,.0f} | {run.quantile(0.5):.1f} | {run.quantile(0.99):.1f} "
            f"| {run.cpu:.3f} | {ratio} |")
    matrix_gib = VOCAB * HIDDEN * 2 / 2**30
    lines += [
        "",
        f"- No-op three-deployment Serve graph, p50 at concurrency 1: {floor_ms:.1f} ms.",
        f"- Embedder replica resident memory, after the whole grid: {embedder['VmRSS']:.2f} GiB"
        f" = private heap {embedder['RssAnon']:.2f} + mapped files {embedder['RssFile']:.2f} "
        f"(the embedding matrix, {matrix_gib:.2f} GiB, is mapped from the checkpoint) + shared "
        f"memory {embedder['RssShmem']:.2f} (pages of Ray's object store that the replica "
        f"wrote its results into; the store's, bounded by its size). Replica's own: "
        f"{embedder['RssAnon'] + embedder['RssFile']:.2f} GiB against the matrix + 1 GiB = "
        f"{matrix_gib + 1:.2f} GiB.",
        f"- Baseline process resident memory: {baseline['VmRSS']:.2f} GiB (the whole model).",
    ]
    lines += role_table(runs)
    text = "\n".join(lines) + "\n"
    (out / "end_to_end.md").write_text(text)
    plot(runs, out / "end_to_end.png")
    return text


def role_table(runs: list[Run]) -> list[str]:
    """CPU per request by process for the gateway runs: where the time goes."""
    chosen = [run for run in runs if run.target == "gateway" and run.by_role]
    if not chosen:
        return []
    roles = list(chosen[0].by_role or {})
    lines = ["", "Gateway CPU milliseconds per request, by process (the sink and Ray's daemons "
             "share the same cores):", "",
             "| prompt tokens | concurrency | " + " | ".join(roles) + " |",
             "|---:|---:|" + "---:|" * len(roles)]
    for run in chosen:
        by_role = run.by_role or {}
        lines.append(f"| {run.tokens} | {run.concurrency} | "
                     + " | ".join(f"{by_role[role] * 1e3:.1f}" for role in roles) + " |")
    return lines


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({run.tokens for run in runs})
    figure, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.5), squeeze=False)
    for axis, tokens in zip(axes[0], lengths, strict=True):
        for target, style in (("gateway", "o-"), ("baseline", "s--")):
            chosen = sorted((r for r in runs if r.target == target and r.tokens == tokens),
                            key=lambda r: r.concurrency)
            axis.plot([r.concurrency for r in chosen], [r.rps * tokens for r in chosen],
                      style, label=target)
        axis.set_title(f"{tokens}-token prompts")
        axis.set_xlabel("concurrency")
        axis.set_ylabel("prompt tokens/s")
        axis.set_xscale("log", base=2)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--by-value-max-bytes", type=int,
                        default=TransportConfig().by_value_max_bytes,
                        help="the gateway's transport.by_value_max_bytes (0: every request "
                        "by reference through the object store)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model_dir = ensure_llama8b_sized(envs.cache_dir() / "bench-llama8b-sized")
    sink, sink_url = start_server("sink")
    baseline, baseline_url = start_server("baseline", "--model", str(model_dir),
                                          "--upstream", sink_url)
    port = free_port()
    try:
        gateway_url = deploy_gateway(model_dir, sink_url, port, args.by_value_max_bytes)
        runs = []
        for tokens in args.tokens:
            for concurrency in args.concurrency:
                requests = max(args.requests, 2 * concurrency)
                for target, url in (("gateway", gateway_url), ("baseline", baseline_url)):
                    runs.append(measure(target, url, tokens, concurrency, requests,
                                        lambda t=target: serving_processes(t, baseline),
                                        (lambda: process_roles(sink))
                                        if target == "gateway" else None))
        text = report(runs, noop_p50(f"http://127.0.0.1:{port}"),
                      resident_gib(embedder_pid()), resident_gib(baseline.pid),
                      args.by_value_max_bytes, args.out)
        print(text)
    finally:
        baseline.kill()
        sink.kill()
        from ray import serve

        serve.shutdown()


if __name__ == "__main__":
    main()
