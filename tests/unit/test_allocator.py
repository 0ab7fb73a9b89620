"""The malloc tuning that keeps payload buffers in the heap (glibc only)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serve_app.allocator import PAYLOAD_ENV_VARS, keep_payload_memory
from serve_app.deployments import Dispatcher, Embedder, Gateway

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Payload-sized buffers made and dropped on a worker thread, as Serve runs replica code;
# prints the page faults of the rounds after the first.
_WORKER_THREAD_FAULTS = """
import resource, threading
from serve_app.allocator import keep_payload_memory
keep_payload_memory()
faults = []
def batches():
    for round in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [b"x" * (20 << 20) for _ in range(8)]
        del buffers
        if round:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=batches)
thread.start()
thread.join()
print(max(faults))
"""


def _worker_thread_faults(env: dict[str, str]) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in PAYLOAD_ENV_VARS}
    done = subprocess.run([sys.executable, "-c", _WORKER_THREAD_FAULTS], env={**clean, **env},
                          capture_output=True, text=True, check=True, timeout=60)
    return int(done.stdout.split()[-1])


@glibc_only
def test_thresholds_are_raised_on_glibc() -> None:
    assert keep_payload_memory() is True
    assert keep_payload_memory() is True  # idempotent: every replica may call it


@glibc_only
def test_payload_environment_keeps_worker_thread_buffers_in_the_heap() -> None:
    # 160 MiB a round is ~41k pages: without the environment most are fresh every round
    # (25.6k faults here), with it the same heap pages serve every round (none).
    fresh = _worker_thread_faults({})
    kept = _worker_thread_faults(PAYLOAD_ENV_VARS)
    assert fresh > 20_000
    assert kept < 1_000


def test_payload_replicas_carry_the_environment_in_code_and_in_serve_config() -> None:
    for deployment in (Embedder, Dispatcher, Gateway):
        options = deployment.ray_actor_options
        assert options["runtime_env"]["env_vars"] == PAYLOAD_ENV_VARS, deployment.name
    # serve_config.yaml overrides ray_actor_options, so its app-level runtime_env carries it.
    config = yaml.safe_load((Path(__file__).parents[2] / "serve_config.yaml").read_text())
    gateway = next(app for app in config["applications"] if app["name"] == "gateway")
    assert gateway["runtime_env"]["env_vars"] == PAYLOAD_ENV_VARS
