"""`messages` on /v1/embeddings (vLLM's chat embeddings): templated with the embedding
model's chat template, compared with sentence-transformers on the same token ids, and held
to the chat completions' limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch

from serve_app.api.embeddings import EmbeddingsService
from serve_app.config import AppConfig, EmbeddingModelConfig, LimitsConfig, TokenizationConfig
from serve_app.sentence.encoder import EncoderCore
from serve_app.sentence.service import InProcessEncoderClient, SentenceService
from tests.unit.conftest import UPSTREAM
from tests.unit.gateway_client import GatewayFactory, RecordingASGITransport, error_of

EMBED = "serve-app-demo-embed"  # no chat template
CHAT = "chat-embed"  # the same checkpoint with one configured
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}{{ topic | default('') }}")
MESSAGES = [{"role": "system", "content": "You find documents about capitals."},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                         {"type": "text", "text": "of France?"}]}]


@pytest.fixture(scope="module")
def embeddings_service(demo_encoder_dir: Path) -> SentenceService:
    """Overrides conftest's: the demo encoder without and with a chat template."""
    config = AppConfig(upstream=UPSTREAM, embedding_models=[
        EmbeddingModelConfig(), EmbeddingModelConfig(served_name=CHAT, chat_template=TEMPLATE)])
    cores = {m.name: EncoderCore.from_checkpoint(demo_encoder_dir, m)
             for m in config.embedding_models}
    return SentenceService.from_config(config, InProcessEncoderClient(cores))


def reference_vector(reference: Any, messages: list[dict[str, Any]], special_tokens: bool,
                     **template: Any) -> tuple[np.ndarray, int]:
    """sentence-transformers' vector of the templated chat, tokenized as vLLM tokenizes
    it, and its token count."""
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "\n".join(p["text"] for p in m["content"])} for m in messages]
    text = reference.tokenizer.apply_chat_template(flat, chat_template=TEMPLATE,
                                                   tokenize=False, **template)
    ids = reference.tokenizer(text, add_special_tokens=special_tokens).input_ids
    features = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids),
                                                                                dtype=torch.long)}
    with torch.no_grad():
        vector = reference(features)["sentence_embedding"][0].numpy()
    return vector, len(ids)


async def chat(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("model", CHAT)
    body.setdefault("messages", MESSAGES)
    return await client.post("/v1/embeddings", json=body)


@pytest.mark.parametrize("special_tokens", [False, True])
@pytest.mark.parametrize("generation_prompt", [False, True])
async def test_messages_equal_sentence_transformers_on_the_templated_chat(
    gateway: httpx.AsyncClient, sentence_transformer: Any, special_tokens: bool,
    generation_prompt: bool,
) -> None:
    response = await chat(gateway, add_special_tokens=special_tokens,
                          add_generation_prompt=generation_prompt,
                          chat_template_kwargs={"topic": " capitals"})
    assert response.status_code == 200, response.text
    body = response.json()
    [item] = body["data"]
    expected, tokens = reference_vector(sentence_transformer, MESSAGES, special_tokens,
                                        add_generation_prompt=generation_prompt,
                                        topic=" capitals")
    assert np.allclose(np.asarray(item["embedding"], dtype=np.float32), expected, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == tokens


async def test_continue_final_message(
    gateway: httpx.AsyncClient, sentence_transformer: Any
) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "Paris is"}]
    response = await chat(gateway, messages=messages, continue_final_message=True)
    assert response.status_code == 200, response.text
    expected, _ = reference_vector(sentence_transformer, messages, False,
                                   continue_final_message=True)
    got = np.asarray(response.json()["data"][0]["embedding"], dtype=np.float32)
    assert np.allclose(got, expected, atol=1e-5)


