"""The embedder's CUDA path: the GPU lookup equals the CPU one, in the checkpoint's dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serve_app.config import ModelConfig
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.untrusted import EmbedsSpec, decode_prompt_embeds

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_cuda_lookup_equals_cpu_lookup(demo_model_dir: Path, dtype: str) -> None:
    gpu = EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig(device="cuda", dtype=dtype))
    cpu = EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig(device="cpu", dtype=dtype))
    assert gpu.weight.is_cuda and not cpu.weight.is_cuda
    batch = [[0, 5, 6, 7], [0, 9], list(range(200))]
    spec = EmbedsSpec(hidden_size=64, max_rows=512, max_bytes=1 << 20, dtype=gpu.dtype)
    for encoded, ids, expected in zip(gpu.embed_batch(batch), batch, cpu.lookup(batch),
                                      strict=True):
        assert encoded.rows == len(ids)
        decoded = decode_prompt_embeds(encoded.data, spec)
        assert decoded.device.type == "cpu"
        assert torch.equal(decoded, expected)


def test_cuda_stage_clock_times_each_stage_from_events(demo_model_dir: Path) -> None:
    """On CUDA the stages are timed by events read after the batch: every stage that ran
    is counted, and together they account for the batch's time and no more."""
    import time

    from serve_app.config import TransformConfig

    core = EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig(device="cuda"),
                                        TransformConfig(kind="gaussian", sigma=1.0))
    batch = [list(range(200))] * 16
    core.embed_measured(batch)  # warm up the kernels
    started = time.perf_counter()
    _, stats = core.embed_measured(batch)
    wall = time.perf_counter() - started
    assert set(stats.stage_seconds) == {"lookup", "transform", "encode"}
    assert all(seconds > 0 for seconds in stats.stage_seconds.values())
    assert sum(stats.stage_seconds.values()) <= wall * 1.01
