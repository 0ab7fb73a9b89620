"""What a prompt transform costs the Embedder: its share of the time per batch, against the
same batch untransformed, for a Llama-3.1-8B-sized input-embedding matrix (128256 x 4096,
bf16, random) on a CUDA GPU, or a smaller one on the CPU.

    python benchmarks/transform_cost.py [--tokens 128 2048] [--batch 16] [--out DIR]
    python benchmarks/transform_cost.py --device cpu --vocab 32000 --hidden 1024 --tokens 512

Needs torch (no Ray). For each noise kind it times the transform as the Embedder runs it
(`float64`: normals made in float64 from 53-bit uniforms, the sum rounded once) beside the
same kind made in float32 from 24-bit uniforms (`float32`: torch's `randn` for
`gaussian`; the same keyed seeds, 24-bit uniforms and Box-Muller in float32 for
`keyed_gaussian`), which exact arithmetic reads tokens back from and which is here only
to price the difference. Per batch (median of `--repeats`): `embed_batch` (lookup,
transform, copy to the host, encode: all the Embedder does) and the transform alone
(synchronized), whose ratio is the transform's share. Writes `transform_cost.md` (CUDA)
or `transform_cost_cpu.md`.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from serve_app.allocator import keep_payload_memory
from serve_app.config import TransformConfig
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.keyed_noise import mix32
from serve_app.prompts.tenants import SHARED_TENANT
from serve_app.prompts.transforms import (
    GaussianNoise,
    KeyedGaussianNoise,
    PromptTransform,
    build_transform,
)

KEY_ENV = "SERVE_APP_BENCH_TRANSFORM_KEY"
NOISE_KINDS = ("gaussian", "keyed_gaussian")
# The float32 comparison's eager CPU chunk, and its 32-bit hash constants.
_FLOAT32_CHUNK = 1 << 22
_GOLDEN32 = 0x9E3779B9 - (1 << 32)


class Float32Gaussian:
    """`gaussian` in float32: torch's `randn` and the sum in the rows' float32."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, rows: torch.Tensor, content: torch.Tensor, lengths: Sequence[int],
                 tenants: Sequence[str]) -> torch.Tensor:
        noise = torch.randn(rows.shape, dtype=torch.float32, device=rows.device)
        return (rows.float() + self.scale * noise).to(rows.dtype)


def _float32_pairs(low: torch.Tensor, high: torch.Tensor, first: torch.Tensor,
                   second: torch.Tensor) -> torch.Tensor:
    """Box-Muller in float32 on 24-bit uniforms of a 32-bit hash of each seed's halves."""
    bits = (mix32(mix32(low ^ first) ^ high ^ second) >> 8) & 0xFFFFFF
    uniform = (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    radius = torch.sqrt(-2.0 * torch.log(uniform[:, 0::2]))
    angle = 2.0 * math.pi * uniform[:, 1::2]
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2).flatten(1)


@functools.cache
def _float32_compiled() -> Callable[..., torch.Tensor]:
    return torch.compile(_float32_pairs, dynamic=True, fullgraph=True)


