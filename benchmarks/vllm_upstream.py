"""The gateway in front of a real `vllm serve --enable-prompt-embeds`, against clients sending
the same text straight to that vLLM, measured in one run: time to first token (streamed),
output tokens/s, and the gateway's added latency (its TTFT quantiles minus the direct
path's) at each concurrency.

vLLM serves Llama-3.1-8B's shape (32 layers, vocabulary 128256, hidden 4096, bf16) with random
weights that it makes itself (`--load-format dummy`), from `llama8b_sized.py`'s config and
word-level tokenizer, so a prompt of N words is N tokens on both paths. The gateway runs as
its Serve graph (`end_to_end.py`'s, in one Serve mode) on the one-layer checkpoint of the
same shape, its Embedder on the GPU beside vLLM; its rows are not vLLM's (both are random),
so its answers are other garbage than vLLM's own: only the timing counts.

Every request is a distinct prompt (no prefix-cache hit on either path; vLLM's counters are
reported) of `--tokens` tokens, greedy, `max_tokens` `--max-tokens` with `ignore_eos` so
both paths generate the same count, streamed with usage. Per concurrency the direct path
runs first, then the gateway, on the same prompts; each worker's first request is a
warm-up. Progress is printed with timestamps, and the tables are rewritten after every
cell, so a run stopped by its budget still leaves what it measured.

    python benchmarks/vllm_upstream.py --out DIR          # starts vLLM (CUDA, vLLM installed)
    python benchmarks/vllm_upstream.py --vllm-url http://127.0.0.1:8000 --out DIR

On the lent GPU host: `bash benchmarks/gpu_host.sh vllm`. Writes `vllm_upstream.md` and
`vllm_upstream.json` to `--out`, and vLLM's log (`vllm-server.log`) where it starts vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
# end_to_end imports Ray only where it starts it, so MODES can be set before that.
from end_to_end import MODEL, MODES, free_port, gateway_app, start_serve  # noqa: E402
from llama8b_sized import ensure_llama8b_shape, ensure_llama8b_sized, prompt_of  # noqa: E402
from streaming_load import Cell, added_latency, run_cell  # noqa: E402

from serve_app import envs  # noqa: E402
from tests.vllm.server import (  # noqa: E402
    VllmServer,
    prefix_cache_counters,
    serve_command,
    site_paths,
)

_STARTED = time.monotonic()
# Left of the budget for stopping the gateway and vLLM once the cells are done.
_TEARDOWN_S = 30.0
# A cell's prompts are offsets [level * _OFFSETS_PER_LEVEL, ...) of prompt_of, whose first
# word is offset x 7919 mod 128255: distinct offsets below 128255 start distinct prompts.
_OFFSETS_PER_LEVEL = 10_000


def log(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f} s] {message}", flush=True)


def machine() -> dict[str, Any]:
    """What ran it: `nvidia-smi -L` (empty without one), the cores this process may use."""
    try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                              timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        gpus = []
    return {"gpus": gpus, "nproc": len(os.sched_getaffinity(0)),
            "platform": f"{platform.machine()}, {platform.system()}, "
                        f"Python {platform.python_version()}"}


def vllm_options(args: argparse.Namespace) -> list[str]:
    """`vllm serve` options past the tier's own (`tests/vllm/server.py`): random weights of
    the full model, room for the gateway's Embedder on the same GPU."""
    options = ["--served-model-name", MODEL, "--dtype", "bfloat16", "--load-format", "dummy",
               "--max-model-len", str(args.max_model_len),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--seed", "0"]
    if not args.cuda_graphs:
        options.append("--enforce-eager")
    return options


def start_vllm(args: argparse.Namespace) -> VllmServer:
    """Launches `vllm serve` on the 32-layer config without waiting for it."""
    shape = ensure_llama8b_shape(envs.cache_dir() / "bench-llama8b-shape")
    server = VllmServer(shape, args.out / "vllm-server.log", options=vllm_options(args),
                        start_timeout_s=args.vllm_start_timeout)
    log("launching " + shlex.join(serve_command(shape, server.port, server.options)))
    server.launch()
    return server


def vllm_version(root: str) -> str:
    """vLLM's own `/version`, else the version installed in its site; a server with
    neither (the fakes) says so."""
    try:
        answer = httpx.get(f"{root}/version", timeout=10)
        if answer.status_code == 200:
            return str(answer.json()["version"])
    except (httpx.HTTPError, ValueError, KeyError):
        pass
    for found in importlib.metadata.distributions(name="vllm", path=site_paths() or sys.path):
        return f"{found.version} (installed; the server has no /version)"
    return "unknown (no /version)"


def prefix_cache(root: str) -> dict[str, float] | None:
    """vLLM's prefix-cache counters (queried and hit tokens), or None without /metrics."""
    try:
        answer = httpx.get(f"{root}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    queries, hits = prefix_cache_counters(answer.text)
    return {"queried_tokens": queries, "hit_tokens": hits}


def start_gateway(args: argparse.Namespace, model_dir: Path, vllm_root: str) -> str:
    """A local Ray with the gateway graph in front of vLLM; returns its OpenAI base URL."""
    from ray import serve

    port = free_port()
    # The object store holds payloads in flight: 64 of 512 rows are 256 MiB.
    start_serve(port, num_cpus=max(8, os.cpu_count() or 1), object_store_bytes=2 << 30)
    serve.run(gateway_app(model_dir, f"{vllm_root}/v1", args.replicas), name="gateway",
              route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/models", timeout=10).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway did not answer /v1/models")
        time.sleep(0.5)
    return url


def bodies(args: argparse.Namespace, level: int, count: int) -> list[dict[str, Any]]:
    assert count <= _OFFSETS_PER_LEVEL, "a cell's prompts would repeat the next cell's"
    return [{"model": MODEL, "prompt": prompt_of(args.tokens, level * _OFFSETS_PER_LEVEL + n),
             "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True,
             "stream": True, "stream_options": {"include_usage": True}}
            for n in range(count)]


# --------------------------------------------------------------------- the report


def rows_of(cells: list[Cell], context: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per concurrency measured on both paths, each naming its machine and vLLM."""
    found = {(cell.target, cell.concurrency): cell.summary() for cell in cells}
    rows = []
    for concurrency in sorted({cell.concurrency for cell in cells}):
        direct, gateway = found.get(("direct", concurrency)), found.get(("gateway", concurrency))
        if direct and gateway:
            rows.append({"concurrency": concurrency, "direct": direct, "gateway": gateway,
                         **added_latency(direct, gateway), "machine": context["machine"],
                         "vllm_version": context["vllm_version"]})
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| concurrency | requests per path | direct TTFT p50 / p90 ms | gateway TTFT "
             "p50 / p90 ms | added p50 / p90 ms | direct output tok/s | gateway output tok/s "
             "| ms per output token p50, direct / gateway | client cores, direct / gateway |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        d, g = row["direct"], row["gateway"]
        cut = "" if d["complete"] and g["complete"] else " (cut by the budget)"
        lines.append(
            f"| {row['concurrency']} | {d['requests']} / {g['requests']}{cut} | "
            f"{d['ttft_p50_ms']:.1f} / {d['ttft_p90_ms']:.1f} | "
            f"{g['ttft_p50_ms']:.1f} / {g['ttft_p90_ms']:.1f} | "
            f"{row['added_p50_ms']:+.1f} / {row['added_p90_ms']:+.1f} | "
            f"{d['output_tokens_per_s']:.0f} | {g['output_tokens_per_s']:.0f} | "
            f"{_ms(d['tpot_p50_ms'])} / {_ms(g['tpot_p50_ms'])} | "
            f"{d['client_cores']:.2f} / {g['client_cores']:.2f} |")
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def mismatches(rows: list[dict[str, Any]], max_tokens: int) -> list[str]:
    """Rows where the two paths did not do the same work: every answer should have
    `max_tokens` tokens (ignore_eos) and the prompts the same length on both paths."""
    found = []
    for row in rows:
        d, g = row["direct"], row["gateway"]
        if d["completion_tokens"] != [max_tokens] or g["completion_tokens"] != [max_tokens]:
            found.append(f"concurrency {row['concurrency']}: completion tokens "
                         f"{d['completion_tokens']} direct, {g['completion_tokens']} gateway, "
                         f"asked {max_tokens}")
        if d["prompt_tokens"] != g["prompt_tokens"]:
            found.append(f"concurrency {row['concurrency']}: prompt tokens "
                         f"{d['prompt_tokens']} direct, {g['prompt_tokens']} gateway")
    return found


def write_report(args: argparse.Namespace, cells: list[Cell],
                 context: dict[str, Any]) -> str:
    rows = rows_of(cells, context)
    m = context["machine"]
    lines = [
        f"Machine: {'; '.join(m['gpus']) or 'no GPU'} (`nvidia-smi -L`); nproc {m['nproc']}; "
        f"{m['platform']}. vLLM {context['vllm_version']} "
        f"({context['vllm']}). Gateway: Serve mode `{args.serve_mode}`, replicas "
        + ", ".join(f"{name} {count}" for name, count in args.replicas.items())
        + f", Embedder device `auto`. Prompts of {args.tokens} tokens, each distinct; "
        f"max_tokens {args.max_tokens} with ignore_eos, greedy, streamed. Per path and "
        f"concurrency c: c warm-up requests, then max({args.min_requests}, "
        f"{args.rounds} x c) measured. Added latency: the gateway's TTFT quantile minus the "
        "direct path's, measured in the same run.",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`",
        "",
        *table(rows),
    ]
    problems = mismatches(rows, args.max_tokens)
    if problems:
        lines += ["", "The paths did not do the same work: " + "; ".join(problems) + "."]
    if context.get("prefix_cache") is not None:
        cache = context["prefix_cache"]
        lines += ["", f"vLLM's prefix cache over the run: {cache['hit_tokens']:.0f} of "
                  f"{cache['queried_tokens']:.0f} queried tokens hit."]
    text = "\n".join(lines) + "\n"
    (args.out / "vllm_upstream.md").write_text(text)
    (args.out / "vllm_upstream.json").write_text(json.dumps(
        {**context, "settings": settings(args), "rows": rows,
         "cells": [cell.summary() for cell in cells]}, indent=1))
    return text


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"tokens": args.tokens, "max_tokens": args.max_tokens,
            "concurrency": args.concurrency, "rounds": args.rounds,
            "min_requests": args.min_requests, "serve_mode": args.serve_mode,
            "replicas": args.replicas, "command": shlex.join(["python", *sys.argv])}


# --------------------------------------------------------------------- the run


def measure(args: argparse.Namespace, urls: dict[str, str], context: dict[str, Any],
            deadline: float) -> list[Cell]:
    cells: list[Cell] = []
    for level, concurrency in enumerate(args.concurrency):
        count = concurrency + max(args.min_requests, args.rounds * concurrency)
        prompts = bodies(args, level, count)
        for target, url in urls.items():
            if time.monotonic() > deadline:
                log(f"budget spent: {target} at concurrency {concurrency} not run")
                continue
            cell = asyncio.run(run_cell(target, url, prompts, concurrency, deadline))
            if not cell.timings:
                log(f"budget spent: {target} at concurrency {concurrency} cut in its warm-up")
                continue
            cells.append(cell)
            s = cell.summary()
            log(f"{target:7} c={concurrency:3}: {s['requests']} requests, TTFT p50 "
                f"{s['ttft_p50_ms']:.1f} ms p90 {s['ttft_p90_ms']:.1f} ms, "
                f"{s['output_tokens_per_s']:.0f} output tok/s, client "
                f"{s['client_cores']:.2f} cores" + ("" if cell.complete else " (cut)"))
            write_report(args, cells, context)
    return cells


def run(args: argparse.Namespace) -> None:
    deadline = _STARTED + args.budget_s - _TEARDOWN_S
    context: dict[str, Any] = {"machine": machine()}
    server = None if args.vllm_url else start_vllm(args)
    context["vllm"] = (f"a running server at {args.vllm_url}" if args.vllm_url else
                       "Llama-3.1-8B's shape (32 layers, llama8b_sized.py's config and "
                       f"tokenizer), `vllm serve {shlex.join(vllm_options(args))}`")
    try:
        model_dir = ensure_llama8b_sized(envs.cache_dir() / "bench-llama8b-sized")
        log(f"gateway checkpoint ready: {model_dir}")
        if server is not None:
            server.wait_ready()
        root = args.vllm_url or server.url
        context["vllm_version"] = vllm_version(root)
        log(f"vLLM {context['vllm_version']} answers at {root}")
        gateway = start_gateway(args, model_dir, root)
        log(f"gateway answers at {gateway}")
        cells = measure(args, {"direct": f"{root}/v1", "gateway": gateway}, context, deadline)
        context["prefix_cache"] = prefix_cache(root)
        print(write_report(args, cells, context), flush=True)
    finally:
        stop(server)


def stop(server: VllmServer | None) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # not serve.shutdown(): its graceful drain takes 30 s
    if server is not None:
        server.stop()
    log("stopped")


def parse_replicas(text: str) -> dict[str, int]:
    """`Gateway=2,Dispatcher=2,Embedder=1` -> {"Gateway": 2, ...}."""
    replicas = {}
    for item in filter(None, text.split(",")):
        name, _, count = item.partition("=")
        replicas[name] = int(count)
    return replicas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-url", help="an OpenAI-compatible server already running "
                        "(its root, the API under /v1) instead of starting vLLM")
    parser.add_argument("--tokens", type=int, default=512, help="prompt tokens per request")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=4,
                        help="measured requests per path and concurrency c: rounds x c ...")
    parser.add_argument("--min-requests", type=int, default=24, help="... or at least this")
    parser.add_argument("--serve-mode", choices=list(MODES), default="haproxy")
    parser.add_argument("--replicas", type=parse_replicas,
                        default=parse_replicas("Gateway=2,Dispatcher=2,Embedder=1"))
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="let vLLM compile and capture CUDA graphs (a slower start) "
                        "instead of --enforce-eager")
    parser.add_argument("--vllm-start-timeout", type=float, default=300.0)
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall seconds for the whole run; cells left when it is spent "
                        "are not run")
    parser.add_argument("--out", type=Path, required=True,
                        help="where the tables and vLLM's log go")
    args = parser.parse_args()
    args.vllm_url = args.vllm_url.rstrip("/").removesuffix("/v1") if args.vllm_url else None
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.update(MODES[args.serve_mode])  # before Ray starts: its processes inherit them
    run(args)


if __name__ == "__main__":
    main()
