"""The embedder core on a CUDA GPU: prompt tokens/s for batches of 512-token prompts with a
Llama-3.1-8B-sized input-embedding matrix (128256 x 4096, bf16, random), the time split
into lookup, device-to-host copy and encode, each against its bound.

    python benchmarks/gpu_embedder.py [--batches 1 8 32] [--out DIR]

Needs torch with CUDA (no Ray). Bounds: lookup reads and writes each row once, so HBM
bandwidth bounds it (the peak is given by `--hbm-gbs`); the copy is bounded by the host
link (PCIe, measured here as a large pinned copy); the encode by one CPU core's base64
rate (measured here on the same bytes). Writes `gpu_embedder.md`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import pybase64
import torch

from serve_app.allocator import keep_payload_memory
from serve_app.prompts.codec import encode_prompt_embeds
from serve_app.prompts.embedder import EmbedderCore

VOCAB, HIDDEN, PROMPT = 128256, 4096, 512


def cuda_ms(work: object, repeats: int = 20) -> float:
    assert callable(work)
    work()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop))
    return statistics.median(samples)


def wall_ms(work: object, repeats: int = 10) -> float:
    assert callable(work)
    work()
    samples = []
    for _ in range(repeats):
        begin = time.perf_counter()
        work()
        samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def measure_batch(core: EmbedderCore, batch: int, hbm_gbs: float, pcie_gbs: float,
                  b64_gbs: float) -> str:
    weight = core.weight
    ids = torch.randint(0, VOCAB, (batch * PROMPT,), device=weight.device)
    size = batch * PROMPT * HIDDEN * 2
    rows = torch.nn.functional.embedding(ids, weight)
    pinned = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    lookup = cuda_ms(lambda: torch.nn.functional.embedding(ids, weight))
    d2h_pinned = cuda_ms(lambda: pinned.copy_(rows, non_blocking=True))
    d2h_pageable = wall_ms(lambda: rows.cpu())
    encode = wall_ms(lambda: [encode_prompt_embeds(p) for p in pinned.split(PROMPT)])
    prompts = [ids[i * PROMPT:(i + 1) * PROMPT].tolist() for i in range(batch)]
    total = wall_ms(lambda: core.embed_batch(prompts))
    return (f"| {batch} | {size / 2**20:.0f} | {lookup:.3f} ({2 * size / hbm_gbs / 1e6:.3f})"
            f" | {d2h_pinned:.2f} ({size / pcie_gbs / 1e6:.2f}) | {d2h_pageable:.2f} | "
            f"{encode:.2f} ({size / b64_gbs / 1e6:.2f}) | {total:.2f} | "
            f"{batch * PROMPT / total * 1e3:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--hbm-gbs", type=float, default=3350.0,
                        help="peak HBM bandwidth (H100 SXM: 3350 GB/s)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's thresholds as they are (replicas raise them)")
    args = parser.parse_args()
    tuned = not args.default_malloc and keep_payload_memory()

    device = torch.device("cuda")
    weight = torch.randn(VOCAB, HIDDEN, device=device, dtype=torch.bfloat16)
    core = EmbedderCore(weight)
    big = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    pinned_big = torch.empty(big.shape, dtype=torch.uint8, pin_memory=True)
    pcie_gbs = big.numel() / cuda_ms(lambda: pinned_big.copy_(big, non_blocking=True)) / 1e6
    sample = torch.randn(PROMPT, HIDDEN).to(torch.bfloat16)
    b64_gbs = sample.numel() * 2 / wall_ms(
        lambda: pybase64.b64encode(sample.view(torch.uint8).numpy().data)) / 1e6

    lines = [
        f"Device: {torch.cuda.get_device_name()}; host: {platform.machine()}, torch "
        f"{torch.__version__}. Matrix {VOCAB} x {HIDDEN} bf16; prompts of {PROMPT} tokens; "
        f"malloc thresholds {'raised as in the replicas' if tuned else 'glibc defaults'}.",
        f"Bounds: HBM {args.hbm_gbs:.0f} GB/s (peak, given), host link {pcie_gbs:.1f} GB/s "
        f"(64 MiB pinned copy), base64 on one core {b64_gbs:.2f} GB/s (measured).",
        "",
        "| prompts | MiB | lookup ms (bound) | D2H pinned ms (bound) | D2H pageable ms | "
        "encode ms, 1 core (bound) | core end-to-end ms | prompt tokens/s |",
        "|---:|---:|---|---|---:|---|---:|---:|",
    ]
    for batch in args.batches:
        lines.append(measure_batch(core, batch, args.hbm_gbs, pcie_gbs, b64_gbs))
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_embedder.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
