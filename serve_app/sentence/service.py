"""Sentence embeddings: OpenAI `/v1/embeddings` and Cohere `/v2/embed` on the encoder replicas.

The ingress tokenizes (with the model's sentence-transformers prompt for the input type),
checks lengths, packs inputs into chunks no longer than the model's limit and sends them to
the encoder deployment; the vectors come back normalised and are shaped here (Matryoshka
truncation, float / base64 / binary encodings).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson
import pybase64
import torch
from pydantic import BaseModel
from starlette.responses import Response

from serve_app.config import AppConfig, LimitsConfig
from serve_app.endpoint import answer
from serve_app.errors import GatewayError, model_not_found
from serve_app.limits import check_items
from serve_app.observability import access
from serve_app.prompts.checkpoint import load_tokenizer, tokenize_off_loop_if_large
from serve_app.protocol import CohereEmbedRequest, EmbeddingRequest, ModelCard, TokenIds
from serve_app.protocol.embeddings import (
    CohereBilledUnits,
    CohereEmbeddings,
    CohereEmbeddingType,
    CohereEmbedResponse,
    CohereMeta,
    Embedding,
    EmbeddingResponse,
    EmbeddingUsage,
)
from serve_app.sentence.encoder import (
    EncoderCore,
    SentenceSpec,
    read_sentence_spec,
    resolve_encoder_dir,
)
from serve_app.sentence.inputs import SentenceModel, Truncation

_UNSUPPORTED_COHERE_TYPES = ("int8", "uint8")


class EncoderClient(Protocol):
    async def encode(self, model: str, chunk: list[list[int]]) -> torch.Tensor: ...


class InProcessEncoderClient:
    """Encoder cores called directly, for running without Ray."""

    def __init__(self, cores: dict[str, EncoderCore]) -> None:
        self.cores = cores

    async def encode(self, model: str, chunk: list[list[int]]) -> torch.Tensor:
        return (await asyncio.to_thread(self.cores[model].encode, [chunk]))[0]


class SentenceService:
    """The two embeddings APIs over one set of sentence models, their vectors from
    `encoders`; `other_models` are served names that get a 400 here, not a 404."""

    def __init__(self, models: dict[str, SentenceModel], encoders: EncoderClient,
                 other_models: Sequence[str] = (),
                 limits: LimitsConfig | None = None) -> None:
        self.models = models
        self.encoders = encoders
        self.other_models = set(other_models)
        self.limits = limits or LimitsConfig()

    @classmethod
    def from_config(cls, config: AppConfig, encoders: EncoderClient) -> SentenceService:
        models = {}
        for model_config in config.embedding_models:
            model_dir = resolve_encoder_dir(model_config)
            tokenizer = load_tokenizer(model_dir)
            spec = read_sentence_spec(model_dir, model_config, tokenizer)
            models[model_config.name] = SentenceModel(model_config.name, spec, tokenizer,
                                                       model_config.truncate)
        return cls(models, encoders, [config.model.name], config.limits)

    def model_cards(self) -> list[ModelCard]:
        return [ModelCard(id=name, max_model_len=model.spec.max_seq_length)
                for name, model in self.models.items()]

    def _model(self, name: str) -> SentenceModel:
        if name in self.models:
            record = access.current()
            if record is not None:  # a configured name: safe as a metric label
                record.model = name
            return self.models[name]
        if name in self.other_models:
            raise GatewayError(f"The model `{name}` does not serve embeddings.", 400,
                               param="model")
        raise model_not_found(name)

    async def _vectors(self, model: SentenceModel, ids: list[list[int]]) -> torch.Tensor:
        """Pack inputs in order into chunks of at most the model's limit; encode concurrently."""
        chunks: list[list[list[int]]] = [[]]
        used = 0
        for sequence in ids:
            if chunks[-1] and used + len(sequence) > model.spec.max_seq_length:
                chunks.append([])
                used = 0
            chunks[-1].append(sequence)
            used += len(sequence)
        parts = await asyncio.gather(*(self.encoders.encode(model.name, c) for c in chunks))
        return torch.cat(list(parts))

    @staticmethod
    def _resize(model: SentenceModel, vectors: torch.Tensor, size: int | None,
                param: str) -> torch.Tensor:
        """Matryoshka truncation, renormalised; a 400 for models not trained for it."""
        if size is None or size == model.spec.hidden_size:
            return vectors
        allowed = model.spec.matryoshka_dimensions
        if allowed is None:
            raise GatewayError(
                f"The model `{model.name}` does not support Matryoshka representations; "
                f"{param} cannot be set.", 400, param=param)
        if size > model.spec.hidden_size or (allowed and size not in allowed):
            sizes = ", ".join(map(str, allowed or [model.spec.hidden_size]))
            raise GatewayError(f"{param} must be one of {sizes} for `{model.name}`.", 400,
                               param=param)
        cut = vectors[:, :size]
        return torch.nn.functional.normalize(cut, p=2, dim=1) if model.spec.normalize else cut

    async def _tokenize(self, model: SentenceModel, texts: Sequence[str], prompt: str,
                        truncation: Truncation, limit: int, param: str) -> list[list[int]]:
        return await tokenize_off_loop_if_large(sum(len(t) for t in texts), model.tokenize,
                                                texts, prompt, truncation, limit, param)

    async def openai(self, body: bytes) -> Response:
        return await answer(body, EmbeddingRequest, self._openai)

    async def cohere(self, body: bytes) -> Response:
        return await answer(body, CohereEmbedRequest, self._cohere)

    async def _openai(self, request: EmbeddingRequest) -> Response:
        model = self._model(request.model)
        inputs = request.inputs()
        if not inputs:
            raise GatewayError("input must not be empty.", 400, param="input")
        check_items(len(inputs), self.limits, "input")
        ids = await self._openai_ids(model, request, inputs)
        vectors = self._resize(model, await self._vectors(model, ids), request.dimensions,
                               "dimensions")
        rows = _float32_rows(vectors)
        as_base64 = request.encoding_format == "base64"
        tokens = sum(len(i) for i in ids)
        return _numpy_json(EmbeddingResponse(
            data=[Embedding(index=i, embedding=_b64(row) if as_base64 else row)
                  for i, row in enumerate(rows)],
            model=model.name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)))

    async def _openai_ids(self, model: SentenceModel, request: EmbeddingRequest,
                          inputs: list[str] | list[TokenIds]) -> list[list[int]]:
        """Token ids of each input, tokenized or as given, within the model's limit."""
        asked = request.truncate_prompt_tokens
        truncation: Truncation = "END" if (
            asked is not None or model.truncate_by_default) else None
        limit = model.spec.max_seq_length
        if asked is not None and asked > 0:
            limit = min(limit, asked)
        if isinstance(inputs[0], str):
            texts = [t for t in inputs if isinstance(t, str)]
            return await self._tokenize(model, texts, model.spec.prompt(None), truncation,
                                        limit, "input")
        given = [list(i) for i in inputs if isinstance(i, list)]
        ids = model.check(given, truncation, limit, "input")
        model.check_vocab(ids)
        return ids

    async def _cohere(self, request: CohereEmbedRequest) -> Response:
        model = self._model(request.model)
        check_items(len(request.texts), self.limits, "texts")
        _check_cohere_types(request.embedding_types)
        truncation: Truncation = None if request.truncate == "NONE" else request.truncate
        prompt = model.spec.prompt(_prompt_name(model.spec, request.input_type))
        ids = await self._tokenize(model, request.texts, prompt, truncation,
                                   model.spec.max_seq_length, "texts")
        vectors = self._resize(model, await self._vectors(model, ids),
                               request.output_dimension, "output_dimension")
        rows = _float32_rows(vectors)
        tokens = sum(len(i) for i in ids)
        embeddings = CohereEmbeddings.model_validate(
            {kind: _cohere_encoding(rows, kind) for kind in request.embedding_types})
        # Cohere sends only the embedding types asked for, and no null fields.
        return _numpy_json(CohereEmbedResponse(
            id=str(uuid.uuid4()), embeddings=embeddings, texts=request.texts,
            meta=CohereMeta(billed_units=CohereBilledUnits(input_tokens=tokens))),
            exclude_none=True)


