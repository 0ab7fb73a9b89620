"""Strict copies of the public answer schemas the gateway's clients parse: OpenAI's
completions, chat completions, embeddings, models and errors, and Cohere's v2 embed.

Written from the API references, not from `serve_app.protocol`, so that an answer the
gateway builds wrongly cannot pass by sharing the mistake. Every model forbids fields it
does not declare and parses strictly. A field OpenAI's reference marks as always present
(nullable or not) is required here even where the SDK defaults it. The only fields beyond
the references are vLLM's, where vLLM sends them; each says so in a comment and is listed
in `VLLM_EXTRAS`.

References:
- https://platform.openai.com/docs/api-reference/completions/object
- https://platform.openai.com/docs/api-reference/chat/object and /chat/streaming
- https://platform.openai.com/docs/api-reference/embeddings/object
- https://platform.openai.com/docs/api-reference/models/object
- https://platform.openai.com/docs/guides/error-codes (the error object)
- https://docs.cohere.com/reference/embed (v2, `embeddings_by_type`)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Int8 = Annotated[int, Field(ge=-128, le=127)]
UInt8 = Annotated[int, Field(ge=0, le=255)]

# --------------------------------------------------------------------------- usage


class CompletionTokensDetails(Strict):
    accepted_prediction_tokens: int | None = None
    audio_tokens: int | None = None
    reasoning_tokens: int | None = None
    rejected_prediction_tokens: int | None = None


class PromptTokensDetails(Strict):
    audio_tokens: int | None = None
    cached_tokens: int | None = None


class CompletionUsage(Strict):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None
    prompt_tokens_details: PromptTokensDetails | None = None


# --------------------------------------------------------------------------- completions

CompletionFinish = Literal["stop", "length", "content_filter"]


class CompletionLogprobs(Strict):
    text_offset: list[int] | None = None
    token_logprobs: list[float] | None = None
    tokens: list[str] | None = None
    top_logprobs: list[dict[str, float]] | None = None


class CompletionChoice(Strict):
    finish_reason: CompletionFinish
    index: int
    logprobs: CompletionLogprobs | None
    text: str
    # vLLM: the stop string or token id that ended the choice (null for EOS or length).
    stop_reason: int | str | None = None


class Completion(Strict):
    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    object: Literal["text_completion"]
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


class CompletionChunkChoice(Strict):
    """A streamed choice: a `Completion` choice whose `finish_reason` is null until its
    last chunk."""

    finish_reason: CompletionFinish | None
    index: int
    logprobs: CompletionLogprobs | None
    text: str
    # vLLM: as in `CompletionChoice`.
    stop_reason: int | str | None = None


class CompletionChunk(Strict):
    """One event of a completions stream; with `stream_options.include_usage` the last one
    has `choices: []` and the usage, the others `usage` null or absent."""

    id: str
    choices: list[CompletionChunkChoice]
    created: int
    model: str
    object: Literal["text_completion"]
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


# --------------------------------------------------------------------------- chat

ChatFinish = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]


class TopLogprob(Strict):
    token: str
    bytes: list[int] | None
    logprob: float


class ChatCompletionTokenLogprob(Strict):
    token: str
    bytes: list[int] | None
    logprob: float
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Strict):
    content: list[ChatCompletionTokenLogprob] | None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class FunctionCall(Strict):
    arguments: str
    name: str


class ToolCall(Strict):
    id: str
    function: FunctionCall
    type: Literal["function"]


class UrlCitation(Strict):
    end_index: int
    start_index: int
    title: str
    url: str


class Annotation(Strict):
    type: Literal["url_citation"]
    url_citation: UrlCitation


class ChatCompletionAudio(Strict):
    id: str
    data: str
    expires_at: int
    transcript: str


class ChatCompletionMessage(Strict):
    content: str | None
    # OpenAI always sends `refusal` (null when none); vLLM leaves it out.
    refusal: str | None = None
    role: Literal["assistant"]
    annotations: list[Annotation] | None = None
    audio: ChatCompletionAudio | None = None
    function_call: FunctionCall | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Strict):
    finish_reason: ChatFinish
    index: int
    logprobs: ChoiceLogprobs | None
    message: ChatCompletionMessage
    # vLLM: the stop string or token id that ended the choice.
    stop_reason: int | str | None = None


class ChatCompletion(Strict):
    id: str
    choices: list[ChatChoice]
    created: int
    model: str
    object: Literal["chat.completion"]
    service_tier: ServiceTier | None = None
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


class ChoiceDeltaFunctionCall(Strict):
    arguments: str | None = None
    name: str | None = None


class ChoiceDeltaToolCall(Strict):
    index: int
    id: str | None = None
    function: ChoiceDeltaFunctionCall | None = None
    type: Literal["function"] | None = None


class ChoiceDelta(Strict):
    content: str | None = None
    function_call: ChoiceDeltaFunctionCall | None = None
    refusal: str | None = None
    role: Literal["developer", "system", "user", "assistant", "tool"] | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChatChunkChoice(Strict):
    delta: ChoiceDelta
    finish_reason: ChatFinish | None
    index: int
    logprobs: ChoiceLogprobs | None = None
    # vLLM: as in `ChatChoice`, in the chunk that ends the choice.
    stop_reason: int | str | None = None


class ChatCompletionChunk(Strict):
    id: str
    choices: list[ChatChunkChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"]
    service_tier: ServiceTier | None = None
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


# --------------------------------------------------------------------------- embeddings


class Embedding(Strict):
    # Floats; a string (base64 of little-endian float32) when `encoding_format` is base64.
    embedding: list[float] | str
    index: int
    object: Literal["embedding"]


class EmbeddingUsage(Strict):
    prompt_tokens: int
    total_tokens: int
    # vLLM: its UsageInfo sends completion_tokens 0 for embeddings too.
    completion_tokens: Literal[0]


class CreateEmbeddingResponse(Strict):
    data: list[Embedding]
    model: str
    object: Literal["list"]
    usage: EmbeddingUsage


# --------------------------------------------------------------------------- models


class Model(Strict):
    id: str
    created: int
    object: Literal["model"]
    owned_by: str
    # vLLM: the model's context length, and an adapter's base model (vLLM also sends root
    # and permission).
    max_model_len: int | None = None
    parent: str | None = None


class ModelList(Strict):
    object: Literal["list"]
    data: list[Model]


# --------------------------------------------------------------------------- errors


class ErrorObject(Strict):
    message: str
    type: str
    param: str | None
    # OpenAI sends a string or null; vLLM sends the HTTP status as an integer.
    code: str | int | None
    # The gateway's own: the request id (OpenAI sends it only as the x-request-id header).
    request_id: str | None = None


class ErrorResponse(Strict):
    error: ErrorObject


# --------------------------------------------------------------------------- Cohere v2


class CohereEmbeddings(Strict):
    """One list per asked type, one row per text."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    float_: list[list[float]] | None = Field(None, alias="float")
    int8: list[list[Int8]] | None = None
    uint8: list[list[UInt8]] | None = None
    binary: list[list[Int8]] | None = None
    ubinary: list[list[UInt8]] | None = None
    base64: list[str] | None = None


