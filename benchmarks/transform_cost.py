"""What a prompt transform costs the Embedder: its share of the time per batch, against the
same batch untransformed, for a Llama-3.1-8B-sized input-embedding matrix (128256 x 4096,
bf16, random) on a CUDA GPU.

    python benchmarks/transform_cost.py [--tokens 128 2048] [--batch 16] [--out DIR]

Needs torch with CUDA (no Ray); `--device cpu` runs it anywhere with a smaller matrix
(`--vocab`, `--hidden`). For each kind it times, per batch (median of `--repeats`):
`embed_batch` (lookup, transform, copy to the host, encode: all the Embedder does) and the
transform alone (synchronized), whose ratio is the transform's share. Writes
`transform_cost.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from serve_app.allocator import keep_payload_memory
from serve_app.config import TransformConfig
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.transforms import build_transform

KINDS = ("none", "gaussian", "keyed_gaussian")
KEY_ENV = "SERVE_APP_BENCH_TRANSFORM_KEY"


def median_ms(work: Callable[[], object], device: torch.device, repeats: int) -> float:
    work()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def measure(weight: torch.Tensor, kind: str, tokens: int, batch: int, repeats: int,
            baseline_ms: float | None) -> tuple[str, float]:
    config = TransformConfig(kind=kind, sigma=1.0, key_env=KEY_ENV)  # type: ignore[arg-type]
    begin = time.perf_counter()
    core = EmbedderCore(weight, build_transform(config, weight))
    print(f"{kind}: built in {time.perf_counter() - begin:.1f} s", flush=True)
    generator = torch.Generator().manual_seed(tokens)
    prompts = [torch.randint(0, weight.shape[0], (tokens,), generator=generator).tolist()
               for _ in range(batch)]
    total = median_ms(lambda: core.embed_batch(prompts), weight.device, repeats)
    if core.transform is None:
        return (f"| {tokens} | {batch} | none | {total:.1f} | — | — | — |", total)
    transform = core.transform
    ids = torch.tensor(prompts).reshape(-1).to(weight.device)
    flat, lengths = weight[ids], [tokens] * batch
    alone = median_ms(lambda: transform(flat, ids, lengths), weight.device, repeats)
    added = total - (baseline_ms or total)
    return (f"| {tokens} | {batch} | {kind} | {total:.1f} | {alone:.2f} | "
            f"{alone / total:.1%} | {added:+.1f} |", total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--batch", type=int, default=16, help="the Embedder's max_batch_size")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    keep_payload_memory()
    os.environ.setdefault(KEY_ENV, "benchmark-key-not-a-secret")
    device = torch.device(args.device)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).to(torch.bfloat16)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    lines = [
        f"Device: {name}; {os.cpu_count()} CPU cores; torch {torch.__version__}. Matrix "
        f"{args.vocab} x {args.hidden} bf16 (random); batches of {args.batch} prompts of "
        "random token ids; sigma 1.0. Median of "
        f"{args.repeats} batches. Command: `python benchmarks/transform_cost.py "
        f"--device {args.device}`.",
        "",
        "| tokens per prompt | prompts | kind | embed_batch ms | transform alone ms | "
        "transform's share | added to the batch ms |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for tokens in args.tokens:
        baseline = None
        for kind in KINDS:
            line, total = measure(weight, kind, tokens, args.batch, args.repeats, baseline)
            baseline = baseline if baseline is not None else total
            lines.append(line)
            print(line, flush=True)
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transform_cost.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
