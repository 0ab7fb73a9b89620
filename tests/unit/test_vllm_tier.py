"""The vllm tier's own helpers, which CI can check without vLLM or a GPU: a case for every
forwarded field, the server's command and environment, the long-context checkpoint, and the
reading of vLLM's prefix-cache counters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serve_app.config import ModelConfig
from serve_app.prompts.checkpoint import read_model_spec
from serve_app.protocol.sampling import FORWARDED, STRUCTURED_OUTPUT_FIELDS
from tests.vllm.answers import sdk_options
from tests.vllm.fields import field_cases
from tests.vllm.gateway import Gateway, gateway_config
from tests.vllm.server import (
    ARGS_ENV,
    SERVED_NAME,
    SITE_ENV,
    long_context_copy,
    prefix_cache_counters,
    serve_command,
    serve_environment,
)


def test_every_forwarded_sampling_field_has_a_case() -> None:
    """A field added to the allowlist needs a request in the vllm tier."""
    assert set(field_cases(ord)) == FORWARDED - set(STRUCTURED_OUTPUT_FIELDS)


def test_every_case_goes_through_the_openai_sdk_whole() -> None:
    """The SDK refuses vLLM's own fields as keywords; each case must reach the wire with
    every field it sets."""
    bodies: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "created": 0,
                                         "model": "m", "choices": []})

    client = openai.OpenAI(base_url="http://vllm.test/v1", api_key="EMPTY",
                           http_client=httpx.Client(transport=httpx.MockTransport(answer)))
    for case in field_cases(ord).values():
        if case.get("stream"):
            continue  # a stream's body is built the same way; its answer would need SSE
        client.completions.create(**sdk_options({"model": "m", "prompt": "p", **case}))
        assert bodies[-1] == {"model": "m", "prompt": "p", **case}


def test_the_tiers_gateway_starts_and_serves_the_model(demo_model_dir: Path) -> None:
    """The tier's in-process gateway is built from the package's own app factory, which
    CI otherwise never runs it against: it starts, lists vLLM's served name and stops."""
    gateway = Gateway(gateway_config(demo_model_dir, "http://127.0.0.1:9")).start()
    try:
        models = gateway.client().models.list()
        assert [card.id for card in models.data] == [SERVED_NAME]
    finally:
        gateway.stop()


def test_prefix_cache_counters_add_up_every_engine() -> None:
    exposition = "\n".join([
        "# TYPE vllm:prefix_cache_queries_total counter",
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 2090.0',
        'vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9',
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 1008.0',
        'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 16.0',
        'vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 5.0',
    ])
    assert prefix_cache_counters(exposition) == (2090.0, 1024.0)
    assert prefix_cache_counters("") == (0.0, 0.0)


def test_long_context_copy_declares_the_context_and_keeps_the_weights(
        demo_model_dir: Path, tmp_path: Path) -> None:
    copy = long_context_copy(demo_model_dir, tmp_path / "copy", 2048)
    assert json.loads((copy / "config.json").read_text())["max_position_embeddings"] == 2048
    assert json.loads((copy / "tokenizer_config.json").read_text())["model_max_length"] == 2048
    assert read_model_spec(copy, ModelConfig(source=str(copy))).max_model_len == 2048
    assert (copy / "model.safetensors").read_bytes() == (
        demo_model_dir / "model.safetensors").read_bytes()


def test_serve_command_enables_prompt_embeds_and_takes_extra_arguments(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ARGS_ENV, "--attention-backend FLASH_ATTN")
    command = serve_command(tmp_path, 8123)
    assert command[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", str(tmp_path)]
    assert "--enable-prompt-embeds" in command
    assert command[-2:] == ["--attention-backend", "FLASH_ATTN"]


def test_the_vllm_site_is_the_servers_only_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/tmp/site:/repo")
    monkeypatch.setenv(SITE_ENV, "/tmp/vllm-site")
    assert serve_environment()["PYTHONPATH"] == "/tmp/vllm-site"
    monkeypatch.delenv(SITE_ENV)
    assert serve_environment()["PYTHONPATH"] == "/tmp/site:/repo"
