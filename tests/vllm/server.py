"""A real vLLM server for the vllm tier: where its install is found, how it is started on the
demo checkpoint, and what its `/metrics` says of the prefix cache. `benchmarks/vllm_upstream.py`
starts its server with the same class and its own options.

vLLM may live outside the test's own environment (on the GPU host it is unpacked into a
folder of its own, `tests/vllm/gpu-run.sh`, so that its pinned FastAPI and pydantic never
meet the gateway's): `SERVE_APP_VLLM_SITE` names that folder, and the server process gets
it as its only `PYTHONPATH`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.machinery import PathFinder
from pathlib import Path

import httpx
import pytest

from tests.upstream_servers import free_port

SITE_ENV = "SERVE_APP_VLLM_SITE"
"""Folders (os.pathsep-separated) holding vLLM and what it needs beyond the host's own
packages; empty: vLLM is installed where the tests run."""
ARGS_ENV = "SERVE_APP_VLLM_ARGS"
"""Extra `vllm serve` arguments, split on whitespace (an attention backend, say)."""
REQUIRE_ENV = "SERVE_APP_REQUIRE_VLLM"
"""`1`: a missing vLLM or CUDA fails the tier instead of skipping it (the GPU host's run)."""

SERVED_NAME = "serve-app-demo"
MAX_MODEL_LEN = 2048
"""Room for the prefix-cache test's 1,000-token system prompt: the demo checkpoint is
copied with this context (`long_context_copy`), which changes no weight."""
MAX_LOGPROBS = 5
"""vLLM's `--max-logprobs`, below the gateway's `limits.max_logprobs` (20), so a request the
gateway passes can meet vLLM's own refusal."""
START_TIMEOUT_S = 300.0


def site_paths() -> list[str]:
    return [path for path in os.environ.get(SITE_ENV, "").split(os.pathsep) if path]


def missing() -> str | None:
    """Why the tier cannot run here, or None."""
    if PathFinder.find_spec("vllm", [*site_paths(), *sys.path]) is None:
        return (f"needs vLLM: install it, or name a folder holding it in {SITE_ENV} "
                "(tests/vllm/gpu-run.sh does so on the GPU host)")
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA device for vLLM"
    return None


MISSING = missing()
TIER = [pytest.mark.vllm, pytest.mark.skipif(MISSING is not None, reason=f"vllm tier: {MISSING}")]
"""Every module of the tier starts with `pytestmark = TIER`."""


def long_context_copy(model_dir: Path, target: Path, context: int) -> Path:
    """The checkpoint with `context` positions: Llama's RoPE has no length of its own, so
    only the declared limit (config and tokenizer) changes."""
    shutil.copytree(model_dir, target)
    for name, key in (("config.json", "max_position_embeddings"),
                      ("tokenizer_config.json", "model_max_length")):
        path = target / name
        data = json.loads(path.read_text())
        data[key] = context
        path.write_text(json.dumps(data, indent=2))
    return target


TIER_OPTIONS = (
    "--served-model-name", SERVED_NAME,
    "--dtype", "bfloat16",
    "--max-model-len", str(MAX_MODEL_LEN),
    "--max-logprobs", str(MAX_LOGPROBS),
    "--gpu-memory-utilization", "0.2",
    "--enforce-eager",
    "--enable-prefix-caching",
    "--seed", "0",
)
"""The tier's server on the demo checkpoint: eager (no compile, no CUDA graphs: a fast
start), a small share of the GPU, prefix caching on (its default, said explicitly)."""


def serve_command(model_dir: Path, port: int,
                  options: Sequence[str] = TIER_OPTIONS) -> list[str]:
    """`vllm serve` on the checkpoint with prompt embeddings enabled, then `options`, then
    the extra arguments of `SERVE_APP_VLLM_ARGS`."""
    return [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-prompt-embeds",
        *options,
        *os.environ.get(ARGS_ENV, "").split(),
    ]


def serve_environment() -> dict[str, str]:
    # The carried site leaves FlashInfer out (wheels.txt), and vLLM's sampler imports it to
    # probe support unless told not to use it.
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    if site_paths():
        env["PYTHONPATH"] = os.pathsep.join(site_paths())
    return env


@dataclass
class VllmServer:
    model_dir: Path
    log: Path
    options: Sequence[str] = TIER_OPTIONS
    start_timeout_s: float = START_TIMEOUT_S
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Starts the server without waiting for it (`wait_ready` does)."""
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(serve_command(self.model_dir, self.port,
                                                          self.options),
                                            env=serve_environment(), stdout=out,
                                            stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        assert self.process is not None, "launch first"
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.process.returncode}):\n"
                                   + self.log_tail())
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve did not answer in {self.start_timeout_s:.0f} s:\n"
                           + self.log_tail())

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def prefix_cache(self) -> tuple[float, float]:
        """vLLM's prefix-cache counters, summed over engines: (queried, hit) tokens."""
        return prefix_cache_counters(httpx.get(f"{self.url}/metrics", timeout=10).text)


_COUNTER = re.compile(r"^vllm:prefix_cache_(queries|hits)(?:_total)?(?:\{[^}]*\})? (\S+)$",
                      re.MULTILINE)


def prefix_cache_counters(exposition: str) -> tuple[float, float]:
    """`vllm:prefix_cache_queries` and `vllm:prefix_cache_hits` (Prometheus counters, so
    exposed with `_total`) from a /metrics page."""
    totals = {"queries": 0.0, "hits": 0.0}
    for name, value in _COUNTER.findall(exposition):
        totals[name] += float(value)
    return totals["queries"], totals["hits"]
