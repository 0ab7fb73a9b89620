"""What one request can make the ingress spend: CPU, peak memory, and memory kept after.

    python benchmarks/worst_request.py [--source DIR] [--only TEXT] [--out DIR] [--timeout-s 120]

Each case runs in a fresh process: the gateway app in-process on the demo model and demo
encoder (the ingress's own work: parsing, checks, tokenizing), its upstream a stub that
answers at once, so the numbers are the ingress's. A case sends one request after a warm-up
and reports its status, wall time, CPU seconds, the peak RSS above the idle level, and the
RSS left above idle after the answer (after `gc.collect()`), then again after the same
request `--repeats` times in all: freed memory that glibc keeps for reuse shows in the
first, a leak in the growth to the second. The allocator is glibc's default; the Gateway's
replicas keep up to 512 MiB of freed heap on purpose (`serve_app/allocator.py`).

The baseline, measured in the same run, is a prompt that fills the demo model's context
(512 tokens). The embeddings cases run the demo encoder in the same process, so their CPU
includes its forward passes. The costliest requests the gateway accepts are those whose
text fills `limits.max_text_chars` (2 Mi characters by default) after truncation cuts each
text: they are the "worst accepted" rows. `--source DIR` runs the same cases against
another checkout's `serve_app` (for example the previous commit, in a `git worktree`), so
a change's before and after are measured the same way; `--only TEXT` runs the cases whose
name contains TEXT. Writes `worst_request_<commit>.md` and `.json` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000

# (name, route, body builder argument): the body is made in the child from these. `chars`
# is one text's length; `items` makes a list of that many texts; `truncate` asks for
# truncation (vLLM's truncate_prompt_tokens: -1; Cohere truncates at END by default and
# `"truncate": "NONE"` turns it off); `kind` is the text: prose, or base64 (slower to
# tokenize for the demo encoder, whose vocabulary is mostly single characters).
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("baseline: a context-filling prompt (500 chars)", "/v1/completions", {"chars": 500}),
    ("completions, 1 MB prompt", "/v1/completions", {"chars": 1 * MB}),
    ("completions, 30 MB prompt", "/v1/completions", {"chars": 30 * MB}),
    ("completions, 60 MB prompt", "/v1/completions", {"chars": 60 * MB}),
    ("chat, 30 MB message", "/v1/chat/completions", {"chars": 30 * MB}),
    ("embeddings, 30 MB input", "/v1/embeddings", {"chars": 30 * MB}),
    ("embeddings, 30 MB input, truncated", "/v1/embeddings", {"chars": 30 * MB,
                                                               "truncate": True}),
    ("embeddings, 2,048 inputs of 14.6 KB (30 MB), truncated", "/v1/embeddings",
     {"chars": 14_600, "items": 2048, "truncate": True}),
    ("Cohere, 2,048 texts of 14.6 KB (30 MB), truncate END", "/v2/embed",
     {"chars": 14_600, "items": 2048, "truncate": True}),
    ("embeddings, 2,048 inputs of 640 chars (max_items)", "/v1/embeddings",
     {"chars": 640, "items": 2048, "words": True}),
    ("embeddings, 1,000 inputs of 2,048 chars, too long once tokenized", "/v1/embeddings",
     {"chars": 2048, "items": 1000}),
    ("worst accepted: Cohere, 990 texts of 14.6 KB, truncate END (each cut to 2,112 chars)",
     "/v2/embed", {"chars": 14_600, "items": 990, "truncate": True}),
    ("worst accepted, base64 text: Cohere, 990 texts of 14.6 KB, truncate END", "/v2/embed",
     {"chars": 14_600, "items": 990, "truncate": True, "kind": "base64"}),
]

CHILD = r'''
import asyncio, gc, json, os, resource, sys, time
import httpx, orjson

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: VmHWM starts again from now
        f.write("5")

def peak() -> int:
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

route, spec = sys.argv[1], json.loads(sys.argv[2])
REPEATS = spec["repeats"]
from serve_app.config import AppConfig, BackendConfig, EmbeddingModelConfig, UpstreamConfig
from serve_app.upstream.dispatcher import DispatcherCore
from serve_app.prompts.embedder import EmbedderCore
from serve_app.sentence.service import SentenceService, InProcessEncoderClient
from serve_app.sentence.encoder import EncoderCore, resolve_encoder_dir
from serve_app.prompts.checkpoint import resolve_model_dir
from serve_app.api.app import create_gateway_app
from serve_app.api.pipeline import InProcessPipeline
from serve_app.api.served_model import ServedModel

ANSWER = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
          "choices": [{"index": 0, "text": "ok", "logprobs": None, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
upstream = UpstreamConfig(backends=[BackendConfig(url="http://stub/v1")])
config = AppConfig(upstream=upstream, embedding_models=[EmbeddingModelConfig()])
stub = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, json=ANSWER)))
embedder = EmbedderCore.from_checkpoint(resolve_model_dir(config.model), config.model)
backend = InProcessPipeline(embedder, DispatcherCore(upstream, stub))
served = ServedModel.from_config(config, backend)
[model] = config.embedding_models
encoder = EncoderCore.from_checkpoint(resolve_encoder_dir(model), model)
embeddings = SentenceService.from_config(config, InProcessEncoderClient({model.name: encoder}))
app = create_gateway_app(served, embeddings)

def text(chars: int) -> str:
    if spec.get("kind") == "base64":
        import base64, random
        return base64.b64encode(random.Random(0).randbytes(chars))[:chars].decode()
    # Words of the demo encoder's vocabulary (an input that fits its 128 tokens), or prose.
    unit = "paris tokyo rome " if spec.get("words") else "The capital of France is Paris. "
    return (unit * (chars // len(unit) + 1))[:chars]

def body(chars: int, items: int | None = None) -> bytes:
    one = text(chars)
    items = items or spec.get("items")
    texts = one if items is None else [one] * items
    if route == "/v1/completions":
        return orjson.dumps({"model": "serve-app-demo", "prompt": texts, "max_tokens": 4})
    if route == "/v1/chat/completions":
        return orjson.dumps({"model": "serve-app-demo", "max_tokens": 4,
                             "messages": [{"role": "user", "content": one}]})
    if route == "/v2/embed":
        extra = {} if spec.get("truncate") else {"truncate": "NONE"}
        return orjson.dumps({"model": "serve-app-demo-embed", "texts": texts,
                             "embedding_types": ["float"], **extra})
    extra = {"truncate_prompt_tokens": -1} if spec.get("truncate") else {}
    return orjson.dumps({"model": "serve-app-demo-embed", "input": texts, **extra})

async def main() -> dict:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                 timeout=None) as client:
        headers = {"content-type": "application/json"}
        await client.post(route, content=body(200, items=1), headers=headers)  # warm-up
        payload = body(spec["chars"])
        gc.collect()
        reset_peak()
        idle, cpu0, t0 = rss(), cpu(), time.perf_counter()
        response = await client.post(route, content=payload, headers=headers)
        wall, used = time.perf_counter() - t0, cpu() - cpu0
        high = peak()
        gc.collect()
        kept = rss() - idle
        for _ in range(REPEATS - 1):  # the same again: what is kept must not grow
            await client.post(route, content=payload, headers=headers)
        del payload
        gc.collect()
        error = response.json().get("error") if response.status_code != 200 else None
        return {"status": response.status_code, "code": error and error.get("code"),
                "wall_s": wall, "cpu_s": used, "peak_above_idle_mb": (high - idle) / 1e6,
                "kept_above_idle_mb": kept / 1e6,
                "kept_after_repeats_mb": (rss() - idle) / 1e6}

print(json.dumps(asyncio.run(main())))
'''


def run_case(source: Path, route: str, spec: dict[str, Any],
             timeout_s: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(source), "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, route, json.dumps(spec)],
                              env=env, capture_output=True, text=True, timeout=timeout_s,
                              cwd=source)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": timeout_s}
    if done.returncode != 0:
        return {"status": f"exit {done.returncode}", "stderr": done.stderr[-400:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    return format(row[key], fmt) if isinstance(row.get(key), (int, float)) else "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT,
                        help="checkout whose serve_app is measured (default: this one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--only", default="",
                        help="run only the cases whose name contains this text")
    parser.add_argument("--repeats", type=int, default=3,
                        help="times each request is sent (the last column is after them)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.source), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    rows = []
    for name, route, spec in CASES:
        if args.only not in name:
            continue
        spec = {**spec, "repeats": args.repeats}
        row = {"case": name, **run_case(args.source.resolve(), route, spec, args.timeout_s)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [f"# Worst request cost at commit {commit}", "",
             f"Machine: {machine}. Command: `python benchmarks/worst_request.py"
             f"{'' if args.source.resolve() == ROOT else ' --source ' + str(args.source)}`.",
             "", "| request | status | wall s | CPU s | peak RSS above idle, MB | "
             f"RSS kept after, MB | kept after {args.repeats} of them, MB |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        status = f"{row['status']} {row.get('code') or ''}".strip()
        lines.append(f"| {row['case']} | {status} | {_cell(row, 'wall_s', '.3f')} | "
                     f"{_cell(row, 'cpu_s', '.3f')} | {_cell(row, 'peak_above_idle_mb', '.0f')}"
                     f" | {_cell(row, 'kept_above_idle_mb', '.0f')}"
                     f" | {_cell(row, 'kept_after_repeats_mb', '.0f')} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"worst_request_{commit}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"worst_request_{commit}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
