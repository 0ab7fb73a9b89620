"""Embeddings answers that match vLLM's own test suite, each test naming the vLLM behaviour
it states (tests/entrypoints/pooling/embed/test_online.py, test_cohere_online.py)."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import httpx
import numpy as np
import openai
import pybase64
import pytest
import torch

from serve_app.api.cohere import CohereEmbedService
from serve_app.sentence.service import SentenceService
from serve_app.sentence.vector_bytes import METADATA_MAX_INPUTS, bytes_answer
from tests.unit.gateway_client import error_of

EMBED = "serve-app-demo-embed"
TEXTS = ["What is the capital of France?", "Paris", "the sun is a star and the earth moves"]
LIMIT = 128  # the demo encoder's max_seq_length
EMBED_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn,
                "fp8_e5m2": torch.float8_e5m2}
ENDIANNESS = ["native", "big", "little"]


async def embeddings(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("model", EMBED)
    return await client.post("/v1/embeddings", json=body)


async def floats(client: httpx.AsyncClient, **body: Any) -> np.ndarray:
    response = await embeddings(client, input=TEXTS, encoding_format="float", **body)
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], np.float32)


def decoded(raw: bytes, embed_dtype: str, endianness: str) -> torch.Tensor:
    """vLLM's `binary2tensor`, written again: numpy views bfloat16 and fp8 as integers of
    their width, swaps bytes unless the order is the reader's, then torch reinterprets."""
    dtype = EMBED_DTYPES[embed_dtype]
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32}[dtype.itemsize]
    array = np.frombuffer(raw, dtype=width)
    if endianness not in ("native", sys.byteorder):
        array = array.byteswap()
    return torch.from_numpy(array.copy()).view(dtype)


def cast(vectors: np.ndarray, embed_dtype: str) -> torch.Tensor:
    return torch.from_numpy(vectors).to(EMBED_DTYPES[embed_dtype])


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("given", ["text", "token ids"])
async def test_truncate_prompt_tokens_above_the_limit_is_400(
    gateway: httpx.AsyncClient, sentence_transformer: Any, given: str
) -> None:
    """vLLM `test_truncate_prompt_tokens`: a value above max_model_len is a BadRequestError,
    "truncate_prompt_tokens value is greater than max_model_len", not a silent clamp."""
    value: Any = TEXTS[0] if given == "text" else sentence_transformer.tokenizer(
        TEXTS[0]).input_ids
    error = error_of(await embeddings(gateway, input=value,
                                      truncate_prompt_tokens=LIMIT + 1), 400)
    assert error["param"] == "truncate_prompt_tokens"
    assert f"truncate_prompt_tokens value ({LIMIT + 1}) is greater than max_model_len " \
           f"({LIMIT})" in error["message"]
    for allowed in (LIMIT, -1, 5):
        response = await embeddings(gateway, input=value, truncate_prompt_tokens=allowed)
        assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 5


# --------------------------------------------------------------------------- base64 / bytes


async def test_base64_default_is_what_the_openai_sdk_decodes(
    gateway: httpx.AsyncClient,
) -> None:
    """vLLM `test_base64_embedding`: the default answer is float32 decoded from base64 by
    the OpenAI client (little-endian float32, as the SDK reads it on this host)."""
    sdk = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="EMPTY",
                             http_client=gateway, max_retries=0)
    answer = await sdk.embeddings.create(model=EMBED, input=TEXTS)  # asks for base64
    got = np.array([item.embedding for item in answer.data], np.float32)
    assert np.array_equal(got, await floats(gateway))


@pytest.mark.parametrize("embed_dtype", list(EMBED_DTYPES))
@pytest.mark.parametrize("endianness", ENDIANNESS)
async def test_base64_embed_dtype_and_endianness(
    gateway: httpx.AsyncClient, embed_dtype: str, endianness: str
) -> None:
    """vLLM `test_base64_embed_dtype_and_endianness`: each item is the vector cast to
    `embed_dtype`, its bytes in `endianness` order (`native`: the server's)."""
    expected = await floats(gateway)
    response = await embeddings(gateway, input=TEXTS, encoding_format="base64",
                                embed_dtype=embed_dtype, endianness=endianness)
    assert response.status_code == 200, response.text
    for row, item in zip(expected, response.json()["data"], strict=True):
        raw = pybase64.b64decode(item["embedding"], validate=True)
        assert len(raw) == row.size * EMBED_DTYPES[embed_dtype].itemsize
        assert torch.equal(decoded(raw, embed_dtype, endianness).view(torch.uint8),
                           cast(row, embed_dtype).view(torch.uint8))


