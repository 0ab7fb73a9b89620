"""Every embedding type and option against sentence-transformers on the same checkpoint,
through the official `openai` and `cohere` SDKs on the in-process gateway; and Cohere's
int8 / uint8 calibration (computed once, cached beside the model cache)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cohere
import httpx
import numpy as np
import openai
import pybase64
import pytest
import torch

from serve_app import envs
from serve_app.api.cohere import CohereEmbedService
from serve_app.config import AppConfig, EmbeddingModelConfig
from serve_app.sentence.encoder import EncoderCore
from serve_app.sentence.quantize import (
    BUILTIN_TEXTS,
    CALIBRATION_MAX_TEXTS,
    calibration_for,
    quantize,
    read_calibration_texts,
)
from serve_app.sentence.service import InProcessEncoderClient, SentenceService
from tests.unit.conftest import UPSTREAM
from tests.unit.gateway_client import error_of

EMBED = "serve-app-demo-embed"
RAW = "raw-embed"  # the demo checkpoint, not normalised, calibrated from a file
TEXTS = ["What is the capital of France?", "Paris", "the sun is a star and the earth moves",
         "Tell me about Japan. Japan is a country in east Asia. Its capital is Tokyo."]
FILE_TEXTS = [f"line {i}: " + "paris tokyo rome "[: 1 + i % 17] * (1 + i % 4) for i in range(40)]
PROMPTS = {None: None, "search_query": "query", "search_document": "document"}
ALL_TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CountingEncoders(InProcessEncoderClient):
    """In-process encoders that count the sequences they encode."""

    def __init__(self, cores: dict[str, EncoderCore]) -> None:
        super().__init__(cores)
        self.sequences = 0

    async def encode(self, model: str, chunk: list[list[int]]) -> torch.Tensor:
        self.sequences += len(chunk)
        return await super().encode(model, chunk)


def configs(calibration_file: Path) -> list[EmbeddingModelConfig]:
    return [EmbeddingModelConfig(),
            EmbeddingModelConfig(served_name=RAW, normalize=False,
                                 calibration_file=str(calibration_file))]


def service_of(config: AppConfig, model_dir: Path) -> SentenceService:
    cores = {m.name: EncoderCore.from_checkpoint(model_dir, m) for m in config.embedding_models}
    return SentenceService.from_config(config, CountingEncoders(cores))


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "texts.txt"
    path.write_text("\n\n".join(FILE_TEXTS) + "\n")  # blank lines are skipped
    return path


@pytest.fixture(scope="module")
def embeddings_service(demo_encoder_dir: Path, calibration_file: Path) -> SentenceService:
    """Overrides conftest's: the demo encoder as it is, and not normalised."""
    config = AppConfig(upstream=UPSTREAM, embedding_models=configs(calibration_file))
    return service_of(config, demo_encoder_dir)


@pytest.fixture(scope="module")
def references(sentence_transformer: Any) -> dict[str, Any]:
    """sentence-transformers models of both served configurations."""
    from sentence_transformers import SentenceTransformer

    without_normalize = SentenceTransformer(modules=list(sentence_transformer)[:2],
                                            device="cpu")
    without_normalize.prompts = dict(sentence_transformer.prompts)
    return {EMBED: sentence_transformer, RAW: without_normalize}


def st_quantize(rows: np.ndarray, precision: str, ranges: np.ndarray) -> np.ndarray:
    from sentence_transformers.util.quantization import quantize_embeddings

    return np.asarray(quantize_embeddings(rows, precision=precision, ranges=ranges))


def st_floats(reference: Any, texts: Sequence[str], prompt_name: str | None,
              size: int | None) -> np.ndarray:
    """sentence-transformers' vectors, truncated to `size` and (for a model with a Normalize
    module) normalised again, as the gateway answers them."""
    vectors = reference.encode(list(texts), prompt_name=prompt_name, truncate_dim=size)
    if size is not None and len(reference) == 3:
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors, dtype=np.float32)


def st_ranges(reference: Any, texts: Sequence[str], size: int | None) -> np.ndarray:
    """quantize_embeddings' ranges from calibration embeddings: per-dimension extremes."""
    calibration = st_floats(reference, texts, None, size)
    return np.vstack((calibration.min(0), calibration.max(0)))


def cohere_client(gateway: httpx.AsyncClient) -> Any:
    return cohere.AsyncClientV2(api_key="EMPTY", base_url="http://gateway",
                                httpx_client=gateway, max_retries=0)


def openai_client(gateway: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="EMPTY",
                              http_client=gateway, max_retries=0)


