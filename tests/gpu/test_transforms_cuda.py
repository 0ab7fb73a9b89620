"""Prompt transforms on CUDA: they run on the device, keyed rows are bit-identical in two
processes and whatever the batch (what a fleet of Embedder replicas needs for the upstream's
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
from serve_app.prompts.keyed_noise import KeyedSeeds, SeedBinding
from serve_app.prompts.normals import add_noise, standard_normals
from serve_app.prompts.tenants import SHARED_TENANT, api_key_tenant

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KEY_ENV = "SERVE_APP_GPU_TEST_KEY"
PROMPTS = [[0, 5, 6, 7], [0, 5, 6, 9], list(range(200))]
TENANTS = [SHARED_TENANT, api_key_tenant("sk-gpu-one"), api_key_tenant("sk-gpu-two")]

_CHILD = """
import hashlib, sys
from pathlib import Path
from serve_app.config import ModelConfig, TransformConfig
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.tenants import SHARED_TENANT, api_key_tenant
config = TransformConfig(kind="keyed_gaussian", key_env=sys.argv[2])
core = EmbedderCore.from_checkpoint(Path(sys.argv[1]), ModelConfig(device="cuda"), config)
tenants = [SHARED_TENANT, api_key_tenant("sk-gpu-one"), api_key_tenant("sk-gpu-two")]
rows = core.rows([[0, 5, 6, 7], [0, 5, 6, 9], list(range(200))], tenants)
print(hashlib.sha256(b"".join(r.numpy().tobytes() for r in rows)).hexdigest())
"""


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> TransformConfig:
    monkeypatch.setenv(KEY_ENV, "gpu-test-key-0123456789")
    return TransformConfig(kind="keyed_gaussian", key_env=KEY_ENV)


def test_the_noise_stream_is_made_on_the_device() -> None:
    seeds = KeyedSeeds("gpu-test-key-0123456789",
                       SeedBinding(sigma=1.0, dtype=torch.bfloat16, model="gpu-test"))
    content = torch.arange(4096, dtype=torch.int64) * 7919 - 2**40
    lengths = [1024, 2048, 1024]
    on_gpu = seeds.seeds(content.cuda(), lengths, TENANTS)
    on_cpu = seeds.seeds(content, lengths, TENANTS)
    assert torch.equal(on_gpu.cpu(), on_cpu)  # integers
    noise = standard_normals(on_gpu, 4096)
    assert noise.is_cuda and noise.shape == (4096, 4096) and noise.dtype == torch.float64
    torch.testing.assert_close(noise.cpu(), standard_normals(on_cpu, 4096), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noisy_rows_on_cuda_are_the_float64_sum_rounded(dtype: torch.dtype) -> None:
    """One rounding from float64 on the device too (a fused multiply-add may move the
    float64 sum by its last bit, so at most one wire ulp from the CPU's formula)."""
    seeds = torch.arange(512, dtype=torch.int64, device="cuda") * 104729 - 2**40
    rows = (torch.randn(512, 1000, device="cuda") * 0.02).to(dtype)
    noised = add_noise(rows, seeds, 0.013)
    expected = (rows.double() + 0.013 * standard_normals(seeds, 1000)).to(dtype)
    assert noised.dtype == dtype
    differing = noised != expected
    assert float(differing.float().mean()) < 1e-4
    gap = (noised.double() - expected.double()).abs()[differing]
    ulp = torch.finfo(dtype).eps * expected.double().abs()[differing]
    assert bool((gap <= ulp).all())


def test_a_rows_noise_on_cuda_does_not_depend_on_its_batch() -> None:
    seeds = torch.randint(-(2**63), 2**63 - 1, (3000,), dtype=torch.int64, device="cuda")
    rows = torch.zeros(3000, 1024, dtype=torch.bfloat16, device="cuda")
    whole = add_noise(rows, seeds, 0.5)
    for start, stop in ((0, 1), (5, 6), (100, 357), (2999, 3000)):
        assert torch.equal(add_noise(rows[start:stop], seeds[start:stop], 0.5),
                           whole[start:stop])


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
    for on_gpu, on_cpu in zip(gpu.rows(PROMPTS, TENANTS), cpu.rows(PROMPTS, TENANTS),
                              strict=True):
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
