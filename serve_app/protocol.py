"""Pydantic mirrors of the OpenAI and Cohere requests, and the allowlist of what goes upstream.

Every request field is declared, typed and bounded, and is one of:
- **forwarded**: a sampling parameter of `SamplingFields`, the only part of a request that
  reaches an upstream beside the embeddings;
- **used here**: prompts, messages and template options, turned into embeddings in the
  gateway;
- **dropped**: identifiers OpenAI clients send routinely (`user`, `metadata`, ...); accepted,
  never forwarded;
- **refused**: a 400 naming the field and why (it would carry text upstream, or the gateway
  does not serve it).
Any other field is refused as OpenAI's API refuses it; a null value counts as unset.
`docs/upstream-fields.md` holds the whole table. Fields follow the API references' order.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from serve_app.errors import GatewayError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
"""Stop strings are the one text a generation needs upstream (docs/upstream-fields.md):
bounded, so a request cannot ride more than a few kilobytes of text on them."""

TokenId = Annotated[int, Field(ge=0)]
TokenIds = list[TokenId]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]

_TEXT_UPSTREAM = "it would carry client text to the upstream"


def _shown(name: str) -> str:
    """A client's field name as an error quotes it: bounded, never a whole payload."""
    return name if len(name) <= 64 else name[:61] + "..."


class RequestModel(BaseModel):
    """Strict types (no `"7"` for 7, no `true` for 1); unknown fields refused by name."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    refused: ClassVar[dict[str, str]] = {}
    """Fields this API knows and does not accept, with the reason the 400 gives."""

    @model_validator(mode="before")
    @classmethod
    def _declared_fields_only(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = cls._respelled({key: value for key, value in data.items() if value is not None})
        known = _declared(cls)
        for key in data:
            if key in known:
                continue
            reason = _refusals(cls).get(key)
            if reason:
                raise GatewayError(f"{_shown(key)} is not accepted: {reason}.", 400,
                                   param=_shown(key), code="unsupported_parameter")
            raise GatewayError(f"Unrecognized request argument supplied: {_shown(key)}", 400,
                               param=_shown(key), code="unrecognized_argument")
        return data

    @classmethod
    def _respelled(cls, data: dict[str, Any]) -> dict[str, Any]:
        """`data` with other spellings of a field under its own name (none by default)."""
        return data


@functools.cache
def _declared(model: type[RequestModel]) -> frozenset[str]:
    """A request model's field names and aliases (worked out once per model, not per
    request: every message and content part of a chat is validated by one)."""
    fields = model.model_fields.values()
    return frozenset(model.model_fields) | {f.alias for f in fields if f.alias}


@functools.cache
def _refusals(model: type[RequestModel]) -> dict[str, str]:
    """`refused` of a model and its bases, the nearest class's reason first."""
    return {key: reason for klass in reversed(model.__mro__)
            for key, reason in getattr(klass, "refused", {}).items()}


def _token_id_shape(value: Any, what: str) -> Any:
    """`value` if it is a string, a list of strings, a list of token ids or a list of
    token-id lists; token ids are JSON integers (not strings, floats or booleans)."""

    def token_ids(item: Any) -> bool:
        return isinstance(item, list) and all(type(i) is int and i >= 0 for i in item)

    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and (all(isinstance(v, str) for v in value) or token_ids(value)
                                    or all(token_ids(v) for v in value)):
        return value
    raise PydanticCustomError(
        "prompt_shape", f"{what} must be a string, a list of strings, a list of token ids "
        "(non-negative integers) or a list of token-id lists")


# --------------------------------------------------------------------------- sampling


