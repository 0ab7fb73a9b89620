"""Prompt transforms on CUDA: they run on the device, keyed rows are bit-identical in two
processes on the same device (what a fleet of Embedder replicas needs for the upstream's
prefix cache), and they match the CPU's within float tolerance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve_app.config import ModelConfig, TransformConfig
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.keyed_noise import KeyedSeeds, standard_normals

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KEY_ENV = "SERVE_APP_GPU_TEST_KEY"
PROMPTS = [[0, 5, 6, 7], [0, 5, 6, 9], list(range(200))]

_CHILD = """
import hashlib, sys
from pathlib import Path
from serve_app.config import ModelConfig, TransformConfig
from serve_app.prompts.embedder import EmbedderCore
config = TransformConfig(kind="keyed_gaussian", key_env=sys.argv[2])
core = EmbedderCore.from_checkpoint(Path(sys.argv[1]), ModelConfig(device="cuda"), config)
rows = core.rows([[0, 5, 6, 7], [0, 5, 6, 9], list(range(200))])
print(hashlib.sha256(b"".join(r.numpy().tobytes() for r in rows)).hexdigest())
"""


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> TransformConfig:
    monkeypatch.setenv(KEY_ENV, "gpu-test-key-0123456789")
    return TransformConfig(kind="keyed_gaussian", key_env=KEY_ENV)


def test_the_noise_stream_is_made_on_the_device() -> None:
    seeds = KeyedSeeds("gpu-test-key-0123456789")
    content = torch.arange(4096, dtype=torch.int64) * 7919 - 2**40
    lengths = [1024, 2048, 1024]
    low, high = seeds.seeds(content.cuda(), lengths)
    cpu_low, cpu_high = seeds.seeds(content, lengths)
    assert torch.equal(low.cpu(), cpu_low) and torch.equal(high.cpu(), cpu_high)  # integers
    noise = standard_normals(low, high, 4096)
    assert noise.is_cuda and noise.shape == (4096, 4096)
    cpu = standard_normals(cpu_low, cpu_high, 4096)
    torch.testing.assert_close(noise.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_keyed_rows_are_bit_identical_across_processes(demo_model_dir: Path,
                                                      keyed: TransformConfig) -> None:
    digests = {
        subprocess.run([sys.executable, "-c", _CHILD, str(demo_model_dir), KEY_ENV],
                       capture_output=True, text=True, check=True, env=dict(os.environ),
                       ).stdout.strip()
        for _ in range(2)
    }
    assert len(digests) == 1


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_keyed_rows_on_cuda_match_the_cpu(demo_model_dir: Path, keyed: TransformConfig,
                                          dtype: str) -> None:
    gpu = EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig(device="cuda", dtype=dtype),
                                       keyed)
    cpu = EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig(device="cpu", dtype=dtype),
                                       keyed)
    assert gpu.weight.is_cuda
    tolerance = 1e-5 if gpu.dtype == torch.float32 else 1e-2  # one bf16 ulp near the values
    for on_gpu, on_cpu in zip(gpu.rows(PROMPTS), cpu.rows(PROMPTS), strict=True):
        assert on_gpu.device.type == "cpu" and on_gpu.dtype == gpu.dtype
        torch.testing.assert_close(on_gpu.float(), on_cpu.float(), rtol=tolerance,
                                   atol=tolerance)


def test_gaussian_runs_on_cuda(demo_model_dir: Path) -> None:
    core = EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig(device="cuda"),
                                        TransformConfig(kind="gaussian", sigma=2.0))
    [rows] = core.rows([list(range(256))])
    raw = core.lookup([list(range(256))])[0]
    ratio = float((rows - raw).std() / core.weight.float().std())
    assert 1.9 < ratio < 2.1
