"""Pydantic mirrors of the OpenAI completions schema, plus the gateway's extras.

Fields follow the OpenAI API reference's order; our extras sit together at the end of
each model with descriptions. Unknown request fields are kept (`extra="allow"`) and
forwarded upstream, as vLLM does with its own extensions; only their names are logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

TokenIds = list[int]

SSE_DONE = b"data: [DONE]\n\n"
"""The last event of every completion stream."""


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="after")
    def _log_extra_field_names(self) -> OpenAIBaseModel:
        if self.model_extra:
            logger.info("forwarding unrecognised fields: %s", sorted(self.model_extra))
        return self


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False


class CompletionRequest(OpenAIBaseModel):
    # Ordered as in https://platform.openai.com/docs/api-reference/completions/create
    model: str
    prompt: str | list[str] | TokenIds | list[TokenIds] | None = None
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = False
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None

    # --- extras (vLLM / NIM) ---
    prompt_embeds: str | list[str] | None = Field(
        None,
        description=(
            "Base64 of torch.save of a (rows, hidden) tensor, or a list of them. NIM's "
            "spelling `prompt-embeds` is accepted too."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _merge_embeds_spellings(cls, data: Any) -> Any:
        if isinstance(data, dict) and "prompt-embeds" in data:
            data = dict(data)
            nim_spelling = data.pop("prompt-embeds")
            if data.get("prompt_embeds") is not None:
                raise ValueError("send prompt_embeds or prompt-embeds, not both")
            data["prompt_embeds"] = nim_spelling
        return data

    def text_prompts(self) -> list[str] | list[TokenIds]:
        """The `prompt` field as a list of texts or of token-id lists (maybe empty).

        An empty string beside embeddings is NIM's convention for "no text prompt".
        """
        prompt = self.prompt
        if prompt is None:
            return []
        if isinstance(prompt, str):
            return [] if prompt == "" and self.prompt_embeds is not None else [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]
        if prompt == [""] and self.prompt_embeds is not None:
            return []
        return prompt  # type: ignore[return-value]

    def embeds_list(self) -> list[str]:
        if self.prompt_embeds is None:
            return []
        return [self.prompt_embeds] if isinstance(self.prompt_embeds, str) else self.prompt_embeds

    def upstream_fields(self) -> dict[str, Any]:
        """What the client set, for forwarding: never the prompt, nor the `user` identifier."""
        return self.model_dump(exclude_unset=True, exclude=_NOT_FORWARDED)

    def incompatible_with_embeds(self) -> str | None:
        """The first field vLLM refuses beside prompt embeddings, if the request sets one."""
        extras = self.model_extra or {}
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if extras.get("prompt_logprobs") is not None:
            return "prompt_logprobs"
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# Text fields that would carry client text upstream: the prompt itself and the end-user id.
_NOT_FORWARDED = {"model", "prompt", "prompt_embeds", "user"}


# --------------------------------------------------------------------------- chat

_CONTENT_PART_TYPES = ("text", "prompt_embeds")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class EmbedsPart(BaseModel):
    type: Literal["prompt_embeds"]
    data: str = Field(description="Base64 of torch.save of a (rows, hidden) tensor (vLLM).")


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | EmbedsPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _known_part_types(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _CONTENT_PART_TYPES:
                raise ValueError(
                    f"content part type {kind!r} is not supported; this gateway accepts "
                    "`text` and `prompt_embeds` parts"
                )
        return content

    def text_length(self) -> int:
        """Characters of text in the message (what tokenizing it costs)."""
        if isinstance(self.content, str):
            return len(self.content)
        return sum(len(p.text) for p in self.content or [] if isinstance(p, TextPart))

    @model_validator(mode="after")
    def _no_tool_calls(self) -> ChatMessage:
        if self.model_extra and {"tool_calls", "function_call"} & set(self.model_extra):
            raise ValueError("tool calls are not supported by this gateway")
        return self


class ChatCompletionRequest(OpenAIBaseModel):
    # Ordered as in https://platform.openai.com/docs/api-reference/chat/create
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    store: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0)
    tool_choice: Any = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None

    # --- extras (vLLM) ---
    add_generation_prompt: bool = Field(
        True, description="End the prompt with the template's assistant header."
    )
    continue_final_message: bool = Field(
        False, description="Leave the last (assistant) message open for the model to go on."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra variables for the chat template, e.g. `enable_thinking`."
    )

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools and tool_choice are not supported by this gateway")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("only response_format {\"type\": \"text\"} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message exclude "
                             "each other; set add_generation_prompt to false")
        return self

    def completion_fields(self) -> dict[str, Any]:
        """The upstream completions request's sampling part (never the messages or `user`)."""
        fields = self.model_dump(exclude_unset=True, include=_CHAT_SAMPLING_FIELDS)
        if self.max_completion_tokens is not None:
            fields["max_tokens"] = self.max_completion_tokens
        fields.pop("logprobs", None)
        if self.logprobs:
            fields["logprobs"] = self.top_logprobs or 0
        fields.update(self.model_extra or {})  # unknown fields pass through, as on completions
        return fields

    @property
    def completion_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# Chat fields that mean the same on the upstream's completions endpoint.
_CHAT_SAMPLING_FIELDS = {
    "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty",
    "seed", "stop", "stream", "stream_options", "temperature", "top_p",
}


# --------------------------------------------------------------------------- embeddings


class EmbeddingRequest(OpenAIBaseModel):
    # Ordered as in https://platform.openai.com/docs/api-reference/embeddings/create
    input: str | list[str] | TokenIds | list[TokenIds]
    model: str
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    # --- extras (vLLM) ---
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1,
        description="Keep only the first N tokens of each input (-1: the model's limit).",
    )

    def inputs(self) -> list[str] | list[TokenIds]:
        """`input` as a list of texts or of token-id lists (maybe empty)."""
        value: Any = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        return list(value)


CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereEmbedRequest(OpenAIBaseModel):
    # Ordered as in https://docs.cohere.com/reference/embed (v2)
    model: str
    texts: list[str] = Field(min_length=1)
    input_type: str | None = Field(
        None, description="search_query, search_document, classification or clustering."
    )
    embedding_types: list[CohereEmbeddingType] = Field(
        default_factory=lambda: list[CohereEmbeddingType](["float"]), min_length=1)
    output_dimension: int | None = Field(None, ge=1)
    truncate: Literal["NONE", "START", "END"] = "END"


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "serve_app"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int | None = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
