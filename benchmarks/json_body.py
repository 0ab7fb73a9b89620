"""What refusing repeated keys costs the parse of a large request body, in one run.

    python benchmarks/json_body.py [--repeats 15] [--out DIR]

For each ~20 MB body it times `orjson.loads` (the parse alone), the check that clears a
parsed body of repeated keys (`json_body.may_repeat_keys`: a colon count), `json_body.loads`
(the gateway's: both) and the
standard library with an `object_pairs_hook` that sees every pair (the exact alternative),
interleaved, each its fastest of `--repeats` runs.
Bodies: a 2048 x 4096 bf16 `prompt_embeds` payload (one ~22 MB base64 string), a
completions prompt of 4M token ids, a chat message of 20 MB of text full of colons, and
2048 embeddings inputs of 10 KB each. Writes `json_body.md` (and prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import torch

from serve_app import json_body
from serve_app.prompts.codec import encode_prompt_embeds

MB = 1_000_000


def fastest_seconds(calls: list[Callable[[], object]], repeats: int) -> list[float]:
    """Each call's fastest time, the calls interleaved so that load from other processes
    weighs on all of them alike (the fastest run is the least disturbed one)."""
    for call in calls:
        call()  # warm-up
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


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


def table(rows: list[tuple[str, int, float, float, float, float]]) -> str:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; "
        f"Python {platform.python_version()}, orjson {orjson.__version__}; load average "
        f"{os.getloadavg()[0]:.1f} at the end (other processes share the cores).",
        "",
        "| body | MB | orjson ms | the check alone ms | check / orjson | json_body ms | "
        "stdlib pairs hook ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, size, fast, check, checked, stdlib in rows:
        lines.append(f"| {name} | {size / MB:.1f} | {fast * 1e3:.1f} | {check * 1e3:.1f} | "
                     f"{check / fast:.0%} | {checked * 1e3:.1f} | {stdlib * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = []
    for name, body in bodies().items():
        value = orjson.loads(body)
        fast, check, checked, stdlib = fastest_seconds([
            lambda b=body: orjson.loads(b),
            lambda b=body, v=value: json_body.may_repeat_keys(b, v),
            lambda b=body: json_body.loads(b),
            lambda b=body: json.loads(b, object_pairs_hook=every_pair),
        ], args.repeats)
        rows.append((name, len(body), fast, check, checked, stdlib))
    text = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "json_body.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
