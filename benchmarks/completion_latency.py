"""End-to-end latency of one short completion through the gateway, with its baseline.

Run against `serve run serve_config.yaml` (gateway at /, reference upstream at /reference):

    python benchmarks/completion_latency.py --requests 50

Gateway: text prompt -> gateway (tokenize, batched embed, dispatch) -> reference upstream.
Baseline: the seed pattern measured in the same run, i.e. the client computes the prompt
embeddings itself (tokenizer -> get_input_embeddings -> torch.save -> base64) and posts
them straight to the reference upstream. Both generate the same tokens from the same
embeddings, so the difference is what the gateway adds. Prints medians and p90s.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time

import httpx
import pybase64
import torch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(client: httpx.Client, url: str, body: dict, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        response = client.post(url, json=body)
        samples.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt", default="Tell me about France")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_app import envs
    from serve_app.demo.model import ensure_demo_model

    model_dir = ensure_demo_model(envs.cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    with httpx.Client(timeout=60) as client:
        model = client.get(f"{args.base_url}/v1/models").json()["data"][0]["id"]
        sampling = {"model": model, "max_tokens": args.max_tokens, "temperature": 0}
        gateway_body = {**sampling, "prompt": args.prompt}

        def seed_pattern_body() -> dict:
            ids = torch.tensor(tokenizer(args.prompt).input_ids)
            with torch.no_grad():
                embeds = lm.get_input_embeddings()(ids)
            buffer = io.BytesIO()
            torch.save(embeds, buffer)
            return {**sampling, "prompt_embeds": pybase64.b64encode(buffer.getvalue()).decode()}

        gateway_url = f"{args.base_url}/v1/completions"
        direct_url = f"{args.base_url}/reference/v1/completions"
        timed(client, gateway_url, gateway_body, 5)  # warm-up
        timed(client, direct_url, seed_pattern_body(), 5)
        gateway, baseline = [], []
        for _ in range(args.requests):  # interleaved so both see the same machine state
            gateway += timed(client, gateway_url, gateway_body, 1)
            start = time.perf_counter()
            body = seed_pattern_body()
            encode_ms = (time.perf_counter() - start) * 1000
            baseline += [encode_ms + t for t in timed(client, direct_url, body, 1)]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"prompt: {len(tokenizer(args.prompt).input_ids)} tokens, "
          f"max_tokens {args.max_tokens}, {args.requests} requests each, sequential")
    for name, samples in (("gateway (text prompt)", gateway),
                          ("baseline (client embeds, direct)", baseline)):
        print(f"{name:34s} median {statistics.median(samples):7.1f} ms"
              f"   p90 {percentile(samples, 0.9):7.1f} ms")
    overhead = statistics.median(gateway) - statistics.median(baseline)
    print(f"gateway overhead (median difference): {overhead:.1f} ms")


if __name__ == "__main__":
    main()
