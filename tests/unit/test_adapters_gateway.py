"""Prompt adapters through the whole gateway in one process, against the reference
upstream: selected by model name, answered as PEFT's own model answers, counted in usage
and in the length checks, listed with their parent, keyed into the route."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pybase64
import pytest
import torch

from serve_app.api.served_model import ServedModel
from serve_app.config import AdapterConfig, AppConfig, ModelConfig
from serve_app.prompts.checkpoint import read_model_spec
from serve_app.prompts.embedder import EmbedderCore, SplicedPrompt
from serve_app.protocol import CompletionRequest
from tests.peft_adapters import peft_greedy, peft_model
from tests.unit.gateway_client import (
    FRANCE,
    MODEL,
    GatewayFactory,
    RecordingASGITransport,
    error_of,
    ok,
    post,
)

TUNED = "demo-tuned"
MAX_TOKENS = 12
LEAD_IN = "the quick"
"""A prompt whose greedy answer the trained soft prompt changes (tests.peft_adapters)."""


@pytest.fixture(scope="module")
def model_config(prompt_tuning_dir: Path) -> ModelConfig:
    return ModelConfig(adapters=[AdapterConfig(name=TUNED, path=str(prompt_tuning_dir))])


@pytest.fixture(scope="module")
def adapted_core(demo_model_dir: Path, model_config: ModelConfig) -> EmbedderCore:
    return EmbedderCore.from_checkpoint(demo_model_dir, model_config)


@pytest.fixture(scope="module")
def peft(demo_model_dir: Path, prompt_tuning_dir: Path) -> Any:
    return peft_model(demo_model_dir, prompt_tuning_dir)


@pytest.fixture
def adapted(make_gateway: GatewayFactory, recorder: RecordingASGITransport,
            adapted_core: EmbedderCore, model_config: ModelConfig) -> httpx.AsyncClient:
    return make_gateway(recorder, core=adapted_core, model=model_config)


def sent_rows(body: bytes) -> list[torch.Tensor]:
    embeds = orjson.loads(body)["prompt_embeds"]
    return [torch.load(io.BytesIO(pybase64.b64decode(item)), weights_only=True)
            for item in (embeds if isinstance(embeds, list) else [embeds])]


def virtual_tokens(core: EmbedderCore) -> int:
    return core.adapters[TUNED].virtual_tokens


async def test_a_completion_answers_as_peft_does(
        adapted: httpx.AsyncClient, peft: Any, demo_tokenizer: Any,
        adapted_core: EmbedderCore) -> None:
    ids = list(demo_tokenizer(LEAD_IN).input_ids)
    expected = peft_greedy(peft, ids, MAX_TOKENS)
    answer = await ok(adapted, model=TUNED, prompt=LEAD_IN, max_tokens=MAX_TOKENS,
                      temperature=0)
    assert answer["model"] == TUNED
    assert answer["choices"][0]["text"] == demo_tokenizer.decode(expected,
                                                                 skip_special_tokens=True)
    assert answer["usage"]["completion_tokens"] == len(expected)
    assert answer["usage"]["prompt_tokens"] == virtual_tokens(adapted_core) + len(ids)
    base = await ok(adapted, prompt=LEAD_IN, max_tokens=MAX_TOKENS, temperature=0)
    assert base["choices"][0]["text"] != answer["choices"][0]["text"]  # the adapter matters


async def test_the_upstream_gets_the_adapter_rows_before_every_prompt(
        adapted: httpx.AsyncClient, recorder: RecordingASGITransport,
        adapted_core: EmbedderCore, demo_tokenizer: Any) -> None:
    await ok(adapted, model=TUNED, prompt=[FRANCE, "Hi"], max_tokens=2)
    body = orjson.loads(recorder.bodies[-1])
    assert body["model"] == MODEL  # the upstream serves the base model
    lead = adapted_core.adapters[TUNED].rows
    for text, rows in zip([FRANCE, "Hi"], sent_rows(recorder.bodies[-1]), strict=True):
        [plain] = adapted_core.lookup([list(demo_tokenizer(text).input_ids)])
        assert torch.equal(rows, torch.cat([lead, plain]))


async def test_a_chat_answers_as_peft_does_on_the_templated_conversation(
        adapted: httpx.AsyncClient, peft: Any, demo_tokenizer: Any,
        recorder: RecordingASGITransport, adapted_core: EmbedderCore) -> None:
    messages = [{"role": "user", "content": FRANCE}]
    ids = list(demo_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
               .input_ids)
    expected = peft_greedy(peft, ids, MAX_TOKENS)
    response = await post(adapted, "/v1/chat/completions", model=TUNED, messages=messages,
                          max_tokens=MAX_TOKENS, temperature=0)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == TUNED
    assert answer["choices"][0]["message"]["content"] == demo_tokenizer.decode(
        expected, skip_special_tokens=True)
    assert answer["usage"]["prompt_tokens"] == virtual_tokens(adapted_core) + len(ids)
    [rows] = sent_rows(recorder.bodies[-1])
    assert torch.equal(rows[:virtual_tokens(adapted_core)],
                       adapted_core.adapters[TUNED].rows)


async def test_a_stream_names_the_adapter(adapted: httpx.AsyncClient) -> None:
    async with adapted.stream("POST", "/v1/completions", json={
            "model": TUNED, "prompt": FRANCE, "max_tokens": 3, "stream": True}) as response:
        events = [line async for line in response.aiter_lines() if line.startswith("data: {")]
    assert events and all(orjson.loads(e[6:])["model"] == TUNED for e in events)


async def test_models_list_the_adapter_with_its_parent(adapted: httpx.AsyncClient) -> None:
    listed = (await adapted.get("/v1/models")).json()["data"]
    cards = {card["id"]: card for card in listed}
    assert cards[TUNED]["parent"] == MODEL and cards[MODEL]["parent"] is None
    one = await adapted.get(f"/v1/models/{TUNED}")
    assert one.status_code == 200 and one.json()["parent"] == MODEL


async def test_an_unknown_model_is_still_a_404(adapted: httpx.AsyncClient) -> None:
    completion = await post(adapted, model="demo-other", prompt="x")
    chat = await post(adapted, "/v1/chat/completions", model="demo-other",
                      messages=[{"role": "user", "content": "x"}])
    for response in (completion, chat):
        assert error_of(response, 404)["code"] == "model_not_found"


async def test_the_context_check_counts_the_virtual_tokens(
        adapted: httpx.AsyncClient, adapted_core: EmbedderCore, demo_tokenizer: Any,
        demo_model_dir: Path) -> None:
    context = read_model_spec(demo_model_dir, ModelConfig()).max_model_len
    ids = list(demo_tokenizer(FRANCE).input_ids)
    fits = context - len(ids)  # room for the prompt alone, not for the virtual tokens
    assert (await post(adapted, prompt=ids, max_tokens=fits)).status_code != 400
    error = error_of(await post(adapted, model=TUNED, prompt=ids, max_tokens=fits), 400)
    assert error["code"] == "context_length_exceeded"
    assert f"prompt has {virtual_tokens(adapted_core) + len(ids)} tokens" in error["message"]


async def test_the_route_key_covers_the_adapter_rows(
        model_config: ModelConfig, demo_tokenizer: Any) -> None:
    """The key is the one of the same rows sent as a client tensor: the backend's prefix
    cache keys on rows, whoever made them."""
    served = ServedModel.from_config(AppConfig(model=model_config), pipeline=cast(Any, None))
    adapter = served.select(TUNED)
    assert adapter is not None
    ids = list(demo_tokenizer(FRANCE).input_ids)
    request = CompletionRequest(model=TUNED, prompt=FRANCE)
    led = await served.upstream_call(request, [ids], "tenant", adapter=adapter)
    plain = await served.upstream_call(request, [ids], "tenant")
    as_client = await served.upstream_call(
        request, [SplicedPrompt((adapter.rows.clone(), ids))], "tenant")
    assert led.prefix_key is not None and led.prefix_key != plain.prefix_key
    assert led.prefix_key == as_client.prefix_key
    assert led.adapter == TUNED and plain.adapter is None
