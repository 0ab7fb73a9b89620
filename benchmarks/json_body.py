"""What refusing repeated keys costs the parse of a large request body, in one run.

    python benchmarks/json_body.py [--repeats 15] [--out DIR]

For each ~20 MB body it times `orjson.loads` (the parse alone), `json_body.loads` (the
gateway's: orjson, then the colon count that clears a body of repeated keys) and the
standard library with an `object_pairs_hook` that sees every pair (the exact alternative).
Bodies: a 2048 x 4096 bf16 `prompt_embeds` payload (one ~22 MB base64 string), a
completions prompt of 4M token ids, a chat message of 20 MB of text full of colons, and
2048 embeddings inputs of 10 KB each. Writes `json_body.md` (and prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import torch

from serve_app import json_body
from serve_app.prompts.codec import encode_prompt_embeds

MB = 1_000_000


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def every_pair(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) < len(pairs):
        raise ValueError("repeated key")
    return value


def bodies() -> dict[str, bytes]:
    embeds = encode_prompt_embeds(torch.randn(2048, 4096).to(torch.bfloat16))
    text = "Q: what time is it? A: 10:30, said the clock. " * (20 * MB // 46)
    return {
        "prompt_embeds, 2048 x 4096 bf16": orjson.dumps({
            "model": "m", "prompt_embeds": embeds.data.decode("ascii"), "max_tokens": 16}),
        "prompt, 4M token ids": orjson.dumps({
            "model": "m", "prompt": [i % 128_000 for i in range(4_000_000)], "max_tokens": 16}),
        "chat, 20 MB of text with colons": orjson.dumps({
            "model": "m", "messages": [{"role": "user", "content": text}]}),
        "embeddings, 2048 inputs of 10 KB": orjson.dumps({
            "model": "m", "input": [f"{i}: " + "x" * 10_000 for i in range(2048)]}),
    }


def table(rows: list[tuple[str, int, float, float, float]]) -> str:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; "
        f"Python {platform.python_version()}, orjson {orjson.__version__}.",
        "",
        "| body | MB | orjson ms | json_body ms | added | stdlib pairs hook ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, size, fast, checked, stdlib in rows:
        lines.append(f"| {name} | {size / MB:.1f} | {fast * 1e3:.1f} | {checked * 1e3:.1f} | "
                     f"{(checked - fast) / fast:+.0%} | {stdlib * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = []
    for name, body in bodies().items():
        fast = median_seconds(lambda b=body: orjson.loads(b), args.repeats)
        checked = median_seconds(lambda b=body: json_body.loads(b), args.repeats)
        stdlib = median_seconds(lambda b=body: json.loads(b, object_pairs_hook=every_pair),
                                args.repeats)
        rows.append((name, len(body), fast, checked, stdlib))
    text = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "json_body.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
