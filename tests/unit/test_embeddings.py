"""Sentence embeddings through the in-process gateway, compared with sentence-transformers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pybase64
import pytest
import torch

from serve_app.api.embeddings import EmbeddingsService
from serve_app.config import EmbeddingModelConfig, EncoderBatchingConfig
from serve_app.sentence.encoder import EncoderCore, read_sentence_spec
from serve_app.sentence.service import InProcessEncoderClient, SentenceService
from tests.unit.gateway_client import CANARY, RecordingASGITransport, error_of

EMBED = "serve-app-demo-embed"
TEXTS = ["What is the capital of France?", "Paris", "the sun is a star and the earth moves",
         "Tell me about Japan. Japan is a country in east Asia. Its capital is Tokyo.", ""]


async def embeddings(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("model", EMBED)
    return await client.post("/v1/embeddings", json=body)


async def cohere(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("model", EMBED)
    return await client.post("/v2/embed", json=body)


def vectors_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == EMBED
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    rows = []
    for item in body["data"]:
        assert item["object"] == "embedding"
        value = item["embedding"]
        if isinstance(value, str):
            value = np.frombuffer(pybase64.b64decode(value, validate=True), dtype="<f4")
        rows.append(np.asarray(value, dtype=np.float32))
    return np.stack(rows)


def assert_same_directions(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    cosine = (got * expected).sum(1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.9999, cosine


# --------------------------------------------------------------------------- OpenAI


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_vectors_equal_sentence_transformers(
    gateway: httpx.AsyncClient, sentence_transformer: Any, encoding: str
) -> None:
    got = vectors_of(await embeddings(gateway, input=TEXTS, encoding_format=encoding))
    expected = sentence_transformer.encode(TEXTS)
    assert_same_directions(got, expected)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised like ST


async def test_single_string_and_token_ids(
    gateway: httpx.AsyncClient, sentence_transformer: Any
) -> None:
    text = TEXTS[0]
    one = await embeddings(gateway, input=text)
    ids = sentence_transformer.tokenizer(text).input_ids
    assert one.json()["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids),
                                   "completion_tokens": 0}
    by_ids = vectors_of(await embeddings(gateway, input=ids))
    by_id_lists = vectors_of(await embeddings(gateway, input=[ids, ids]))
    assert np.array_equal(vectors_of(one), by_ids)
    assert np.allclose(by_id_lists, np.concatenate([by_ids, by_ids]), atol=1e-6)


async def test_hundred_mixed_lengths_keep_their_order(
    gateway: httpx.AsyncClient, sentence_transformer: Any
) -> None:
    words = "france is a country in western europe its capital is paris".split()
    texts = [" ".join(words[: 1 + (i * 7) % len(words)]) * (1 + i % 5) for i in range(100)]
    response = await embeddings(gateway, input=texts)
    got = vectors_of(response)
    assert_same_directions(got, sentence_transformer.encode(texts))
    total = sum(len(sentence_transformer.tokenizer(t).input_ids) for t in texts)
    assert response.json()["usage"]["prompt_tokens"] == total


async def test_dimensions_truncate_then_renormalise(
    gateway: httpx.AsyncClient, sentence_transformer: Any
) -> None:
    got = vectors_of(await embeddings(gateway, input=TEXTS[:3], dimensions=16))
    full = sentence_transformer.encode(TEXTS[:3])[:, :16]
    expected = full / np.linalg.norm(full, axis=1, keepdims=True)
    assert got.shape == (3, 16)
    assert np.allclose(got, expected, atol=1e-5)
    same = vectors_of(await embeddings(gateway, input=TEXTS[:3], dimensions=32))
    assert_same_directions(same, sentence_transformer.encode(TEXTS[:3]))


async def test_dimensions_outside_the_declared_ones(gateway: httpx.AsyncClient) -> None:
    for size in (12, 64):
        error = error_of(await embeddings(gateway, input="x", dimensions=size), 400)
        assert error["param"] == "dimensions" and "8, 16, 32" in error["message"]


async def test_dimensions_on_a_model_without_matryoshka(
    embeddings_service: SentenceService,
) -> None:
    model = embeddings_service.models[EMBED]
    plain = dataclasses.replace(model, spec=dataclasses.replace(
        model.spec, matryoshka_dimensions=None))
    service = SentenceService({EMBED: plain}, embeddings_service.encoders)
    response = await EmbeddingsService(service).create_embedding(json.dumps(
        {"model": EMBED, "input": "x", "dimensions": 16}).encode())
    assert response.status_code == 400
    assert b"Matryoshka" in bytes(response.body)


async def test_too_long_input_is_400_unless_truncation_asked(
    gateway: httpx.AsyncClient, sentence_transformer: Any
) -> None:
    long_text = "paris " * 200
    error = error_of(await embeddings(gateway, input=["short", long_text]), 400)
    assert error["code"] == "context_length_exceeded" and "128" in error["message"]
    # sentence-transformers truncates at max_seq_length (the end is cut) by default.
    truncated = vectors_of(await embeddings(gateway, input=[long_text],
                                            truncate_prompt_tokens=-1))
    assert_same_directions(truncated, sentence_transformer.encode([long_text]))
    ten = await embeddings(gateway, input=[long_text], truncate_prompt_tokens=10)
    assert ten.json()["usage"]["prompt_tokens"] == 10


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": "serve-app-demo", "input": "x"}, 400, "model"),
        ({"input": []}, 400, "input"),
        ({"input": [[]]}, 400, "input"),
        ({"input": [10_000_000]}, 400, "input"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": 3.5}, 400, None),
        ({}, 400, "input"),
    ],
)
async def test_bad_embeddings_requests(
    gateway: httpx.AsyncClient, body: dict[str, Any], status: int, param: str | None
) -> None:
    error = error_of(await embeddings(gateway, **body), status)
    if param:
        assert error["param"] == param or error["param"].startswith(param)


async def test_embedding_text_never_goes_upstream(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport
) -> None:
    await embeddings(gateway, input=[CANARY])
    await cohere(gateway, texts=[CANARY])
    assert recorder.bodies == []  # embeddings are served by the gateway's own replicas


# --------------------------------------------------------------------------- Cohere


async def test_cohere_types_and_prompts(
    gateway: httpx.AsyncClient, sentence_transformer: Any
) -> None:
    texts = TEXTS[:3]
    response = await cohere(gateway, texts=texts, input_type="search_query",
                            embedding_types=["float", "binary", "ubinary", "base64"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["response_type"] == "embeddings_by_type"
    assert body["texts"] == texts
    assert body["meta"]["api_version"] == {"version": "2"}
    tokens = sum(len(sentence_transformer.tokenizer("query: " + t).input_ids) for t in texts)
    assert body["meta"]["billed_units"] == {"input_tokens": tokens}
    floats = np.asarray(body["embeddings"]["float"], dtype=np.float32)
    assert_same_directions(floats, sentence_transformer.encode(texts, prompt_name="query"))
    packed = np.packbits(floats > 0, axis=-1)
    assert body["embeddings"]["ubinary"] == packed.tolist()
    assert body["embeddings"]["binary"] == (packed.astype(int) - 128).tolist()
    decoded = np.stack([np.frombuffer(pybase64.b64decode(b), dtype="<f4")
                        for b in body["embeddings"]["base64"]])
    assert np.array_equal(decoded, floats)


async def test_cohere_document_prompt_and_output_dimension(
    gateway: httpx.AsyncClient, sentence_transformer: Any
) -> None:
    response = await cohere(gateway, texts=TEXTS[:2], input_type="search_document",
                            output_dimension=8)
    floats = np.asarray(response.json()["embeddings"]["float"], dtype=np.float32)
    full = sentence_transformer.encode(TEXTS[:2], prompt_name="document")[:, :8]
    assert np.allclose(floats, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5)


async def test_cohere_truncation(
    gateway: httpx.AsyncClient, sentence_transformer: Any
) -> None:
    long_text = "tokyo " * 100 + "paris " * 100
    error = error_of(await cohere(gateway, texts=[long_text], truncate="NONE"), 400)
    assert error["code"] == "context_length_exceeded"
    end = np.asarray((await cohere(gateway, texts=[long_text])).json()["embeddings"]["float"])
    assert_same_directions(end.astype(np.float32), sentence_transformer.encode([long_text]))
    start = np.asarray((await cohere(gateway, texts=[long_text], truncate="START"))
                       .json()["embeddings"]["float"], dtype=np.float32)
    tail = sentence_transformer.tokenizer.convert_ids_to_tokens(
        sentence_transformer.tokenizer(long_text).input_ids[-127:-1])
    kept = sentence_transformer.tokenizer.convert_tokens_to_string(tail)
    assert_same_directions(start, sentence_transformer.encode([kept]))
    assert not np.allclose(start, end)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"texts": []}, "texts"),
        ({"texts": ["x"], "embedding_types": ["int4"]}, "embedding_types"),
        ({"texts": ["x"], "embedding_types": ["nope"]}, "embedding_types"),
        ({"texts": ["x"], "truncate": "MIDDLE"}, "truncate"),
        ({"texts": ["x"], "output_dimension": 5}, "output_dimension"),
    ],
)
async def test_bad_cohere_requests(
    gateway: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    error = error_of(await cohere(gateway, **body), 400)
    assert error["param"].startswith(param)


async def test_cohere_unknown_model_is_404(gateway: httpx.AsyncClient) -> None:
    error_of(await cohere(gateway, model="nope", texts=["x"]), 404)


# --------------------------------------------------------------------------- the encoder


def test_token_budget_groups_give_the_same_vectors(
    demo_encoder_dir: Path, sentence_transformer: Any
) -> None:
    config = EmbeddingModelConfig(batching=EncoderBatchingConfig(max_batch_tokens=128))
    core = EncoderCore.from_checkpoint(demo_encoder_dir, config)
    tokenizer = sentence_transformer.tokenizer
    requests = [[tokenizer(t).input_ids for t in TEXTS], [tokenizer("paris " * 50).input_ids]]
    groups = core._groups(list(range(6)), [ids for r in requests for ids in r])
    assert len(groups) > 1
    first, second = core.encode(requests)
    assert_same_directions(first.numpy(), sentence_transformer.encode(TEXTS))
    assert_same_directions(second.numpy(), sentence_transformer.encode(["paris " * 50]))


def _tiny_checkpoint(path: Path, pooling: str, normalize: bool) -> Path:
    """A sentence-transformers checkpoint saved by sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    from serve_app.demo.encoder import build_demo_encoder

    base = build_demo_encoder(path / "base")
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(base)).save_pretrained(path / "hf")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (base / name).exists():
            (path / "hf" / name).write_bytes((base / name).read_bytes())
    modules: list[Any] = [Transformer(str(path / "hf"), max_seq_length=64),
                          Pooling(32, pooling)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(path / "st"))
    return path / "st"