async def test_big_endian_is_the_little_endian_bytes_swapped(
    gateway: httpx.AsyncClient,
) -> None:
    """vLLM byte-swaps each element (not the whole vector) for a non-native order."""
    def first_raw(body: dict[str, Any]) -> np.ndarray:
        return np.frombuffer(pybase64.b64decode(body["data"][0]["embedding"]), "<u2")

    big, little = [(await embeddings(gateway, input="Paris", encoding_format="base64",
                                     embed_dtype="float16", endianness=order)).json()
                   for order in ("big", "little")]
    assert np.array_equal(first_raw(big), first_raw(little).byteswap())
    assert not np.array_equal(first_raw(big), first_raw(little))


@pytest.mark.parametrize("field", ["encoding_format", "embed_dtype", "endianness"])
async def test_unknown_encoding_values_are_400(gateway: httpx.AsyncClient, field: str) -> None:
    """vLLM `test_params_not_supported`: a value outside the literal is a 400."""
    body = {"input": "Paris", "encoding_format": "base64", field: f"bad_{field}"}
    error = error_of(await embeddings(gateway, **body), 400)
    assert error["param"] == field


@pytest.mark.parametrize("embed_dtype", list(EMBED_DTYPES))
@pytest.mark.parametrize("endianness", ENDIANNESS)
async def test_bytes_answer_with_its_metadata_header(
    gateway: httpx.AsyncClient, sentence_transformer: Any, embed_dtype: str, endianness: str
) -> None:
    """vLLM `test_bytes_embed_dtype_and_endianness`: `bytes` answers the vectors back to
    back as application/octet-stream; the `metadata` header (JSON) gives each one's
    `[start, end)`, shape, dtype and order, and the usage."""
    expected = await floats(gateway)
    response = await embeddings(gateway, input=TEXTS, encoding_format="bytes",
                                embed_dtype=embed_dtype, endianness=endianness)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    metadata = json.loads(response.headers["metadata"])
    assert set(metadata) == {"id", "created", "model", "data", "usage"}
    assert metadata["id"].startswith("embd-") and metadata["model"] == EMBED
    tokens = sum(len(sentence_transformer.tokenizer(t).input_ids) for t in TEXTS)
    assert metadata["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    items = sorted(metadata["data"], key=lambda item: item["index"])
    assert [item["index"] for item in items] == list(range(len(TEXTS)))
    assert items[-1]["end"] == len(response.content)
    for row, item in zip(expected, items, strict=True):
        assert (item["embed_dtype"], item["endianness"]) == (embed_dtype, endianness)
        assert item["shape"] == [row.size]
        got = decoded(response.content[item["start"]:item["end"]], embed_dtype, endianness)
        assert torch.equal(got.view(torch.uint8), cast(row, embed_dtype).view(torch.uint8))


async def test_bytes_only_has_no_header_and_a_fixed_layout(gateway: httpx.AsyncClient) -> None:
    """vLLM `test_bytes_only_embed_dtype_and_endianness`: no `metadata` header; the reader
    lays the items out itself (`build_metadata_items`: vector i at i * dims * width)."""
    expected = await floats(gateway)
    response = await embeddings(gateway, input=TEXTS, encoding_format="bytes_only",
                                embed_dtype="bfloat16", endianness="big")
    assert response.status_code == 200, response.text
    assert "metadata" not in response.headers
    assert response.headers["content-type"] == "application/octet-stream"
    size = expected.shape[1] * 2
    assert len(response.content) == len(TEXTS) * size
    for i, row in enumerate(expected):
        got = decoded(response.content[i * size:(i + 1) * size], "bfloat16", "big")
        assert torch.equal(got.view(torch.uint8), cast(row, "bfloat16").view(torch.uint8))


async def test_bytes_refuses_more_inputs_than_its_header_carries(
    gateway: httpx.AsyncClient
) -> None:
    """The `metadata` header grows with every input; past `METADATA_MAX_INPUTS` a 400 points
    to the formats that carry no header, which still answer every input."""
    texts = [f"input {i}" for i in range(METADATA_MAX_INPUTS + 1)]
    at_the_bound = await embeddings(gateway, input=texts[:-1], encoding_format="bytes")
    assert at_the_bound.status_code == 200, at_the_bound.text
    assert len(json.loads(at_the_bound.headers["metadata"])["data"]) == METADATA_MAX_INPUTS
    error = error_of(await embeddings(gateway, input=texts, encoding_format="bytes"), 400)
    assert error["param"] == "encoding_format"
    assert "bytes_only" in error["message"] and "base64" in error["message"]
    for headerless in ("bytes_only", "base64"):
        response = await embeddings(gateway, input=texts, encoding_format=headerless)
        assert response.status_code == 200, response.text


def test_the_metadata_header_of_the_most_inputs_fits_an_8_kb_header_line() -> None:
    """The bound's reason, at wide vectors and a long model name: the header, name and
    value, fits Apache's 8,190-byte line and nginx's 8k buffer with room for the others."""
    rows = np.zeros((METADATA_MAX_INPUTS, 8192), np.int32)
    answer = bytes_answer(rows, "float32", "native", "m" * 64, 10**6, with_metadata=True)
    assert len("metadata: ") + len(answer.headers["metadata"]) < 7800


# --------------------------------------------------------------------------- normalisation


def pooled_by_sentence_transformers(sentence_transformer: Any) -> np.ndarray:
    """The demo checkpoint's vectors before its Normalize module."""
    from sentence_transformers import SentenceTransformer

    modules = [m for m in sentence_transformer if type(m).__name__ != "Normalize"]
    assert len(modules) < len(sentence_transformer)
    unnormalised = SentenceTransformer(modules=modules, device="cpu")
    return np.asarray(unnormalised.encode(TEXTS), np.float32)


@pytest.mark.parametrize("field", ["use_activation", "normalize"])
async def test_activation_off_gives_the_pooled_vectors(
    gateway: httpx.AsyncClient, sentence_transformer: Any, field: str
) -> None:
    """vLLM `test_use_activation` (and the older `test_normalize`): False gives vectors
    that are not unit length, whose normalisation is the default answer; True is the
    default."""
    default = await floats(gateway)
    with_it = await floats(gateway, **{field: True})
    without = await floats(gateway, **{field: False})
    assert np.array_equal(default, with_it)
    assert not np.allclose(np.linalg.norm(without, axis=1), 1.0, atol=1e-2)
    assert np.allclose(without, pooled_by_sentence_transformers(sentence_transformer),
                       atol=1e-5)
    unit = without / np.linalg.norm(without, axis=1, keepdims=True)
    assert np.allclose(unit, default, atol=1e-6)


async def test_normalize_wins_over_use_activation(gateway: httpx.AsyncClient) -> None:
    """vLLM's `get_use_activation`: the older `normalize`, when set, comes first."""
    raw = await floats(gateway, use_activation=False)
    assert np.array_equal(await floats(gateway, normalize=False, use_activation=True), raw)
    assert np.array_equal(await floats(gateway, normalize=True, use_activation=False),
                          await floats(gateway))


async def test_activation_off_with_dimensions_is_the_cut_pooled_vector(
    gateway: httpx.AsyncClient,
) -> None:
    """vLLM's pooler head truncates to `dimensions` first, then normalises if asked."""
    raw = await floats(gateway, use_activation=False)
    assert np.array_equal(await floats(gateway, use_activation=False, dimensions=16),
                          raw[:, :16])
    cut = raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1, keepdims=True)
    assert np.allclose(await floats(gateway, dimensions=16), cut, atol=1e-6)


