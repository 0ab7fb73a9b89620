"""EmbeddingsService: OpenAI `/v1/embeddings` (and vLLM's extensions of it) over the
sentence models.

An input is text, token ids, or vLLM's `messages`, which the model's chat template makes
one input (`sentence.chat`). The vectors come from the sentence models (`SentenceService`):
cut to `dimensions`, normalised unless the request turns it off, and answered as JSON
floats, base64 items, or vLLM's raw bytes (`sentence.vector_bytes`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from starlette.responses import Response

from serve_app.endpoint import answer
from serve_app.errors import GatewayError
from serve_app.limits import check_items
from serve_app.prompts.checkpoint import tokenize_off_loop_if_large
from serve_app.protocol import EmbeddingRequest, TokenIds
from serve_app.protocol.embeddings import Embedding, EmbeddingResponse, EmbeddingUsage
from serve_app.sentence.chat import chat_token_ids
from serve_app.sentence.inputs import SentenceModel, Truncation
from serve_app.sentence.service import SentenceService, float32_rows, normalised, numpy_json
from serve_app.sentence.vector_bytes import (
    base64_rows,
    bytes_answer,
    check_metadata_fits,
    vector_bytes,
)


class EmbeddingsService:
    """`/v1/embeddings` for the sentence models."""

    def __init__(self, sentence: SentenceService) -> None:
        self.sentence = sentence

    async def create_embedding(self, body: bytes) -> Response:
        return await answer(body, EmbeddingRequest, self._embed)

    async def _embed(self, request: EmbeddingRequest) -> Response:
        sentence = self.sentence
        model = sentence.model(request.model)
        inputs = await self._chat_ids(model, request) if request.messages else request.inputs()
        if not inputs:
            raise GatewayError("input must not be empty.", 400, param="input")
        check_items(len(inputs), sentence.limits, "input")
        if request.encoding_format == "bytes":
            check_metadata_fits(len(inputs))
        ids = await self._ids(model, request, inputs)
        vectors = sentence.resize(model, await sentence.vectors(model, ids),
                                  request.dimensions, "dimensions")
        rows = float32_rows(normalised(vectors, request.normalises(model.spec.normalize)))
        return _answer(model.name, request, rows, sum(len(i) for i in ids))

    async def _chat_ids(self, model: SentenceModel,
                        request: EmbeddingRequest) -> list[TokenIds]:
        """`messages` as one input of token ids, which then go where given ids go."""
        texts = [text for message in request.messages or [] for text in message.texts()]
        return [await tokenize_off_loop_if_large(sum(map(len, texts)), chat_token_ids, model,
                                                 request, self.sentence.limits)]

    async def _ids(self, model: SentenceModel, request: EmbeddingRequest,
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
            return await self.sentence.tokenize(model, texts, model.spec.prompt(None),
                                                truncation, limit, "input",
                                                request.input_listed)
        # A chat's templated ids are one input, named by the field they come from.
        param, listed = ("messages", False) if request.messages else (
            "input", request.input_listed)
        given = [list(i) for i in inputs if isinstance(i, list)]
        ids = model.check(given, truncation, limit, param, listed)
        model.check_vocab(ids, param, listed)
        return ids


def _answer(model: str, request: EmbeddingRequest, rows: npt.NDArray[np.float32],
            tokens: int) -> Response:
    """The rows in the asked encoding: JSON floats or base64 items, or vLLM's raw bytes."""
    if request.encoding_format in ("bytes", "bytes_only"):
        return bytes_answer(vector_bytes(rows, request.embed_dtype, request.endianness),
                            request.embed_dtype, request.endianness, model, tokens,
                            with_metadata=request.encoding_format == "bytes")
    embeddings: list[str] | npt.NDArray[np.float32] = rows
    if request.encoding_format == "base64":
        embeddings = base64_rows(vector_bytes(rows, request.embed_dtype, request.endianness))
    return numpy_json(EmbeddingResponse(
        data=[Embedding(index=i, embedding=e) for i, e in enumerate(embeddings)],
        model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)))