@pytest.mark.parametrize(("pooling", "normalize"), [("cls", False), ("lasttoken", True)])
def test_pooling_from_checkpoints_sentence_transformers_saved(
    tmp_path: Path, pooling: str, normalize: bool
) -> None:
    from sentence_transformers import SentenceTransformer

    path = _tiny_checkpoint(tmp_path, pooling, normalize)
    core = EncoderCore.from_checkpoint(path, EmbeddingModelConfig(source=str(path)))
    assert core.spec.normalize is normalize
    assert core.spec.pooling == {"cls": "cls", "lasttoken": "last"}[pooling]
    reference = SentenceTransformer(str(path), device="cpu")
    ids = [reference.tokenizer(t).input_ids for t in TEXTS]
    [got] = core.encode([ids])  # pooled: the service normalises, per request
    if normalize:
        got = torch.nn.functional.normalize(got, p=2, dim=1)
    assert np.allclose(got.numpy(), reference.encode(TEXTS), atol=1e-5)


def test_without_sentence_transformers_files_the_config_decides(
    demo_encoder_dir: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for item in demo_encoder_dir.iterdir():
        if item.is_file() and item.name not in {"modules.json", "sentence_bert_config.json",
                                                "config_sentence_transformers.json"}:
            (plain / item.name).write_bytes(item.read_bytes())
    config = EmbeddingModelConfig(source=str(plain), pooling="cls")
    core = EncoderCore.from_checkpoint(plain, config)
    assert (core.spec.pooling, core.spec.normalize) == ("cls", True)
    assert core.spec.max_seq_length == 128 and core.spec.prompts == {}
    assert read_sentence_spec(plain, EmbeddingModelConfig(source=str(plain)),
                              core_tokenizer(plain)).pooling == "mean"


def core_tokenizer(path: Path) -> Any:
    from serve_app.prompts.checkpoint import load_tokenizer

    return load_tokenizer(path)


def test_unsupported_sentence_transformers_modules_refuse_to_load(
    demo_encoder_dir: Path, tmp_path: Path
) -> None:
    modules = json.loads((demo_encoder_dir / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense",
                    "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        read_sentence_spec(tmp_path, EmbeddingModelConfig(), None)


def test_in_process_encoders_are_the_core(
    demo_encoder_dir: Path, sentence_transformer: Any
) -> None:
    import asyncio

    core = EncoderCore.from_checkpoint(demo_encoder_dir, EmbeddingModelConfig())
    encoders = InProcessEncoderClient({EMBED: core})
    ids = [sentence_transformer.tokenizer("paris").input_ids]
    got = asyncio.run(encoders.encode(EMBED, ids))
    assert_same_directions(got.numpy(), sentence_transformer.encode(["paris"]))
