"""One real vLLM server for the whole tier (`vllm serve --enable-prompt-embeds` on a copy of
the demo checkpoint with room for 2,048 positions) and gateways in front of it.

Without vLLM or a CUDA device every test of the tier is skipped with the reason
(`server.TIER`), or the session stops where SERVE_APP_REQUIRE_VLLM=1 says it must run.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pybase64
import pytest
import torch

from tests.vllm.gateway import Gateway, gateway_config
from tests.vllm.server import MAX_MODEL_LEN, MISSING, REQUIRE_ENV, VllmServer, long_context_copy

if MISSING and os.environ.get(REQUIRE_ENV) == "1":
    raise pytest.UsageError(f"{REQUIRE_ENV}=1 but the vllm tier cannot run: {MISSING}")


@pytest.fixture(scope="session")
def vllm_model_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return long_context_copy(demo_model_dir, tmp_path_factory.mktemp("vllm") / "demo-2k",
                             MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def vllm_server(vllm_model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    server = VllmServer(vllm_model_dir, tmp_path_factory.mktemp("vllm-log") / "vllm.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm(vllm_server: VllmServer) -> openai.OpenAI:
    """vLLM itself: what the gateway's answers are held against."""
    return openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="EMPTY", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="session")
def start_gateway(vllm_model_dir: Path,
                  vllm_server: VllmServer) -> Iterator[Callable[..., Gateway]]:
    """`start_gateway(**AppConfig sections)`: a gateway in front of the session's vLLM."""
    started: list[Gateway] = []

    def start(**sections: Any) -> Gateway:
        gateway = Gateway(gateway_config(vllm_model_dir, vllm_server.url, **sections)).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="session")
def gateway(start_gateway: Callable[..., Gateway]) -> openai.OpenAI:
    """The gateway as shipped (no transform), in front of vLLM."""
    return start_gateway().client()


@pytest.fixture(scope="session")
def client_embeds(vllm_model_dir: Path) -> Callable[..., str]:
    """`client_embeds(text, bos=True)`: what a client computes itself, base64 of torch.save
    of its text's input embeddings (float32, from the checkpoint with transformers; vLLM
    casts them to bf16), led by the BOS row unless `bos` is false."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    table = AutoModelForCausalLM.from_pretrained(vllm_model_dir).get_input_embeddings()

    def encode(text: str, bos: bool = True) -> str:
        ids = tokenizer(text, add_special_tokens=bos).input_ids
        with torch.no_grad():
            rows = table(torch.tensor(ids))
        buffer = io.BytesIO()
        torch.save(rows, buffer)
        return pybase64.b64encode(buffer.getvalue()).decode("ascii")

    return encode