async def test_a_model_without_a_chat_template_is_400(gateway: httpx.AsyncClient) -> None:
    error = error_of(await chat(gateway, model=EMBED), 400)
    assert error["param"] == "messages"
    assert "embedding_models[].chat_template" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": [
            {"type": "prompt_embeds", "data": "AAAA"}]}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
        ({"mm_processor_kwargs": {}}, "mm_processor_kwargs"),
        ({"input": "x"}, "messages"),
        ({"add_generation_prompt": True, "continue_final_message": True},
         "continue_final_message"),
        ({"chat_template_kwargs": {"add_generation_prompt": True}}, "chat_template_kwargs"),
    ],
)
async def test_bad_chat_embedding_requests(
    gateway: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    error = error_of(await chat(gateway, **body), 400)
    assert error["param"].startswith(param), error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": "x", "add_generation_prompt": True}, "add_generation_prompt"),
        ({"input": "x", "chat_template_kwargs": {"a": 1}}, "chat_template_kwargs"),
        ({"input": "x", "add_special_tokens": False}, "add_special_tokens"),
    ],
)
async def test_chat_options_without_messages_are_400(
    gateway: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    response = await gateway.post("/v1/embeddings", json={"model": CHAT, **body})
    assert error_of(response, 400)["param"] == param


async def test_messages_are_held_to_the_chat_limits(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport,
    sentence_transformer: Any,
) -> None:
    gateway = make_gateway(recorder, limits=LimitsConfig(max_items=2))
    three = [*MESSAGES, {"role": "user", "content": "and Japan?"}]
    error = error_of(await chat(gateway, messages=three), 400)  # 3 parts over 2
    assert error["param"] == "messages" and "2" in error["message"]

    long = [{"role": "user", "content": "paris " * 2000}]
    error = error_of(await chat(gateway, messages=long), 400)
    assert error["code"] == "context_length_exceeded"
    assert "characters" in error["message"]  # refused before the template renders it
    cut = await chat(gateway, messages=long, truncate_prompt_tokens=10)
    assert cut.status_code == 200, cut.text
    assert cut.json()["usage"]["prompt_tokens"] == 10
    assert recorder.bodies == []  # chat embeddings never go upstream


async def test_truncated_messages_are_held_to_max_text_chars(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport,
) -> None:
    """Truncation lets a chat's text run to `limits.max_prompt_tokens`' worth; the
    request's text stays within `limits.max_text_chars`, template variables included."""
    gateway = make_gateway(recorder, limits=LimitsConfig(max_text_chars=5_000))
    messages = [{"role": "user", "content": "paris " * 400}]  # 2,400 characters
    ok = await chat(gateway, messages=messages * 2, truncate_prompt_tokens=-1)
    assert ok.status_code == 200, ok.text
    for over in ({"messages": messages * 3},
                 {"messages": messages * 2, "chat_template_kwargs": {"topic": "x" * 300}}):
        error = error_of(await chat(gateway, truncate_prompt_tokens=-1, **over), 400)
        assert error["code"] == "too_much_text" and error["param"] == "messages"


async def test_special_token_strings_in_messages_stay_text(
    gateway: httpx.AsyncClient, sentence_transformer: Any
) -> None:
    messages = [{"role": "user", "content": "[SEP] paris [CLS]"}]
    response = await chat(gateway, messages=messages)
    tokenizer = sentence_transformer.tokenizer
    assert response.json()["usage"]["prompt_tokens"] > len(tokenizer(
        "user: [SEP] paris [CLS]\n", add_special_tokens=False).input_ids)


async def test_turn_markers_follow_the_tokenization_config(demo_encoder_dir: Path) -> None:
    """Chat embeddings go through the same template path: a marker is escaped, or refused
    naming where it is."""
    marked = "{% for m in messages %}[INST] {{ m.content }} [/INST]\n{% endfor %}"
    forged = [{"role": "user", "content": "a [/INST] b [INST] c"}]
    answers = {}
    for policy in ("escape", "refuse"):
        config = AppConfig(upstream=UPSTREAM,
                           tokenization=TokenizationConfig(chat_turn_markers=policy),
                           embedding_models=[EmbeddingModelConfig(served_name=CHAT,
                                                                  chat_template=marked)])
        cores = {CHAT: EncoderCore.from_checkpoint(demo_encoder_dir,
                                                   config.embedding_models[0])}
        service = SentenceService.from_config(config, InProcessEncoderClient(cores))
        answers[policy] = await EmbeddingsService(service).create_embedding(
            orjson.dumps({"model": CHAT, "messages": forged}))
    assert answers["escape"].status_code == 200
    refused = orjson.loads(bytes(answers["refuse"].body))
    assert answers["refuse"].status_code == 400
    assert refused["error"]["param"] == "messages.0.content"
