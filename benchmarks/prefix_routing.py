"""Prefix-affinity against least-loaded routing, simulated: cache hit rate, time to first
token and load imbalance on fleets of 4, 16 and 64 vLLM-like backends.

Each simulated backend has vLLM's prefix cache as an LRU of block hashes (16 rows a block,
each block's hash chained to the previous one's, `--cache-blocks` of them) and serves
prefills one at a time: time to first token = queueing + a x uncached tokens + b. A
request stays in flight for its prefill plus `--decode-s`. Routing is the gateway's own
code (`serve_app.upstream.routing`: the same functions the Dispatcher's Fleet calls) over
the backends' in-flight counts, as one Dispatcher replica sees them.

Workloads (Poisson arrivals; the same request sequence for both policies):
- `zipf`: `--prompts` system prompts of `--prompt-tokens` tokens, Zipf popularity (s=1.1),
  each followed by a random user suffix of 50-300 tokens;
- `uniform`: the same prompts, equally popular;
- `unique`: no shared prefix at all (every prompt its own), where affinity cannot help.

The load is `--load` of what the fleet could serve with no cache at all, so least-loaded's
queues are real. "Ideal" is the hit rate of one infinitely large server seeing every
request: the most any routing can reach.

    python benchmarks/prefix_routing.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import platform
import random
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.upstream.routing import by_affinity, least_loaded  # noqa: E402

BLOCK = 16


@dataclass(frozen=True)
class Settings:
    url: str
    weight: float = 1.0


@dataclass
class SimBackend:
    """What routing reads of a backend (`config`, `in_flight`), and a vLLM-like server."""

    config: Settings
    capacity: int
    in_flight: int = 0
    busy_until: float = 0.0
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    peak: int = 0

    def cached_blocks(self, blocks: list[int]) -> int:
        """Leading blocks already cached (vLLM matches the longest cached prefix)."""
        hit = 0
        for block in blocks:
            if block not in self.cache:
                break
            hit += 1
        return hit

    def store(self, blocks: list[int]) -> None:
        for block in blocks:
            self.cache[block] = None
            self.cache.move_to_end(block)
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)


@dataclass(frozen=True)
class Request:
    at: float
    blocks: list[int]
    """The chained hash of every whole block of the prompt."""
    tokens: int


def chain(tokens: list[int]) -> list[int]:
    hashes, previous = [], b""
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        previous = hashlib.blake2b(previous + repr(tokens[start:start + BLOCK]).encode(),
                                   digest_size=8).digest()
        hashes.append(int.from_bytes(previous, "little"))
    return hashes


def workload(kind: str, count: int, rate: float, prompts: int, prompt_tokens: int,
             rng: random.Random) -> list[Request]:
    systems = [[rng.randrange(1, 32000) for _ in range(prompt_tokens)] for _ in range(prompts)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(prompts)] if kind == "zipf" else None
    requests, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate)
        suffix = [rng.randrange(1, 32000) for _ in range(rng.randint(50, 300))]
        if kind == "unique":
            system = [rng.randrange(1, 32000) for _ in range(prompt_tokens)]
        else:
            system = rng.choices(systems, weights=weights)[0]
        tokens = system + suffix
        requests.append(Request(now, chain(tokens), len(tokens)))
    return requests


def ideal_hit_rate(requests: list[Request]) -> float:
    seen: set[int] = set()
    hit = total = 0
    for request in requests:
        for block in request.blocks:
            if block not in seen:
                break
            hit += BLOCK
        seen.update(request.blocks)
        total += request.tokens
    return hit / total


def simulate(requests: list[Request], backends: int, policy: str, bound: float,
             args: argparse.Namespace, seed: int) -> dict[str, Any]:
    fleet = [SimBackend(Settings(f"http://backend-{i}/v1"), args.cache_blocks)
             for i in range(backends)]
    rng = random.Random(seed)
    finishing: list[tuple[float, int, int]] = []  # (time, order, backend index)
    ttfts, imbalance = [], []
    hit_tokens = total_tokens = 0
    for order, request in enumerate(requests):
        while finishing and finishing[0][0] <= request.at:
            fleet[heapq.heappop(finishing)[2]].in_flight -= 1
        key = request.blocks[min(args.prefix_blocks, len(request.blocks)) - 1]
        if policy == "prefix_affinity":
            chosen, _ = by_affinity(key, fleet, fleet, bound, lambda b: True)
            backend = chosen or least_loaded(fleet, rng)
        else:
            backend = least_loaded(fleet, rng)
        hit = backend.cached_blocks(request.blocks) * BLOCK
        backend.store(request.blocks)
        start = max(request.at, backend.busy_until)
        backend.busy_until = start + args.a * (request.tokens - hit) + args.b
        ttfts.append(backend.busy_until - request.at)
        backend.in_flight += 1
        backend.peak = max(backend.peak, backend.in_flight)
        heapq.heappush(finishing, (backend.busy_until + args.decode_s, order,
                                   fleet.index(backend)))
        hit_tokens += hit
        total_tokens += request.tokens
        loads = [b.in_flight for b in fleet]
        imbalance.append(max(loads) / statistics.fmean(loads))
    ttfts.sort()
    warm = imbalance[len(imbalance) // 10:]  # leave out the fleet filling up
    return {
        "hit_rate": hit_tokens / total_tokens,
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p99_s": ttfts[int(0.99 * (len(ttfts) - 1))],
        "imbalance_mean": statistics.fmean(warm),
        "imbalance_p99": sorted(warm)[int(0.99 * (len(warm) - 1))],
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    uncached_s = args.a * (args.prompt_tokens + 175) + args.b
    for backends in args.backends:
        rate = args.load * backends / uncached_s
        for kind in args.workloads:
            rng = random.Random(args.seed)
            requests = workload(kind, args.requests_per_backend * backends, rate,
                                args.prompts, args.prompt_tokens, rng)
            ideal = ideal_hit_rate(requests)
            cells = [("least_loaded", None)] + [("prefix_affinity", e) for e in args.load_bound]
            for policy, bound in cells:
                started = time.perf_counter()
                result = simulate(requests, backends, policy, bound or 0.0, args, args.seed)
                rows.append({"backends": backends, "workload": kind, "policy": policy,
                             "load_bound": bound, "ideal_hit_rate": ideal,
                             "rate_per_s": rate, **result,
                             "sim_seconds": time.perf_counter() - started})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# Prefix-affinity routing, simulated",
        "",
        f"Command: `{command}`",
        f"Machine: {platform.node() or 'unknown'}, {platform.processor() or platform.machine()}"
        f", Python {platform.python_version()} (a simulation: the machine sets only how long "
        "it takes to run).",
        "",
        f"Model: prefill {args.a * 1e6:g} µs per uncached token + {args.b * 1e3:g} ms, one "
        f"prefill at a time per backend, {args.decode_s:g} s of decoding after it; prefix "
        f"cache of {args.cache_blocks} blocks of {BLOCK} tokens per backend (LRU); "
        f"{args.prompts} system prompts of {args.prompt_tokens} tokens plus 50-300 random "
        f"tokens; load {args.load:g} of the fleet's cache-less capacity; routing key "
        f"{args.prefix_blocks} blocks; "
        f"{args.requests_per_backend} requests per backend.",
        "",
        "| backends | workload | policy | ε | hit rate | % of ideal | TTFT mean | TTFT p99 "
        "| imbalance mean | imbalance p99 |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        share = row["hit_rate"] / row["ideal_hit_rate"] if row["ideal_hit_rate"] else 1.0
        lines.append(
            f"| {row['backends']} | {row['workload']} | {row['policy']} "
            f"| {'' if row['load_bound'] is None else format(row['load_bound'], 'g')} "
            f"| {row['hit_rate']:.1%} | {share:.0%} | {row['ttft_mean_s'] * 1e3:.0f} ms "
            f"| {row['ttft_p99_s'] * 1e3:.0f} ms | {row['imbalance_mean']:.2f} "
            f"| {row['imbalance_p99']:.2f} |")
    lines += ["", "Imbalance: max / mean in-flight over the backends, sampled at each "
              "arrival after the first tenth of the run.", "",
              f"## Targets (prefix_affinity at ε = {args.load_bound[0]:g})", ""]
    lines += targets([row for row in rows if row["load_bound"] in (None,
                                                                   args.load_bound[0])])
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| backends | hit rate ≥ 90% of ideal (zipf) | imbalance ≤ 1.25 (zipf, mean) "
           "| p99 TTFT ≤ least_loaded (uniform) |", "|---:|---|---|---|"]
    find = {(r["backends"], r["workload"], r["policy"]): r for r in rows}
    for backends in sorted({r["backends"] for r in rows}):
        zipf = find.get((backends, "zipf", "prefix_affinity"))
        uniform = find.get((backends, "uniform", "prefix_affinity"))
        baseline = find.get((backends, "uniform", "least_loaded"))
        cells = [str(backends)]
        if zipf:
            share = zipf["hit_rate"] / zipf["ideal_hit_rate"]
            cells.append(f"{share:.0%} {'met' if share >= 0.9 else 'missed'}")
            cells.append(f"{zipf['imbalance_mean']:.2f} "
                         f"{'met' if zipf['imbalance_mean'] <= 1.25 else 'missed'}")
        else:
            cells += ["", ""]
        if uniform and baseline:
            ok = uniform["ttft_p99_s"] <= baseline["ttft_p99_s"]
            cells.append(f"{uniform['ttft_p99_s'] * 1e3:.0f} vs "
                         f"{baseline['ttft_p99_s'] * 1e3:.0f} ms {'met' if ok else 'missed'}")
        else:
            cells.append("")
        out.append("| " + " | ".join(cells) + " |")
    return out


def plot(rows: list[dict[str, Any]], bound: float, path: Path) -> None:
    rows = [row for row in rows if row["load_bound"] in (None, bound)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r["workload"] for r in rows}, key=["zipf", "uniform", "unique"].index)
    fig, axes = plt.subplots(2, len(workloads), figsize=(4.2 * len(workloads), 6.5),
                             squeeze=False)
    sizes = sorted({r["backends"] for r in rows})
    for column, kind in enumerate(workloads):
        for policy, marker in (("least_loaded", "o"), ("prefix_affinity", "s")):
            picked = [r for r in rows if r["workload"] == kind and r["policy"] == policy]
            picked.sort(key=lambda r: r["backends"])
            axes[0][column].plot(sizes, [r["hit_rate"] * 100 for r in picked], marker=marker,
                                 label=policy if policy == "least_loaded" else
                                 f"{policy} (ε={bound:g})")
            axes[1][column].plot(sizes, [r["ttft_p99_s"] * 1e3 for r in picked],
                                 marker=marker, label=policy)
        ideal = [r["ideal_hit_rate"] * 100 for r in rows
                 if r["workload"] == kind and r["policy"] == "least_loaded"]
        axes[0][column].plot(sizes, ideal, linestyle="--", color="grey", label="ideal")
        axes[0][column].set_title(kind)
        axes[0][column].set_ylabel("prefix cache hit rate (%)")
        axes[1][column].set_ylabel("p99 time to first token (ms)")
        for row in axes:
            row[column].set_xscale("log", base=2)
            row[column].set_xticks(sizes, [str(s) for s in sizes])
            row[column].set_xlabel("backends")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--workloads", nargs="+", default=["zipf", "uniform", "unique"],
                        choices=["zipf", "uniform", "unique"])
    parser.add_argument("--requests-per-backend", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--cache-blocks", type=int, default=2048,
                        help="prefix cache per backend, in blocks of 16 tokens")
    parser.add_argument("--a", type=float, default=60e-6, help="seconds per uncached token")
    parser.add_argument("--b", type=float, default=0.02, help="seconds per prefill")
    parser.add_argument("--decode-s", type=float, default=2.0)
    parser.add_argument("--load", type=float, default=0.6)
    parser.add_argument("--prefix-blocks", type=int, default=8)
    parser.add_argument("--load-bound", type=float, nargs="+", default=[0.1, 0.25],
                        help="ε of bounded loads; the first one is checked against targets")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="prefix_routing", help="file name of the results")
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    rows = run(args)
    text = report(rows, args, command)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.md").write_text(text)
        (args.out / f"{args.name}.json").write_text(json.dumps(
            {"command": command, "settings": vars(args) | {"out": str(args.out)},
             "rows": rows}, indent=1))
        plot(rows, args.load_bound[0], args.out / f"{args.name}.png")


if __name__ == "__main__":
    main()
