"""Sentence embeddings: OpenAI `/v1/embeddings` and Cohere `/v2/embed` on the encoder replicas.

The ingress tokenizes (with the model's sentence-transformers prompt for the input type),
checks lengths, packs inputs into chunks of one Encoder batch's tokens and sends them to
the encoder deployment a few at a time; the vectors come back pooled and are shaped here
(Matryoshka truncation, then normalisation unless the request turns it off, then float /
base64 / bytes / binary encodings). Cohere's int8 / uint8 use each model's calibrated ranges
(`quantize`); vLLM's `messages` become one input through the model's chat template (`chat`).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson
import torch
from pydantic import BaseModel
from starlette.responses import Response

from serve_app.config import AppConfig, LimitsConfig
from serve_app.endpoint import answer
from serve_app.errors import GatewayError, model_not_found, model_on_other_api
from serve_app.limits import check_items, check_text_chars
from serve_app.observability import access
from serve_app.prompts.chat_template import load_chat_template
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
from serve_app.sentence.chat import chat_token_ids
from serve_app.sentence.encoder import (
    EncoderCore,
    SentenceSpec,
    chunks,
    read_sentence_spec,
    resolve_encoder_dir,
)
from serve_app.sentence.inputs import SentenceModel, Truncation
from serve_app.sentence.quantize import CalibrationCache, calibration_for, quantize
from serve_app.sentence.vector_bytes import (
    base64_rows,
    bytes_answer,
    check_metadata_fits,
    vector_bytes,
)

ENCODER_CALLS_PER_REQUEST = 4
"""Encoder calls one request keeps in flight. An Encoder replica runs one batch while the
next waits, so a few calls keep it (or a few replicas) busy; and another request's call
waits behind at most this many calls of each large request, not behind all of them."""

_QUANTIZED_TYPES = {"int8", "uint8"}
_COHERE_INPUT_TYPES = ("search_query", "search_document", "classification", "clustering")


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
        self.calibrations = CalibrationCache()

    @classmethod
    def from_config(cls, config: AppConfig, encoders: EncoderClient) -> SentenceService:
        models = {}
        for model_config in config.embedding_models:
            model_dir = resolve_encoder_dir(model_config)
            tokenizer = load_tokenizer(model_dir)
            spec = read_sentence_spec(model_dir, model_config, tokenizer)
            models[model_config.name] = SentenceModel(
                model_config.name, spec, tokenizer, model_config.truncate,
                chat_template=load_chat_template(model_config.chat_template),
                chat_parses_special_tokens=config.tokenization.chat_special_tokens == "parse",
                chat_turn_markers=config.tokenization.chat_turn_markers,
                calibration=calibration_for(model_config, model_dir, spec),
                chunk_tokens=max(model_config.batching.max_batch_tokens, spec.max_seq_length))
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
            raise model_on_other_api(name, "completions",
                                     "/v1/completions or /v1/chat/completions")
        raise model_not_found(name)

    async def _vectors(self, model: SentenceModel, ids: list[list[int]]) -> torch.Tensor:
        """The inputs' pooled vectors, in order: packed into chunks of one Encoder batch's
        worth of tokens, at most ENCODER_CALLS_PER_REQUEST of them in flight at once, so a
        request within `limits.max_items` never floods the Encoder's queue and other
        requests' calls are served between its own."""
        packed = chunks(ids, model.chunk_tokens)
        parts: list[torch.Tensor] = [torch.empty(0)] * len(packed)
        pending = iter(enumerate(packed))

        async def caller() -> None:
            for index, chunk in pending:
                parts[index] = await self.encoders.encode(model.name, chunk)

        callers = [asyncio.ensure_future(caller())
                   for _ in range(min(ENCODER_CALLS_PER_REQUEST, len(packed)))]
        try:
            await asyncio.gather(*callers)
        finally:  # a failed call stops the others: the request has failed
            for task in callers:
                task.cancel()
        return torch.cat(parts)

    @staticmethod
    def _resize(model: SentenceModel, vectors: torch.Tensor, size: int | None,
                param: str) -> torch.Tensor:
        """Matryoshka truncation (normalising comes after it, as in vLLM's pooler head);
        a 400 for models not trained for it."""
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
        return vectors[:, :size]

    async def _tokenize(self, model: SentenceModel, texts: Sequence[str], prompt: str,
                        truncation: Truncation, limit: int, param: str) -> list[list[int]]:
        """A request's texts as token ids: each refused or cut to its limit, and all of
        them within `limits.max_text_chars`, before any is tokenized."""
        chars = model.text_chars(texts, prompt, truncation, limit, param)
        check_text_chars(chars, self.limits, param)
        return await tokenize_off_loop_if_large(chars, model.tokenize, texts, prompt,
                                                truncation, limit, param)

    async def openai(self, body: bytes) -> Response:
        return await answer(body, EmbeddingRequest, self._openai)

    async def cohere(self, body: bytes) -> Response:
        return await answer(body, CohereEmbedRequest, self._cohere)

    async def _openai(self, request: EmbeddingRequest) -> Response:
        model = self._model(request.model)
        inputs = await self._chat_ids(model, request) if request.messages else request.inputs()
        if not inputs:
            raise GatewayError("input must not be empty.", 400, param="input")
        check_items(len(inputs), self.limits, "input")
        if request.encoding_format == "bytes":
            check_metadata_fits(len(inputs))
        ids = await self._openai_ids(model, request, inputs)
        vectors = self._resize(model, await self._vectors(model, ids), request.dimensions,
                               "dimensions")
        rows = _float32_rows(_normalised(vectors, request.normalises(model.spec.normalize)))
        return _openai_answer(model.name, request, rows, sum(len(i) for i in ids))

    async def _chat_ids(self, model: SentenceModel,
                        request: EmbeddingRequest) -> list[TokenIds]:
        """`messages` as one input of token ids, which then go where given ids go."""
        texts = [text for message in request.messages or [] for text in message.texts()]
        return [await tokenize_off_loop_if_large(sum(map(len, texts)), chat_token_ids, model,
                                                 request, self.limits)]

    async def _openai_ids(self, model: SentenceModel, request: EmbeddingRequest,
                          inputs: list[str] | list[TokenIds]) -> list[list[int]]:
        """Token ids of each input, tokenized or as given, within the model's limit."""
        asked = request.truncate_prompt_tokens
        truncation: Truncation = "END" if (
            asked is not None or model.truncate_by_default) else None
        limit = model.spec.max_seq_length
        if asked is not None and asked > limit:
            # vLLM refuses it rather than truncating to less than asked.
            raise GatewayError(
                f"truncate_prompt_tokens value ({asked}) is greater than max_model_len "
                f"({limit}). Please, select a smaller truncation size.", 400,
                param="truncate_prompt_tokens")
        if asked is not None and asked > 0:
            limit = asked
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
        truncation: Truncation = None if request.truncate == "NONE" else request.truncate
        prompt = model.spec.prompt(_prompt_name(model.spec, request.input_type))
        ids = await self._tokenize(model, request.texts, prompt, truncation,
                                   model.spec.max_seq_length, "texts")
        rows = self._cohere_rows(model, await self._vectors(model, ids),
                                 request.output_dimension)
        ranges = await self._ranges(model, request.embedding_types, request.output_dimension)
        tokens = sum(len(i) for i in ids)
        embeddings = CohereEmbeddings.model_validate(
            {kind: _cohere_encoding(rows, kind, ranges) for kind in request.embedding_types})
        # Cohere sends only the embedding types asked for, and no null fields.
        return _numpy_json(CohereEmbedResponse(
            id=str(uuid.uuid4()), embeddings=embeddings, texts=request.texts,
            meta=CohereMeta(billed_units=CohereBilledUnits(input_tokens=tokens))),
            exclude_none=True)

    def _cohere_rows(self, model: SentenceModel, vectors: torch.Tensor,
                     size: int | None) -> npt.NDArray[np.float32]:
        """The answer's float32 rows: Matryoshka size, then the model's normalisation. The
        int8 calibration shapes its vectors with this too, so ranges fit the rows."""
        vectors = self._resize(model, vectors, size, "output_dimension")
        return _float32_rows(_normalised(vectors, model.spec.normalize))

    def calibrate(self) -> None:
        """Start every model's int8 / uint8 calibration in the background (the gateway's
        start), so that requests wait for their own model's at most."""
        for model in self.models.values():
            self.calibrations.start(model.name, model.calibration,
                                    functools.partial(self._calibration_vectors, model))

    async def _calibration_vectors(self, model: SentenceModel,
                                   texts: Sequence[str]) -> torch.Tensor:
        """Vectors of the calibration texts, made as a request's are (the default prompt,
        cut at the limit), off the event loop; the texts are the operator's, capped when
        read (`quantize.read_calibration_texts`), so `limits.max_text_chars` is not theirs."""
        ids = await asyncio.to_thread(model.tokenize, texts, model.spec.prompt(None), "END",
                                      model.spec.max_seq_length, "texts")
        return await self._vectors(model, ids)

    async def _ranges(self, model: SentenceModel, kinds: Sequence[CohereEmbeddingType],
                      size: int | None) -> npt.NDArray[np.float32] | None:
        """int8 / uint8 ranges for vectors of `size`, when asked for: the model's
        calibration vectors are made once, the ranges once per size."""
        if not _QUANTIZED_TYPES & set(kinds):
            return None
        return await self.calibrations.ranges(
            model.name, model.calibration, functools.partial(self._calibration_vectors, model),
            lambda vectors: self._cohere_rows(model, vectors, size), size)