def _check_cohere_types(kinds: list[CohereEmbeddingType]) -> None:
    unsupported = [kind for kind in kinds if kind in _UNSUPPORTED_COHERE_TYPES]
    if unsupported:
        raise GatewayError(f"embedding_types {unsupported[0]} is not supported; use float, "
                           "binary, ubinary or base64.", 400, param="embedding_types")


def _prompt_name(spec: SentenceSpec, input_type: str | None) -> str | None:
    """Cohere's input_type -> the checkpoint's prompt name (search_query -> query, ...)."""
    if not input_type:
        return None
    candidates = [input_type, input_type.removeprefix("search_")]
    if input_type == "search_document":
        candidates.append("passage")
    return next((c for c in candidates if c in spec.prompts), None)


def _float32_rows(vectors: torch.Tensor) -> npt.NDArray[np.float32]:
    return vectors.numpy().astype("<f4", copy=False)


def _b64(row: npt.NDArray[np.float32]) -> str:
    """Little-endian float32 bytes in base64: what the OpenAI SDK decodes by default."""
    return pybase64.b64encode(row.tobytes()).decode("ascii")


def _cohere_encoding(rows: npt.NDArray[np.float32],
                     kind: CohereEmbeddingType) -> npt.NDArray[Any] | list[str]:
    if kind == "float":
        return rows
    if kind == "base64":
        return [_b64(row) for row in rows]
    packed = np.packbits(rows > 0, axis=-1)
    if kind == "ubinary":
        return packed
    return (packed.astype(np.int16) - 128).astype(np.int8)  # binary


def _numpy_json(answer: BaseModel, exclude_none: bool = False) -> Response:
    """The answer with its vectors written by orjson straight from numpy: the models keep
    them as arrays (see `protocol.embeddings`), and JSON of Python floats would take four
    times as long and twice the bytes."""
    payload = answer.model_dump(by_alias=True, exclude_none=exclude_none)
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")