# --------------------------------------------------------------------------- usage


async def test_usage_reports_completion_tokens_zero(
    gateway: httpx.AsyncClient, sentence_transformer: Any
) -> None:
    """vLLM `test_completion_request`: usage.completion_tokens == 0, prompt_tokens ==
    total_tokens (vLLM's UsageInfo)."""
    response = await embeddings(gateway, input=TEXTS[0])
    tokens = len(sentence_transformer.tokenizer(TEXTS[0]).input_ids)
    assert response.json()["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens,
                                        "completion_tokens": 0}


# --------------------------------------------------------------------------- Cohere


async def cohere(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("model", EMBED)
    return await client.post("/v2/embed", json={"texts": ["hello world"], **body})


async def test_unknown_input_type_is_400(gateway: httpx.AsyncClient) -> None:
    """vLLM `test_unsupported_input_type_rejected`: an input_type the model's prompts do
    not define is a 400 "Unsupported input_type"; `test_omitted_input_type_accepted`."""
    error = error_of(await cohere(gateway, input_type="nonexistent_type"), 400)
    assert error["param"] == "input_type"
    assert error["message"].startswith("Unsupported input_type. Supported values: ")
    assert "nonexistent_type" not in error["message"]  # errors never echo values
    for accepted in ("query", "document", "search_query", "search_document"):
        assert accepted in error["message"]
        assert (await cohere(gateway, input_type=accepted)).status_code == 200
    assert (await cohere(gateway)).status_code == 200
    assert error_of(await cohere(gateway, input_type="classification"), 400)


async def test_input_type_on_a_model_without_prompts_is_400(
    embeddings_service: SentenceService,
) -> None:
    """vLLM's `_validate_input_type`: a model without task instructions accepts none."""
    model = embeddings_service.models[EMBED]
    plain = dataclasses.replace(model, spec=dataclasses.replace(model.spec, prompts={}))
    service = CohereEmbedService(SentenceService({EMBED: plain}, embeddings_service.encoders))
    body = {"model": EMBED, "texts": ["x"], "input_type": "search_query"}
    response = await service.embed(json.dumps(body).encode())
    assert response.status_code == 400
    assert b"does not define any input_type" in bytes(response.body)
    del body["input_type"]
    assert (await service.embed(json.dumps(body).encode())).status_code == 200