def float32_normals(seeds: torch.Tensor, hidden: int) -> torch.Tensor:
    even = hidden + hidden % 2
    counter = torch.arange(2 * even, dtype=torch.int32, device=seeds.device)
    constants = mix32(counter * _GOLDEN32 ^ 0x5BD1E995)
    first, second = constants[:even], constants[even:]
    low = (seeds & 0xFFFFFFFF).to(torch.int32)[:, None]
    high = (seeds >> 32).to(torch.int32)[:, None]
    if seeds.is_cuda:
        return _float32_compiled()(low, high, first, second)[:, :hidden]
    step = max(1, _FLOAT32_CHUNK // even)
    chunks = [_float32_pairs(low[i:i + step], high[i:i + step], first, second)
              for i in range(0, low.shape[0], step)]
    return torch.cat(chunks)[:, :hidden]


class Float32Keyed:
    """`keyed_gaussian`'s seeds, then 24-bit uniforms, Box-Muller and the sum in float32."""

    def __init__(self, keyed: KeyedGaussianNoise) -> None:
        self.keyed = keyed

    def __call__(self, rows: torch.Tensor, content: torch.Tensor, lengths: Sequence[int],
                 tenants: Sequence[str]) -> torch.Tensor:
        seeds = self.keyed.seeds.seeds(content, lengths, tenants)
        noise = float32_normals(seeds, rows.shape[1])
        return (rows.float() + self.keyed.scale * noise).to(rows.dtype)


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


def transforms(weight: torch.Tensor) -> dict[tuple[str, str], PromptTransform]:
    """Each noise kind as the Embedder builds it, and its float32 comparison."""
    built: dict[tuple[str, str], PromptTransform] = {}
    for kind in NOISE_KINDS:
        config = TransformConfig(kind=kind, sigma=1.0, key_env=KEY_ENV)
        begin = time.perf_counter()
        transform = build_transform(config, weight)
        print(f"{kind}: built in {time.perf_counter() - begin:.1f} s", flush=True)
        assert transform is not None
        built[(kind, "float64")] = transform
        if isinstance(transform, KeyedGaussianNoise):
            built[(kind, "float32")] = Float32Keyed(transform)
        elif isinstance(transform, GaussianNoise):
            built[(kind, "float32")] = Float32Gaussian(transform.scale)
    return built


def measure(weight: torch.Tensor, transform: PromptTransform | None, tokens: int, batch: int,
            repeats: int) -> tuple[float, float | None]:
    """`embed_batch`'s median ms and, with a transform, the transform's alone."""
    core = EmbedderCore(weight, transform)
    generator = torch.Generator().manual_seed(tokens)
    prompts = [torch.randint(0, weight.shape[0], (tokens,), generator=generator).tolist()
               for _ in range(batch)]
    total = median_ms(lambda: core.embed_batch(prompts), weight.device, repeats)
    if transform is None:
        return total, None
    ids = torch.tensor(prompts).reshape(-1).to(weight.device)
    flat, lengths, tenants = weight[ids], [tokens] * batch, [SHARED_TENANT] * batch
    alone = median_ms(lambda: transform(flat, ids, lengths, tenants), weight.device, repeats)
    return total, alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--batch", type=int, default=16, help="the Embedder's max_batch_size")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    keep_payload_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault(KEY_ENV, "benchmark-key-not-a-secret")
    device = torch.device(args.device)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).to(torch.bfloat16)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    built = transforms(weight)
    command = " ".join(["python benchmarks/transform_cost.py", f"--device {args.device}",
                        f"--vocab {args.vocab} --hidden {args.hidden}",
                        "--tokens " + " ".join(map(str, args.tokens)), f"--batch {args.batch}"]
                       + ([f"--threads {args.threads}"] if args.threads else []))
    lines = [
        f"Device: {name}; {os.cpu_count()} CPU cores, torch on {torch.get_num_threads()} "
        f"threads; torch {torch.__version__}. Matrix {args.vocab} x {args.hidden} bf16 "
        f"(random); batches of {args.batch} prompts of random token ids; sigma 1.0. Median "
        f"of {args.repeats} batches. Command: `{command}`.",
        "",
        "| tokens per prompt | prompts | kind | noise | embed_batch ms | transform alone ms "
        "| transform's share | added to the batch ms |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for tokens in args.tokens:
        baseline, _ = measure(weight, None, tokens, args.batch, args.repeats)
        lines.append(f"| {tokens} | {args.batch} | none | — | {baseline:.1f} | — | — | — |")
        print(lines[-1], flush=True)
        for (kind, noise), transform in built.items():
            total, alone = measure(weight, transform, tokens, args.batch, args.repeats)
            assert alone is not None
            lines.append(f"| {tokens} | {args.batch} | {kind} | {noise} | {total:.1f} | "
                         f"{alone:.2f} | {alone / total:.1%} | {total - baseline:+.1f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    filename = "transform_cost.md" if device.type == "cuda" else "transform_cost_cpu.md"
    (args.out / filename).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
