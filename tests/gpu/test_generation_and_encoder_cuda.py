"""CUDA paths of the sentence encoder and of the reference upstream's decode loop."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from serve_app.config import EmbeddingModelConfig, ModelConfig, ReferenceConfig
from serve_app.protocol import CompletionRequest
from serve_app.reference.server import ReferenceServer
from serve_app.sentence.encoder import EncoderCore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_encoder_equals_cpu_encoder(demo_encoder_dir: Path) -> None:
    gpu = EncoderCore.from_checkpoint(demo_encoder_dir, EmbeddingModelConfig(device="cuda"))
    cpu = EncoderCore.from_checkpoint(demo_encoder_dir, EmbeddingModelConfig(device="cpu"))
    assert gpu.model.device.type == "cuda"
    requests = [[[2, 60, 61, 3], [2, 70, 3]], [[2] + list(range(100, 180)) + [3]]]
    for got, expected in zip(gpu.encode(requests), cpu.encode(requests), strict=True):
        assert got.device.type == "cpu"
        assert torch.allclose(got, expected, atol=1e-4)


def test_cuda_greedy_generation_equals_cpu(cache_dir: Path, demo_tokenizer: Any,
                                           demo_causal_lm: Any) -> None:
    ids = torch.tensor(demo_tokenizer("What is the capital of France?").input_ids)
    with torch.no_grad():
        tensor = demo_causal_lm.get_input_embeddings()(ids)
    request = CompletionRequest(model="serve-app-demo", prompt_embeds="unused", max_tokens=24,
                                temperature=0, logprobs=2)
    texts = []
    for device in ("cuda", "cpu"):
        backend = ReferenceServer.from_config(
            ReferenceConfig(model=ModelConfig(device=device)))
        pieces: list[str] = []

        def emit(index: int, delta: Any, finish: str | None, reason: Any,
                 pieces: list[str] = pieces) -> None:
            if delta:
                pieces.append(delta.text)

        assert backend.run([tensor], request, emit, threading.Event()) == 24
        texts.append("".join(pieces))
    assert texts[0] and texts[0] == texts[1]
