"""CohereEmbedService: Cohere's `/v2/embed` over the sentence models.

`input_type` picks the checkpoint's sentence-transformers prompt, `truncate` how long texts
are cut, `output_dimension` the Matryoshka size, and `embedding_types` the encodings:
float, base64 (little-endian float32), binary and ubinary (sign bits), and int8 / uint8
from each model's calibrated ranges (`sentence.quantize`), calibrated in the background
from the gateway's start.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from starlette.responses import Response

from serve_app.endpoint import answer
from serve_app.errors import GatewayError
from serve_app.limits import check_items
from serve_app.protocol import CohereEmbedRequest
from serve_app.protocol.embeddings import (
    CohereBilledUnits,
    CohereEmbeddings,
    CohereEmbeddingType,
    CohereEmbedResponse,
    CohereMeta,
)
from serve_app.sentence.encoder import SentenceSpec
from serve_app.sentence.inputs import SentenceModel, Truncation
from serve_app.sentence.quantize import CalibrationCache, quantize
from serve_app.sentence.service import SentenceService, float32_rows, normalised, numpy_json
from serve_app.sentence.vector_bytes import base64_rows

_QUANTIZED_TYPES = {"int8", "uint8"}
_COHERE_INPUT_TYPES = ("search_query", "search_document", "classification", "clustering")


class CohereEmbedService:
    """`/v2/embed` for the sentence models, and their int8 / uint8 calibration."""

    def __init__(self, sentence: SentenceService) -> None:
        self.sentence = sentence
        self.calibrations = CalibrationCache()

    async def embed(self, body: bytes) -> Response:
        return await answer(body, CohereEmbedRequest, self._embed)

    async def _embed(self, request: CohereEmbedRequest) -> Response:
        sentence = self.sentence
        model = sentence.model(request.model)
        check_items(len(request.texts), sentence.limits, "texts")
        truncation: Truncation = None if request.truncate == "NONE" else request.truncate
        prompt = model.spec.prompt(_prompt_name(model.spec, request.input_type))
        ids = await sentence.tokenize(model, request.texts, prompt, truncation,
                                      model.spec.max_seq_length, "texts")
        rows = self._rows(model, await sentence.vectors(model, ids), request.output_dimension)
        ranges = await self._ranges(model, request.embedding_types, request.output_dimension)
        tokens = sum(len(i) for i in ids)
        embeddings = CohereEmbeddings.model_validate(
            {kind: _encoding(rows, kind, ranges) for kind in request.embedding_types})
        # Cohere sends only the embedding types asked for, and no null fields.
        return numpy_json(CohereEmbedResponse(
            id=str(uuid.uuid4()), embeddings=embeddings, texts=request.texts,
            meta=CohereMeta(billed_units=CohereBilledUnits(input_tokens=tokens))),
            exclude_none=True)

    def _rows(self, model: SentenceModel, vectors: torch.Tensor,
              size: int | None) -> npt.NDArray[np.float32]:
        """The answer's float32 rows: Matryoshka size, then the model's normalisation. The
        int8 calibration shapes its vectors with this too, so ranges fit the rows."""
        vectors = self.sentence.resize(model, vectors, size, "output_dimension")
        return float32_rows(normalised(vectors, model.spec.normalize))

    def calibrate(self) -> None:
        """Start every model's int8 / uint8 calibration in the background (the gateway's
        start), so that requests wait for their own model's at most."""
        for model in self.sentence.models.values():
            self.calibrations.start(model.name, model.calibration,
                                    functools.partial(self._calibration_vectors, model))

    async def _calibration_vectors(self, model: SentenceModel,
                                   texts: Sequence[str]) -> torch.Tensor:
        """Vectors of the calibration texts, made as a request's are (the default prompt,
        cut at the limit), off the event loop; the texts are the operator's, capped when
        read (`quantize.read_calibration_texts`), so `limits.max_text_chars` is not theirs."""
        ids = await asyncio.to_thread(model.tokenize, texts, model.spec.prompt(None), "END",
                                      model.spec.max_seq_length, "texts")
        return await self.sentence.vectors(model, ids)

    async def _ranges(self, model: SentenceModel, kinds: Sequence[CohereEmbeddingType],
                      size: int | None) -> npt.NDArray[np.float32] | None:
        """int8 / uint8 ranges for vectors of `size`, when asked for: the model's
        calibration vectors are made once, the ranges once per size."""
        if not _QUANTIZED_TYPES & set(kinds):
            return None
        return await self.calibrations.ranges(
            model.name, model.calibration, functools.partial(self._calibration_vectors, model),
            lambda vectors: self._rows(model, vectors, size), size)


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


def _encoding(rows: npt.NDArray[np.float32], kind: CohereEmbeddingType,
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