def _prompt_name(spec: SentenceSpec, input_type: str | None) -> str | None:
    """Cohere's input_type -> the checkpoint's prompt name (search_query -> query, ...).

    One that names no prompt of the checkpoint is a 400, as vLLM answers it: silently
    embedding without the prompt gives vectors from another space than the caller's index.
    """
    if input_type is None:
        return None
    name = _resolved(spec.prompts, input_type)
    if name is None:
        raise GatewayError(_unsupported_input_type(spec.prompts), 400, param="input_type")
    return name


def _resolved(prompts: dict[str, str], input_type: str) -> str | None:
    candidates = [input_type, input_type.removeprefix("search_")]
    if input_type == "search_document":
        candidates.append("passage")
    return next((c for c in candidates if c in prompts), None)


def _unsupported_input_type(prompts: dict[str, str]) -> str:
    """vLLM's message, without the value sent (errors name fields, never echo them)."""
    if not prompts:
        return ("Unsupported input_type. This model does not define any input_type task "
                "instructions.")
    names = set(prompts) | {t for t in _COHERE_INPUT_TYPES if _resolved(prompts, t)}
    return f"Unsupported input_type. Supported values: {', '.join(sorted(names))}"


def _normalised(vectors: torch.Tensor, normalise: bool) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, p=2, dim=1) if normalise else vectors


