"""OpenAI `/v1/chat/completions`: messages with text and `prompt_embeds` parts (vLLM), the
request, and its answers, whole and streamed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from serve_app.errors import InvalidField, shown
from serve_app.protocol.base import TEXT_UPSTREAM, RequestModel
from serve_app.protocol.common import ResponseModel, UsageInfo
from serve_app.protocol.sampling import (
    FORWARDED,
    OpenAISampling,
    SamplingFields,
    StructuredOutputs,
    VllmSampling,
    sampling_fields,
    streamed_only,
)


def json_strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value: template variables are client text too."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from json_strings(item)

_CONTENT_PART_TYPES = ("text", "prompt_embeds")

_NO_TOOLS = "Tool calls are not supported by this gateway ({param})."


def known_part_types(content: Any, accepted: tuple[str, ...], advice: str) -> Any:
    """`content` if each of its parts has an `accepted` type; else the first other part's
    `type` refused by its path (`messages.0.content.1.type`), with `advice`."""
    for index, part in enumerate(content if isinstance(content, list) else []):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in accepted:
            raise InvalidField(f"{index}.type", f"{{param}}: content part type "
                               f"{shown(repr(kind))} is not supported; {advice}")
    return content


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class EmbedsPart(RequestModel):
    type: Literal["prompt_embeds"]
    data: str = Field(description="Base64 of torch.save of a (rows, hidden) tensor (vLLM).")


def _part_tag(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return f"part[{kind}]" if kind in _CONTENT_PART_TYPES else None


# Discriminated: only the part's own model validates it (and refuses its unknown fields).
# Pydantic writes the tag into an error's location; bracketed, as its own markers are, it
# stays out of the field path (`messages.0.content.1.text`, not `...1.text.text`).
ContentPart = Annotated[
    Annotated[TextPart, Tag("part[text]")] | Annotated[EmbedsPart, Tag("part[prompt_embeds]")],
    Discriminator(_part_tag)]


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    # What an SDK sends back when a previous answer's message is appended to the history;
    # accepted when empty, as the gateway's answers leave them.
    refusal: str | None = None
    tool_calls: list[Any] | None = Field(None, max_length=0)
    function_call: None = None
    audio: None = None
    annotations: list[Any] | None = Field(None, max_length=0)

    refused: ClassVar[dict[str, str]] = {
        "tool_call_id": "tools are not supported by this gateway",
    }

    @model_validator(mode="before")
    @classmethod
    def _no_tools(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for field in ("tool_calls", "function_call"):
            if data.get(field):
                raise InvalidField(field, _NO_TOOLS, code="unsupported_parameter")
        if data.get("role") in ("tool", "function"):
            raise InvalidField("role", _NO_TOOLS, code="unsupported_parameter")
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _known_part_types(cls, content: Any) -> Any:
        return known_part_types(content, _CONTENT_PART_TYPES,
                                "this gateway accepts `text` and `prompt_embeds` parts")

    def texts(self) -> list[str]:
        """The message's text, for what tokenizing it will cost."""
        texts = [self.content] if isinstance(self.content, str) else [
            p.text for p in self.content or [] if isinstance(p, TextPart)]
        return [*texts, self.name] if self.name else texts


class ChatCompletionRequest(OpenAISampling, VllmSampling, StructuredOutputs):
    # Ordered as in https://platform.openai.com/docs/api-reference/chat/create
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = Field(None, description="Dropped: never forwarded.")
    modalities: list[Literal["text"]] | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = Field(None, description="Dropped: never forwarded.")
    safety_identifier: str | None = Field(None, description="Dropped: never forwarded.")
    service_tier: str | None = Field(None, description="Dropped: never forwarded.")
    store: bool | None = Field(None, description="Dropped: nothing is stored.")
    tool_choice: Literal["none"] | None = None
    top_logprobs: int | None = Field(None, ge=0)
    user: str | None = Field(None, description="Dropped: an end-user id, never forwarded.")

    # --- extras (vLLM) ---
    add_generation_prompt: bool = Field(
        True, description="End the prompt with the template's assistant header."
    )
    continue_final_message: bool = Field(
        False, description="Leave the last (assistant) message open for the model to go on."
    )
    add_special_tokens: bool = Field(
        False, description="vLLM: add the tokenizer's special tokens (BOS) on top of the "
        "template's own.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra variables for the chat template, e.g. `enable_thinking`."
    )

    refused: ClassVar[dict[str, str]] = {
        "tools": "tools are not supported by this gateway",
        "functions": "tools are not supported by this gateway",
        "function_call": "tools are not supported by this gateway",
        "audio": "audio is not supported by this gateway",
        "prediction": TEXT_UPSTREAM,
        "web_search_options": "web search is not supported by this gateway",
        "reasoning_effort": "reasoning controls are not supported by this gateway",
        "verbosity": "verbosity controls are not supported by this gateway",
        "chat_template": "chat templates are the server's own (model.chat_template)",
        "documents": "documents are not supported by this gateway; put them in the messages",
        "mm_processor_kwargs": "multimodal inputs are not supported by this gateway",
        "echo": "echo is not supported by this gateway",
    }

    @model_validator(mode="before")
    @classmethod
    def _no_tool_choice(cls, data: Any) -> Any:
        """`tool_choice` other than "none" refused as `tools` is, whatever its shape."""
        if isinstance(data, dict) and data.get("tool_choice") not in (None, "none"):
            raise InvalidField("tool_choice", _NO_TOOLS, code="unsupported_parameter")
        return data

    _streamed_only = field_validator("stream_options")(streamed_only)

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidField("top_logprobs", "top_logprobs needs logprobs set to true")
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidField("continue_final_message", "add_generation_prompt and "
                               "continue_final_message exclude each other; set "
                               "add_generation_prompt to false")
        return self

    def upstream_fields(self) -> SamplingFields:
        """The upstream completions request's sampling part: the allowlisted fields the
        client set, with the chat spellings of `max_tokens` and `logprobs` translated."""
        fields = self.model_dump(include=FORWARDED - {"logprobs", "max_tokens"},
                                 exclude_unset=True)
        if self.completion_max_tokens is not None:
            fields["max_tokens"] = self.completion_max_tokens
        if self.logprobs:
            fields["logprobs"] = self.top_logprobs or 0
        return sampling_fields(self, fields)

    def texts(self) -> list[str]:
        """Every client text the template will render: messages, names, template variables."""
        return [text for message in self.messages for text in message.texts()] + list(
            json_strings(self.chat_template_kwargs))

    @property
    def completion_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_logprobs(self) -> int | None:
        """Alternatives per token the answer carries; None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatTopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(ResponseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(
        None, description="vLLM: the stop string or token id that ended the choice.")


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None


class ChatDelta(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ResponseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
