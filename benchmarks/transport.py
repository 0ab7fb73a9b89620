"""Transport between replicas: by value (Serve's gRPC channel) against by reference (Ray's
object store), as two gateway applications in one Serve instance, measured in alternating
rounds so both see the same machine.

    pip install -e '.[bench]' && python benchmarks/transport.py
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 python benchmarks/transport.py   # Serve's fast mode

The two applications differ only in `transport.by_value_max_bytes`: the largest allowed
(every prompt below takes gRPC) and 0 (every prompt takes the object store). Same sink,
checkpoint and load generator as `end_to_end.py`. Writes `transport.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import free_port, gateway_app, load, start_serve, start_server  # noqa: E402
from llama8b_sized import HIDDEN, ensure_llama8b_sized  # noqa: E402

from serve_app import envs  # noqa: E402
from serve_app.config import GRPC_PAYLOAD_LIMIT  # noqa: E402

HERE = Path(__file__).resolve().parent
TRANSPORTS = {"by value": GRPC_PAYLOAD_LIMIT, "by reference": 0}


def deploy(model_dir: Path, sink: str, port: int) -> dict[str, str]:
    """One gateway application per transport; their URLs by transport."""
    from ray import serve

    start_serve(port)
    urls = {}
    for index, (name, limit) in enumerate(TRANSPORTS.items()):
        serve.run(gateway_app(model_dir, sink, limit), name=f"gateway-{index}",
                  route_prefix=f"/t{index}")
        urls[name] = f"http://127.0.0.1:{port}/t{index}/v1"
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    row_bytes = HIDDEN * 2 * 4 // 3
    too_long = [t for t in args.tokens if t * row_bytes > GRPC_PAYLOAD_LIMIT]
    if too_long:
        parser.error(f"prompts of {too_long} tokens exceed what may go by value")

    model_dir = ensure_llama8b_sized(envs.cache_dir() / "bench-llama8b-sized")
    sink, sink_url = start_server("sink")
    try:
        urls = deploy(model_dir, sink_url, free_port())
        lines = [
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.system()}. "
            f"Hidden {HIDDEN}, bf16. RAY_SERVE_THROUGHPUT_OPTIMIZED="
            f"{os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED', '0')}. Medians of "
            f"{args.rounds} alternating rounds of {args.requests} requests.",
            "",
            "| prompt tokens | concurrency | transport | req/s | p50 ms "
            "| by value / by reference |",
            "|---:|---:|---|---:|---:|---:|",
        ]
        for tokens in args.tokens:
            for concurrency in args.concurrency:
                rps: dict[str, list[float]] = {name: [] for name in urls}
                p50: dict[str, list[float]] = {name: [] for name in urls}
                for _ in range(args.rounds):
                    for name, url in urls.items():
                        seconds, latencies = asyncio.run(
                            load(url, tokens, concurrency, args.requests))
                        rps[name].append(args.requests / seconds)
                        p50[name].append(statistics.median(latencies) * 1e3)
                value, reference = (statistics.median(rps[n]) for n in TRANSPORTS)
                for name in TRANSPORTS:
                    ratio = f"{value / reference:.2f}x req/s" if name == "by value" else ""
                    line = (f"| {tokens} | {concurrency} | {name} | "
                            f"{statistics.median(rps[name]):.2f} | "
                            f"{statistics.median(p50[name]):.1f} | {ratio} |")
                    print(line, flush=True)
                    lines.append(line)
        text = "\n".join(lines) + "\n"
        (args.out / "transport.md").write_text(text)
        print(text)
    finally:
        sink.kill()
        from ray import serve

        serve.shutdown()


if __name__ == "__main__":
    main()