def _openai_answer(model: str, request: EmbeddingRequest, rows: npt.NDArray[np.float32],
                   tokens: int) -> Response:
    """The rows in the asked encoding: JSON floats or base64 items, or vLLM's raw bytes."""
    if request.encoding_format in ("bytes", "bytes_only"):
        return bytes_answer(vector_bytes(rows, request.embed_dtype, request.endianness),
                            request.embed_dtype, request.endianness, model, tokens,
                            with_metadata=request.encoding_format == "bytes")
    embeddings: list[str] | npt.NDArray[np.float32] = rows
    if request.encoding_format == "base64":
        embeddings = base64_rows(vector_bytes(rows, request.embed_dtype, request.endianness))
    return _numpy_json(EmbeddingResponse(
        data=[Embedding(index=i, embedding=e) for i, e in enumerate(embeddings)],
        model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)))


def _float32_rows(vectors: torch.Tensor) -> npt.NDArray[np.float32]:
    # Contiguous: a Matryoshka cut that is not renormalised is a strided view, which
    # orjson refuses to write.
    return np.ascontiguousarray(vectors.numpy(), dtype="<f4")


def _cohere_encoding(rows: npt.NDArray[np.float32], kind: CohereEmbeddingType,
                     ranges: npt.NDArray[np.float32] | None) -> npt.NDArray[Any] | list[str]:
    if kind == "float":
        return rows
    if kind == "int8" or kind == "uint8":
        assert ranges is not None  # `_ranges` calibrates whenever these are asked for
        return quantize(rows, ranges, kind)
    if kind == "base64":
        return base64_rows(rows)  # the rows are little-endian float32, as Cohere sends them
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