def assert_close_buckets(got: np.ndarray, expected: np.ndarray) -> None:
    """Quantized values from vectors equal to within float error: a value lying on a
    bucket's edge may fall either side, never further."""
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1, diff.max()
    assert (diff == 0).mean() >= 0.99


def assert_same_signs(packed: np.ndarray, floats: np.ndarray, offset: int) -> None:
    """Packed sign bits equal sentence-transformers' wherever its float is clearly signed."""
    bits = np.unpackbits((packed.astype(np.int16) + offset).astype(np.uint8), axis=-1)
    clear = np.abs(floats) > 1e-4
    assert np.array_equal(bits[:, : floats.shape[1]][clear], (floats > 0)[clear])


# ------------------------------------------------------------------ quantization itself


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_quantize_equals_sentence_transformers_with_the_same_ranges(precision: Any) -> None:
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=(200, 24)).astype(np.float32)
    ranges = np.vstack((calibration.min(0), calibration.max(0)))
    ranges[:, 3] = 0.5  # a dimension without a range: ST takes a step of 1
    rows = (rng.normal(size=(300, 24)) * 1.5).astype(np.float32)  # some outside: clipped
    rows[0] = ranges[0]
    rows[1] = ranges[1]
    got = quantize(rows, ranges, precision)
    expected = st_quantize(rows, precision, ranges)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_calibration_texts_skip_blank_lines_and_need_two(tmp_path: Path) -> None:
    path = tmp_path / "many.txt"
    path.write_text("".join(f"text {i}\n\n" for i in range(CALIBRATION_MAX_TEXTS)))
    texts = read_calibration_texts(str(path))
    assert len(texts) == CALIBRATION_MAX_TEXTS and texts[0] == "text 0"
    assert read_calibration_texts(None) == BUILTIN_TEXTS and len(BUILTIN_TEXTS) >= 100
    (tmp_path / "one.txt").write_text("only one\n\n")
    with pytest.raises(ValueError, match="calibration_file"):
        read_calibration_texts(str(tmp_path / "one.txt"))
    with pytest.raises(ValueError, match="calibration_file"):
        read_calibration_texts(str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------ Cohere, every type


@pytest.mark.parametrize("model", [EMBED, RAW])
@pytest.mark.parametrize("size", [None, 16])
@pytest.mark.parametrize("input_type", ["search_query", "search_document"])
async def test_cohere_sdk_every_type_equals_sentence_transformers(
    gateway: httpx.AsyncClient, references: dict[str, Any], calibration_file: Path,
    model: str, size: int | None, input_type: str,
) -> None:
    reference = references[model]
    answer = await cohere_client(gateway).embed(
        model=model, texts=TEXTS, input_type=input_type, embedding_types=ALL_TYPES,
        output_dimension=size)
    got = answer.embeddings
    assert all(getattr(got, kind.replace("float", "float_")) is not None
               for kind in ALL_TYPES), "the SDK must get every type it asked for"
    floats = np.asarray(got.float_, dtype=np.float32)
    expected = st_floats(reference, TEXTS, PROMPTS.get(input_type), size)
    assert floats.shape == expected.shape
    assert np.allclose(floats, expected, atol=1e-5)
    decoded = np.stack([np.frombuffer(pybase64.b64decode(b), dtype="<f4")
                        for b in got.base64])
    assert np.array_equal(decoded, floats)

    calibration_texts = FILE_TEXTS if model == RAW else BUILTIN_TEXTS
    ranges = st_ranges(reference, calibration_texts, size)
    for precision in ("int8", "uint8"):
        values = np.asarray(getattr(got, precision))
        assert_close_buckets(values, st_quantize(expected, precision, ranges))
    # sentence-transformers' own binary precision (no ranges involved).
    for precision, offset in (("binary", 128), ("ubinary", 0)):
        st_packed = reference.encode(TEXTS, prompt_name=PROMPTS.get(input_type),
                                     truncate_dim=size, precision=precision)
        values = np.asarray(getattr(got, precision))
        assert values.shape == st_packed.shape
        assert_same_signs(values, expected, offset)


@pytest.mark.parametrize("size", [None, 8])
async def test_int8_is_quantize_embeddings_of_the_answer_with_the_gateways_ranges(
    gateway: httpx.AsyncClient, size: int | None,
) -> None:
    """Exactly: the ranges are the extremes of the gateway's own float vectors for the
    calibration texts, shaped as the request's (so per dimension count)."""
    async def floats(texts: Sequence[str], **body: Any) -> np.ndarray:
        response = await gateway.post("/v2/embed", json={
            "model": EMBED, "texts": list(texts), "embedding_types": ["float", "int8", "uint8"],
            "output_dimension": size, **body})
        assert response.status_code == 200, response.text
        return response.json()["embeddings"]

    calibration = np.asarray((await floats(BUILTIN_TEXTS))["float"], dtype=np.float32)
    ranges = np.vstack((calibration.min(0), calibration.max(0)))
    answer = await floats(TEXTS, input_type="search_query")
    rows = np.asarray(answer["float"], dtype=np.float32)
    for precision in ("int8", "uint8"):
        assert np.array_equal(np.asarray(answer[precision]), st_quantize(rows, precision, ranges))


async def test_calibration_runs_once_and_is_read_back_from_the_cache(
    demo_encoder_dir: Path, calibration_file: Path,
) -> None:
    config = AppConfig(upstream=UPSTREAM, embedding_models=configs(calibration_file))
    first = service_of(config, demo_encoder_dir)
    body = b'{"model": "%s", "texts": ["paris"], "embedding_types": ["int8"], %s}'
    calibration = first.models[EMBED].calibration
    assert calibration.cache_file is not None
    assert calibration.cache_file.parent == envs.cache_dir() / "calibration"
    calibration.cache_file.unlink(missing_ok=True)

    encoders: Any = first.encoders
    embed = CohereEmbedService(first).embed
    await asyncio.gather(*(embed(body % (EMBED.encode(), f'"output_dimension": {d}'.encode()))
                           for d in (8, 16, 32, 8)))
    assert encoders.sequences == len(BUILTIN_TEXTS) + 4  # calibrated once, for every size
    assert calibration.cache_file.is_file()

    second = service_of(config, demo_encoder_dir)
    response = await CohereEmbedService(second).embed(body % (EMBED.encode(), b'"truncate": "END"'))
    assert response.status_code == 200
    assert second.encoders.sequences == 1  # type: ignore[attr-defined]


def test_the_cache_file_names_the_checkpoint_and_the_texts(
    demo_encoder_dir: Path, calibration_file: Path, tmp_path: Path,
) -> None:
    service = SentenceService.from_config(
        AppConfig(upstream=UPSTREAM, embedding_models=configs(calibration_file)),
        InProcessEncoderClient({}))
    spec = service.models[EMBED].spec
    builtin, from_file = (calibration_for(m, demo_encoder_dir, spec).cache_file
                          for m in configs(calibration_file))
    assert builtin != from_file
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in demo_encoder_dir.rglob("*"):
        if item.is_file():
            target = copy / item.relative_to(demo_encoder_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(item.read_bytes())
    moved = calibration_for(EmbeddingModelConfig(), copy, spec).cache_file
    assert moved != builtin
    # A checkpoint replaced in place (same directory, other weights) is calibrated afresh.
    [weights] = copy.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes() + b" ")
    assert calibration_for(EmbeddingModelConfig(), copy, spec).cache_file != moved
    assert calibration_for(EmbeddingModelConfig(), demo_encoder_dir, spec).cache_file == builtin


# ------------------------------------------------------------------ OpenAI SDK


@pytest.mark.parametrize("model", [EMBED, RAW])
@pytest.mark.parametrize("size", [None, 16])
@pytest.mark.parametrize("encoding", [openai.NOT_GIVEN, "float", "base64"])
async def test_openai_sdk_equals_sentence_transformers(
    gateway: httpx.AsyncClient, references: dict[str, Any], model: str, size: int | None,
    encoding: Any,
) -> None:
    answer = await openai_client(gateway).embeddings.create(
        model=model, input=TEXTS, dimensions=size or openai.NOT_GIVEN, encoding_format=encoding)
    # The SDK decodes base64 itself only when it chose it (encoding_format not given).
    got = np.asarray([np.frombuffer(pybase64.b64decode(item.embedding), dtype="<f4")
                      if isinstance(item.embedding, str) else item.embedding
                      for item in answer.data], dtype=np.float32)
    assert np.allclose(got, st_floats(references[model], TEXTS, None, size), atol=1e-5)


async def test_int8_on_a_model_with_an_unreadable_calibration_file_stops_the_start(
    demo_encoder_dir: Path, tmp_path: Path,
) -> None:
    config = AppConfig(upstream=UPSTREAM, embedding_models=[
        EmbeddingModelConfig(calibration_file=str(tmp_path / "missing.txt"))])
    with pytest.raises(ValueError, match="calibration_file"):
        SentenceService.from_config(config, InProcessEncoderClient({}))


async def test_cohere_types_other_than_the_six_are_refused(gateway: httpx.AsyncClient) -> None:
    response = await gateway.post("/v2/embed", json={
        "model": EMBED, "texts": ["x"], "embedding_types": ["int4"]})
    assert error_of(response, 400)["param"].startswith("embedding_types")