class CohereImage(Strict):
    width: int
    height: int
    format: str
    bit_depth: int


class CohereApiVersion(Strict):
    version: str
    is_deprecated: bool | None = None
    is_experimental: bool | None = None


class CohereBilledUnits(Strict):
    images: float | None = None
    input_tokens: float | None = None
    image_tokens: float | None = None
    output_tokens: float | None = None
    search_units: float | None = None
    classifications: float | None = None
    pages: float | None = None


class CohereTokens(Strict):
    input_tokens: float | None = None
    output_tokens: float | None = None


class CohereMeta(Strict):
    api_version: CohereApiVersion | None = None
    billed_units: CohereBilledUnits | None = None
    tokens: CohereTokens | None = None
    cached_tokens: float | None = None
    warnings: list[str] | None = None


class EmbedByTypeResponse(Strict):
    id: str
    embeddings: CohereEmbeddings
    texts: list[str] | None = None
    images: list[CohereImage] | None = None
    meta: CohereMeta | None = None
    response_type: Literal["embeddings_by_type"]


VLLM_EXTRAS: dict[type[Strict], frozenset[str]] = {
    CompletionChoice: frozenset({"stop_reason"}),
    CompletionChunkChoice: frozenset({"stop_reason"}),
    ChatChoice: frozenset({"stop_reason"}),
    ChatChunkChoice: frozenset({"stop_reason"}),
    Model: frozenset({"max_model_len", "parent"}),
    EmbeddingUsage: frozenset({"completion_tokens"}),
    # Not vLLM's: the gateway's request id, to quote in a ticket (docs/observability.md).
    ErrorObject: frozenset({"request_id"}),
}
"""The fields each copy declares beyond OpenAI's schema, because vLLM (or, for the error's
`request_id`, the gateway) sends them."""
