"""Sentence embeddings through the real Serve graph: OpenAI SDK and a Cohere-style call."""

from __future__ import annotations

import asyncio
from typing import Any

import cohere
import httpx
import numpy as np
import openai
import pytest

from serve_app.sentence.quantize import BUILTIN_TEXTS

pytestmark = pytest.mark.integration

EMBED = "serve-app-demo-embed"
TEXTS = ["What is the capital of France?", "Paris", "Tell me about Japan.",
         "the sun is a star " * 5]


def assert_same_directions(got: np.ndarray, expected: np.ndarray) -> None:
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == expected.shape
    cosine = (got * expected).sum(1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.9999, cosine


def test_models_list_the_embedding_model(client) -> None:  # type: ignore[no-untyped-def]
    assert EMBED in [model.id for model in client.models.list()]


@pytest.mark.parametrize("encoding", [openai.NOT_GIVEN, "float"])
def test_sdk_vectors_equal_sentence_transformers(  # type: ignore[no-untyped-def]
    client, sentence_transformer, encoding: Any
) -> None:
    # The SDK asks for base64 by default and decodes it itself.
    response = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format=encoding)
    got = np.array([item.embedding for item in response.data])
    assert [item.index for item in response.data] == [0, 1, 2, 3]
    assert_same_directions(got, sentence_transformer.encode(TEXTS))
    tokens = sum(len(sentence_transformer.tokenizer(t).input_ids) for t in TEXTS)
    assert response.usage.prompt_tokens == tokens == response.usage.total_tokens


def test_sdk_dimensions(client, sentence_transformer) -> None:  # type: ignore[no-untyped-def]
    response = client.embeddings.create(model=EMBED, input=TEXTS, dimensions=16)
    got = np.array([item.embedding for item in response.data])
    full = sentence_transformer.encode(TEXTS)[:, :16]
    assert np.allclose(got, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5)


def test_sdk_errors(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBED, input="x", dimensions=12)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBED, input="paris " * 300)


async def test_concurrent_requests_keep_their_vectors(  # type: ignore[no-untyped-def]
    async_client, sentence_transformer
) -> None:
    expected = sentence_transformer.encode(TEXTS)

    async def one(index: int) -> np.ndarray:
        texts = TEXTS[index % 4:] + TEXTS[: index % 4]
        response = await async_client.embeddings.create(model=EMBED, input=texts)
        got = np.array([item.embedding for item in response.data])
        return np.roll(got, index % 4, axis=0)

    for got in await asyncio.gather(*(one(i) for i in range(12))):
        assert_same_directions(got, expected)


def test_a_max_items_request_of_640_character_texts_is_served(  # type: ignore[no-untyped-def]
    client, serve_graph, sentence_transformer
) -> None:
    """2,048 inputs (limits.max_items) of 640 characters on the idle gateway: a few
    Encoder calls at a time fill no queue, so no 429 (the client does not retry)."""
    texts = [f"{i} " + ("paris tokyo rome " * 38)[: 640 - len(f"{i} ")] for i in range(2048)]
    response = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    assert len(response.data) == 2048
    picks = [0, 1024, 2047]
    got = np.array([response.data[i].embedding for i in picks])
    assert_same_directions(got, sentence_transformer.encode([texts[i] for i in picks]))
    cohere_answer = httpx.post(f"{serve_graph.base_url}/v2/embed", timeout=120, json={
        "model": EMBED, "texts": texts, "embedding_types": ["float"]})
    assert cohere_answer.status_code == 200, cohere_answer.text[:300]


def test_cohere_embed(serve_graph, sentence_transformer) -> None:  # type: ignore[no-untyped-def]
    response = httpx.post(f"{serve_graph.base_url}/v2/embed", timeout=60, json={
        "model": EMBED, "texts": TEXTS, "input_type": "search_query",
        "embedding_types": ["float", "ubinary"], "truncate": "END"})
    assert response.status_code == 200, response.text
    body = response.json()
    floats = np.asarray(body["embeddings"]["float"], dtype=np.float32)
    assert_same_directions(floats, sentence_transformer.encode(TEXTS, prompt_name="query"))
    assert body["embeddings"]["ubinary"] == np.packbits(floats > 0, axis=-1).tolist()
    assert body["texts"] == TEXTS and body["meta"]["billed_units"]["input_tokens"] > 0
    missing = httpx.post(f"{serve_graph.base_url}/v2/embed", json={"model": "x", "texts": ["a"]})
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


def quantized(rows: np.ndarray, precision: str, ranges: np.ndarray) -> np.ndarray:
    from sentence_transformers.util.quantization import quantize_embeddings

    return np.asarray(quantize_embeddings(rows, precision=precision, ranges=ranges))


@pytest.mark.parametrize("size", [None, 16])
def test_cohere_sdk_gets_every_type(  # type: ignore[no-untyped-def]
    serve_graph, sentence_transformer, size: int | None
) -> None:
    client = cohere.ClientV2(base_url=serve_graph.base_url, api_key="EMPTY", timeout=120)
    kinds = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    answer = client.embed(model=EMBED, texts=TEXTS, input_type="search_document",
                          embedding_types=kinds, output_dimension=size)
    got = answer.embeddings
    floats = np.asarray(got.float_, dtype=np.float32)
    expected = sentence_transformer.encode(TEXTS, prompt_name="document", truncate_dim=size)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(floats, expected, atol=1e-5)
    # int8 / uint8: sentence-transformers' quantization with ranges from the same model's
    # vectors of the built-in calibration texts (default prompt, same dimensions).
    calibration = sentence_transformer.encode(list(BUILTIN_TEXTS), truncate_dim=size)
    calibration /= np.linalg.norm(calibration, axis=1, keepdims=True)
    ranges = np.vstack((calibration.min(0), calibration.max(0)))
    for precision in ("int8", "uint8"):
        values = np.asarray(getattr(got, precision), dtype=np.int16)
        diff = np.abs(values - quantized(expected, precision, ranges).astype(np.int16))
        assert diff.max() <= 1 and (diff == 0).mean() >= 0.99  # float error at bucket edges
    packed = np.packbits(floats > 0, axis=-1)
    assert np.array_equal(np.asarray(got.ubinary), packed)
    assert np.array_equal(np.asarray(got.binary), packed.astype(np.int16) - 128)
    assert len(got.base64) == len(TEXTS)


def test_openai_sdk_chat_embeddings_need_a_template(client) -> None:  # type: ignore[no-untyped-def]
    # vLLM's documented way to send `messages` with the SDK; the demo encoder has no template.
    with pytest.raises(openai.BadRequestError) as refused:
        client.post("/embeddings", cast_to=openai.types.CreateEmbeddingResponse, body={
            "model": EMBED, "messages": [{"role": "user", "content": "Paris"}]})
    assert refused.value.param == "messages"
