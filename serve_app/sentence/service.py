"""SentenceService: what OpenAI `/v1/embeddings` and Cohere `/v2/embed` share on the
encoder replicas.

The sentence models by served name; for a request, the model it names, its texts tokenized
(with the model's sentence-transformers prompt for the input type) within the length
limits, packed into chunks of one Encoder batch's tokens and sent to the encoder deployment
a few at a time. The vectors come back pooled; Matryoshka truncation and normalisation
happen here, and the answer's JSON is written straight from numpy. Each API's request and
answer are its own (`api.embeddings`, `api.cohere`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt
import orjson
import torch
from pydantic import BaseModel
from starlette.responses import Response

from serve_app.config import AppConfig, LimitsConfig
from serve_app.errors import GatewayError, model_not_found, model_on_other_api
from serve_app.limits import check_text_chars
from serve_app.observability import access
from serve_app.prompts.chat_template import load_chat_template
from serve_app.prompts.checkpoint import load_tokenizer, tokenize_off_loop_if_large
from serve_app.protocol import ModelCard
from serve_app.sentence.encoder import EncoderCore, chunks, read_sentence_spec, resolve_encoder_dir
from serve_app.sentence.inputs import SentenceModel, Truncation
from serve_app.sentence.quantize import calibration_for

ENCODER_CALLS_PER_REQUEST = 4
"""Encoder calls one request keeps in flight. An Encoder replica runs one batch while the
next waits, so a few calls keep it (or a few replicas) busy; and another request's call
waits behind at most this many calls of each large request, not behind all of them."""

class EncoderClient(Protocol):
    async def encode(self, model: str, chunk: list[list[int]]) -> torch.Tensor: ...


class InProcessEncoderClient:
    """Encoder cores called directly, for running without Ray."""

    def __init__(self, cores: dict[str, EncoderCore]) -> None:
        self.cores = cores

    async def encode(self, model: str, chunk: list[list[int]]) -> torch.Tensor:
        return (await asyncio.to_thread(self.cores[model].encode, [chunk]))[0]


class SentenceService:
    """The sentence models of both embeddings APIs, their vectors from `encoders`;
    `other_models` are served names that get a 400 here, not a 404."""

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

    def model(self, name: str) -> SentenceModel:
        """The model a request names; a 404, or a 400 for the completions model."""
        if name in self.models:
            record = access.current()
            if record is not None:  # a configured name: safe as a metric label
                record.model = name
            return self.models[name]
        if name in self.other_models:
            raise model_on_other_api(name, "completions",
                                     "/v1/completions or /v1/chat/completions")
        raise model_not_found(name)

    async def vectors(self, model: SentenceModel, ids: list[list[int]]) -> torch.Tensor:
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
    def resize(model: SentenceModel, vectors: torch.Tensor, size: int | None,
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

    async def tokenize(self, model: SentenceModel, texts: Sequence[str], prompt: str,
                        truncation: Truncation, limit: int, param: str,
                        listed: bool = True) -> list[list[int]]:
        """A request's texts as token ids: each refused (by its path, `texts.2`, or the
        field itself where it is not `listed`) or cut to its limit, and all of them within
        `limits.max_text_chars`, before any is tokenized."""
        chars = model.text_chars(texts, prompt, truncation, limit, param, listed)
        check_text_chars(chars, self.limits, param)
        return await tokenize_off_loop_if_large(chars, model.tokenize, texts, prompt,
                                                truncation, limit, param, listed)


def normalised(vectors: torch.Tensor, normalise: bool) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, p=2, dim=1) if normalise else vectors


def float32_rows(vectors: torch.Tensor) -> npt.NDArray[np.float32]:
    # Contiguous: a Matryoshka cut that is not renormalised is a strided view, which
    # orjson refuses to write.
    return np.ascontiguousarray(vectors.numpy(), dtype="<f4")


def numpy_json(answer: BaseModel, exclude_none: bool = False) -> Response:
    """The answer with its vectors written by orjson straight from numpy: the models keep
    them as arrays (see `protocol.embeddings`), and JSON of Python floats would take four
    times as long and twice the bytes."""
    payload = answer.model_dump(by_alias=True, exclude_none=exclude_none)
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")
