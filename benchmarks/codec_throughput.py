"""Payload codec throughput against memcpy of the same bytes (the floor), in one run.

    python benchmarks/codec_throughput.py [--hidden 4096] [--rows 128 512 2048] [--out DIR]

For a `(rows, hidden)` bf16 tensor (Llama-3.1-8B's hidden size by default) it times:
- memcpy: a copy of the tensor's bytes (numpy `copyto`), the machine's floor;
- payload path: tensor -> upstream-ready body buffers (`encode_prompt_embeds` +
  `build_upstream_body`: the bytes the Dispatcher hands to the socket);
- seed pattern: what the NIM and vLLM docs show: `torch.save` to a buffer, stdlib
  `base64.b64encode`, `json.dumps` of the body, `.encode()`;
- upstream decode: what vLLM does with each payload (pybase64 `validate=True` +
  `torch.load(weights_only=True)`);
- gateway safe decode: `decode_prompt_embeds` of a client payload (checks + fresh copy).

Rates are the tensor's bytes per second, so every row compares with memcpy directly.
Writes `codec_throughput.md` (and prints it).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pybase64
import torch

from serve_app.allocator import keep_payload_memory
from serve_app.prompts.codec import encode_prompt_embeds
from serve_app.prompts.untrusted import EmbedsSpec, decode_prompt_embeds
from serve_app.upstream.wire import build_upstream_body

FIELDS = {"model": "llama-3.1-8b-instruct", "max_tokens": 1}


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def seed_pattern_body(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    text = base64.b64encode(buffer.getvalue()).decode("utf-8")
    return json.dumps({**FIELDS, "prompt_embeds": text}).encode("utf-8")


def upstream_decode(text: bytes) -> torch.Tensor:
    raw = pybase64.b64decode(text, validate=True)
    loaded: torch.Tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    return loaded


def measure(rows: int, hidden: int, repeats: int) -> dict[str, float]:
    tensor = torch.randn(rows, hidden).to(torch.bfloat16)
    source = tensor.view(torch.uint8).numpy().reshape(-1)
    target = np.empty_like(source)
    encoded = encode_prompt_embeds(tensor)
    text = encoded.data
    spec = EmbedsSpec(hidden, rows, rows * hidden * 4, torch.bfloat16)
    cases: dict[str, Callable[[], object]] = {
        "memcpy": lambda: np.copyto(target, source),
        "payload path": lambda: build_upstream_body(
            FIELDS, [encode_prompt_embeds(tensor)], "vllm"),
        "seed pattern": lambda: seed_pattern_body(tensor),
        "upstream decode": lambda: upstream_decode(text),
        "gateway safe decode": lambda: decode_prompt_embeds(text, spec),
    }
    return {name: median_seconds(call, repeats) for name, call in cases.items()}


def table(results: dict[int, dict[str, float]], hidden: int, tuned: bool) -> str:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; "
        f"torch {torch.__version__}; bf16, hidden {hidden}; malloc thresholds "
        f"{'raised as in the replicas' if tuned else 'glibc defaults'}.",
        "",
        "| rows | MiB | path | median ms | GB/s | vs memcpy |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for rows, timings in results.items():
        size = rows * hidden * 2
        for name, seconds in timings.items():
            share = timings["memcpy"] / seconds
            lines.append(f"| {rows} | {size / 2**20:.0f} | {name} | {seconds * 1e3:.2f} | "
                         f"{size / seconds / 1e9:.2f} | {share:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rows", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's thresholds as they are (replicas raise them)")
    args = parser.parse_args()
    tuned = not args.default_malloc and keep_payload_memory()
    results = {rows: measure(rows, args.hidden, args.repeats) for rows in args.rows}
    text = table(results, args.hidden, tuned)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codec_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
