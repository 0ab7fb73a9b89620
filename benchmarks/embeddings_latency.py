"""Latency of `/v1/embeddings` through the gateway, with an in-process baseline.

Run against `serve run serve_config.yaml` (the demo encoder is served as
`serve-app-demo-embed`):

    python benchmarks/embeddings_latency.py --requests 30

Gateway: the OpenAI SDK's request (base64) -> gateway (tokenize, pack, batched Encoder
replica) -> vectors. Baseline, measured in the same run: `SentenceTransformer.encode` of
the same texts in this process on the same checkpoint, i.e. the model work without any
serving. The difference is what serving adds. Prints medians and p90s for one short input
and for a batch of 100 mixed-length inputs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from openai import OpenAI

from serve_app import envs
from serve_app.demo.encoder import ensure_demo_encoder

MODEL = "serve-app-demo-embed"
WORDS = "france is a country in western europe its capital is paris".split()


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


def report(name: str, samples: list[float]) -> None:
    print(f"{name:<34} median {statistics.median(samples):7.1f} ms   "
          f"p90 {percentile(samples, 0.9):7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    path: Path = ensure_demo_encoder(envs.cache_dir())
    reference = SentenceTransformer(str(path), device="cpu")
    client = OpenAI(base_url=args.url, api_key="EMPTY", max_retries=0)
    one = ["What is the capital of France?"]
    hundred = [" ".join(WORDS[: 1 + (i * 7) % len(WORDS)]) * (1 + i % 5) for i in range(100)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    for label, texts in (("1 input", one), ("100 mixed inputs", hundred)):
        report(f"gateway, {label}", timed(
            lambda texts=texts: client.embeddings.create(model=MODEL, input=texts),
            args.requests))
        report(f"baseline (in-process ST), {label}", timed(
            lambda texts=texts: reference.encode(texts), args.requests))


if __name__ == "__main__":
    main()
