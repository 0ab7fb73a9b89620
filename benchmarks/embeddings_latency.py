"""Latency of `/v1/embeddings` through the gateway, with an in-process baseline, and a
small request's latency beside max-size ones.

Run against `serve run serve_config.yaml` (the demo encoder is served as
`serve-app-demo-embed`):

    python benchmarks/embeddings_latency.py --requests 30 [--out DIR]

Gateway: the OpenAI SDK's request (base64) -> gateway (tokenize, pack, batched Encoder
replica) -> vectors. Baseline, measured in the same run: `SentenceTransformer.encode` of
the same texts in this process on the same checkpoint, i.e. the model work without any
serving. The difference is what serving adds. Prints medians and p90s for one short input
and for a batch of 100 mixed-length inputs.

Beside max-size requests: a client sends requests of `limits.max_items` (2,048) inputs of
640 characters one after another while another times one-word requests; the table gives
the one-word request's latency alone and meanwhile, the max-size requests' own latency,
and every answer's status (a 429 there is a request within the limits refused). With
`--out DIR`, writes `embeddings_latency.md` there (and prints it).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
from openai import OpenAI

from serve_app import envs
from serve_app.demo.encoder import ensure_demo_encoder

MODEL = "serve-app-demo-embed"
WORDS = "france is a country in western europe its capital is paris".split()
MAX_ITEMS = 2048
LARGE = [f"{i} " + ("paris tokyo rome " * 38)[: 640 - len(f"{i} ")] for i in range(MAX_ITEMS)]
"""A max-size request: 2,048 inputs of 640 characters, each within the demo encoder's
128 tokens."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(call: Callable[[], object], runs: int) -> list[float]:
    call()  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def report(name: str, samples: list[float]) -> str:
    line = (f"{name:<34} median {statistics.median(samples):7.1f} ms   "
            f"p90 {percentile(samples, 0.9):7.1f} ms")
    print(line)
    return line


def post(client: httpx.Client, texts: list[str]) -> tuple[int, float]:
    """One request's status and milliseconds (no retries: a 429 counts as one)."""
    start = time.perf_counter()
    status = client.post("/v1/embeddings", json={"model": MODEL, "input": texts}).status_code
    return status, (time.perf_counter() - start) * 1000


def beside_max_size(url: str, requests: int, large_requests: int) -> list[str]:
    """The one-word request alone, then while max-size requests run back to back."""
    statuses: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=600) as client:
        post(client, ["paris"])  # warm-up
        alone = []
        for _ in range(requests):
            status, ms = post(client, ["paris"])
            statuses[f"small {status}"] += 1
            alone.append(ms)
        large: list[float] = []
        large_statuses: list[int] = []  # this thread's own: the other counts in `statuses`
        done = threading.Event()

        def send_large() -> None:
            with httpx.Client(base_url=url, timeout=600) as own:
                for _ in range(large_requests):
                    status, ms = post(own, LARGE)
                    large_statuses.append(status)
                    large.append(ms)
            done.set()

        sender = threading.Thread(target=send_large)
        sender.start()
        time.sleep(0.5)  # the first max-size request is in the gateway
        beside = []
        while not done.is_set():
            status, ms = post(client, ["paris"])
            statuses[f"small {status}"] += 1
            beside.append(ms)
            time.sleep(0.05)
        sender.join()
    statuses.update(f"max-size {status}" for status in large_statuses)
    rows = ["| request | count | median ms | p90 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name, samples in (("one word, alone", alone),
                          ("one word, beside max-size requests", beside),
                          ("max-size: 2,048 inputs of 640 chars", large)):
        if samples:
            rows.append(f"| {name} | {len(samples)} | {statistics.median(samples):.0f} | "
                        f"{percentile(samples, 0.9):.0f} | {max(samples):.0f} |")
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
    rows += ["", f"Statuses (latencies above include the refused requests): {counts}"]
    print("\n".join(rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--large-requests", type=int, default=5,
                        help="max-size requests sent back to back beside the small ones")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    path: Path = ensure_demo_encoder(envs.cache_dir())
    reference = SentenceTransformer(str(path), device="cpu")
    client = OpenAI(base_url=args.url, api_key="EMPTY", max_retries=0)
    one = ["What is the capital of France?"]
    hundred = [" ".join(WORDS[: 1 + (i * 7) % len(WORDS)]) * (1 + i % 5) for i in range(100)]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    print(f"machine: {machine}")
    lines = []
    for label, texts in (("1 input", one), ("100 mixed inputs", hundred)):
        lines.append(report(f"gateway, {label}", timed(
            lambda texts=texts: client.embeddings.create(model=MODEL, input=texts),
            args.requests)))
        lines.append(report(f"baseline (in-process ST), {label}", timed(
            lambda texts=texts: reference.encode(texts), args.requests)))
    base = args.url.removesuffix("/v1")
    rows = beside_max_size(base, args.requests, args.large_requests)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        text = ["# Embeddings latency", "",
                f"Machine: {machine}. Command: `python benchmarks/embeddings_latency.py "
                f"--requests {args.requests} --large-requests {args.large_requests}` against "
                "`serve run serve_config.yaml`.", "", "```", *lines, "```", "", *rows]
        (args.out / "embeddings_latency.md").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