class StreamOptions(RequestModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(
        None, description="vLLM: usage in every chunk.")


class OpenAISampling(RequestModel):
    """Sampling parameters completions and chat share, as OpenAI defines them."""

    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Token id (a decimal string) to a bias in [-100, 100].")
    n: int = Field(1, ge=1)
    presence_penalty: Penalty | None = None
    seed: Int64 | None = None
    stop: Stop | None = Field(
        None, description=f"Forwarded upstream: at most {MAX_STOP_STRINGS} strings of at "
        f"most {MAX_STOP_CHARS} characters.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and not all(key.isascii() and key.isdigit() and len(key) < 10
                             for key in value):
            raise PydanticCustomError("logit_bias_key",
                                      "logit_bias keys must be token ids (decimal integers)")
        return value

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class VllmSampling(RequestModel):
    """vLLM's sampling extensions that make sense beside prompt embeddings."""

    top_k: int | None = Field(None, ge=-1, description="vLLM: -1 or 0 for all tokens.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    allowed_token_ids: TokenIds | None = None
    return_tokens_as_token_ids: bool | None = None
    priority: Int64 | None = None
    cache_salt: str | None = Field(
        None, min_length=1, max_length=1024, pattern=r"^[A-Za-z0-9_\-+/=]+$",
        description="vLLM: salts the upstream's prefix cache (a random base64 value).")

    refused: ClassVar[dict[str, str]] = {
        "bad_words": _TEXT_UPSTREAM,
        "logits_processors": "it names code for the upstream to run",
        "vllm_xargs": _TEXT_UPSTREAM,
        "kv_transfer_params": "this gateway does not serve disaggregated prefill",
        "request_id": "request ids are the gateway's own",
        "use_beam_search": "beam search is not served by this gateway",
        "length_penalty": "beam search is not served by this gateway",
        "truncate_prompt_tokens": "truncation of prompts is not served here; shorten the "
                                  "prompt on the client",
        "guided_decoding_backend": "the upstream chooses its own decoding backend",
        "guided_whitespace_pattern": "it is not served by this gateway",
    }


STRUCTURED_OUTPUT_FIELDS = ("response_format", "structured_outputs", "guided_json",
                            "guided_regex", "guided_choice", "guided_grammar",
                            "structural_tag")
"""Fields that constrain the answer with client text: forwarded only where the operator
allows it (`privacy.forward_structured_outputs`)."""


class StructuredOutputs(RequestModel):
    """Structured-output constraints, as the client sent them (JSON values)."""

    response_format: dict[str, Any] | None = Field(
        None, description="`{\"type\": \"text\"}` always; JSON schemas and objects only "
        "where privacy.forward_structured_outputs allows.")
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structural_tag: str | None = None

    @field_validator("response_format")
    @classmethod
    def _has_type(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and not isinstance(value.get("type"), str):
            raise PydanticCustomError("response_format", "response_format needs a `type`")
        return value

    def structured_fields(self) -> list[str]:
        """The structured-output fields set (a text `response_format` is not one)."""
        dump = self.model_dump(include=set(STRUCTURED_OUTPUT_FIELDS), exclude_none=True)
        if (self.response_format or {}).get("type") == "text":
            dump.pop("response_format")
        return list(dump)


class SamplingFields(OpenAISampling, VllmSampling, StructuredOutputs):
    """The sampling part of an upstream completions request: the allowlist.

    The dispatcher builds an upstream body from this and the embeddings, nothing else, so
    a field not declared here cannot reach a backend. Structured outputs are set only
    where the operator allows them.
    """

    logprobs: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)

    def to_upstream(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True, exclude_unset=True)


_FORWARDED = set(SamplingFields.model_fields)


def _sampling_fields(request: StructuredOutputs, fields: dict[str, Any]) -> SamplingFields:
    """`fields` as the allowlist model; a text `response_format` is the default, not sent."""
    if "response_format" not in request.structured_fields():
        fields.pop("response_format", None)
    return SamplingFields.model_validate(fields)


# --------------------------------------------------------------------------- completions


class CompletionRequest(SamplingFields):
    # Ordered as in https://platform.openai.com/docs/api-reference/completions/create
    model: str
    prompt: str | list[str] | TokenIds | list[TokenIds] | None = None
    best_of: int | None = Field(None, ge=1, description="Only 1 or `n`: vLLM samples n.")
    echo: bool | None = False
    suffix: str | None = None
    user: str | None = Field(None, description="Dropped: an end-user id, never forwarded.")

    # --- extras (vLLM / NIM) ---
    prompt_embeds: str | list[str] | None = Field(
        None,
        description=(
            "Base64 of torch.save of a (rows, hidden) tensor, or a list of them. NIM's "
            "spelling `prompt-embeds` is accepted too."
        ),
    )
    add_special_tokens: bool = Field(
        True, description="vLLM: add the tokenizer's special tokens (BOS) to text prompts.")

    refused: ClassVar[dict[str, str]] = {
        "prompt_logprobs": "it is not compatible with prompt embeds",
    }

    @classmethod
    def _respelled(cls, data: dict[str, Any]) -> dict[str, Any]:
        """NIM's `prompt-embeds` as `prompt_embeds`."""
        if "prompt-embeds" in data:
            data = dict(data)
            nim_spelling = data.pop("prompt-embeds")
            if "prompt_embeds" in data:
                raise PydanticCustomError("prompt_embeds",
                                          "send prompt_embeds or prompt-embeds, not both")
            data["prompt_embeds"] = nim_spelling
        return data

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        return _token_id_shape(value, "prompt")

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

    def upstream_fields(self) -> SamplingFields:
        """The allowlisted sampling fields the client set: never the prompt, `user` or
        anything undeclared."""
        return _sampling_fields(self, self.model_dump(include=_FORWARDED, exclude_unset=True))

    def incompatible_with_embeds(self) -> str | None:
        """The first field vLLM refuses beside prompt embeddings, if the request sets one;
        `best_of` other than `n`, which vLLM no longer samples."""
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        return None


# --------------------------------------------------------------------------- chat


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)

_CONTENT_PART_TYPES = ("text", "prompt_embeds")


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class EmbedsPart(RequestModel):
    type: Literal["prompt_embeds"]
    data: str = Field(description="Base64 of torch.save of a (rows, hidden) tensor (vLLM).")


# Discriminated: only the part's own model validates it (and refuses its unknown fields).
ContentPart = Annotated[TextPart | EmbedsPart, Field(discriminator="type")]


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
        if isinstance(data, dict) and (data.get("tool_calls") or data.get("function_call")
                                       or data.get("role") in ("tool", "function")):
            raise GatewayError("Tool calls are not supported by this gateway.", 400,
                               param="messages", code="unsupported_parameter")
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _known_part_types(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _CONTENT_PART_TYPES:
                raise PydanticCustomError(
                    "content_part",
                    "content part type {kind} is not supported; this gateway accepts "
                    "`text` and `prompt_embeds` parts", {"kind": _shown(repr(kind))})
        return content

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
        "prediction": _TEXT_UPSTREAM,
        "web_search_options": "web search is not supported by this gateway",
        "reasoning_effort": "reasoning controls are not supported by this gateway",
        "verbosity": "verbosity controls are not supported by this gateway",
        "chat_template": "chat templates are the server's own (model.chat_template)",
        "documents": "documents are not supported by this gateway; put them in the messages",
        "mm_processor_kwargs": "multimodal inputs are not supported by this gateway",
        "echo": "echo is not supported by this gateway",
    }

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message exclude "
                             "each other; set add_generation_prompt to false")
        return self

    def upstream_fields(self) -> SamplingFields:
        """The upstream completions request's sampling part: the allowlisted fields the
        client set, with the chat spellings of `max_tokens` and `logprobs` translated."""
        fields = self.model_dump(include=_FORWARDED - {"logprobs", "max_tokens"},
                                 exclude_unset=True)
        if self.completion_max_tokens is not None:
            fields["max_tokens"] = self.completion_max_tokens
        if self.logprobs:
            fields["logprobs"] = self.top_logprobs or 0
        return _sampling_fields(self, fields)

    def texts(self) -> list[str]:
        """Every client text the template will render: messages, names, template variables."""
        return [text for message in self.messages for text in message.texts()] + list(
            _strings(self.chat_template_kwargs))

    @property
    def completion_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_logprobs(self) -> int | None:
        """Alternatives per token the answer carries; None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None


# --------------------------------------------------------------------------- embeddings


class EmbeddingRequest(RequestModel):
    # Ordered as in https://platform.openai.com/docs/api-reference/embeddings/create
    input: str | list[str] | TokenIds | list[TokenIds]
    model: str
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = Field(None, description="Ignored: an end-user id.")

    # --- extras (vLLM) ---
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1,
        description="Keep only the first N tokens of each input (-1: the model's limit).",
    )

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        return _token_id_shape(value, "input")

    def inputs(self) -> list[str] | list[TokenIds]:
        """`input` as a list of texts or of token-id lists (maybe empty)."""
        value: Any = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        return list(value)


CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereEmbedRequest(RequestModel):
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

    refused: ClassVar[dict[str, str]] = {
        "images": "images are not supported by this gateway",
        "inputs": "mixed inputs are not supported by this gateway; send `texts`",
    }
