"""The sampling part of completions and chat requests, and the allowlist of what goes upstream.

`SamplingFields` is the only part of a request that reaches an upstream beside the
embeddings: the dispatcher builds every upstream body from it. `docs/upstream-fields.md`
holds the table of every field and why it is forwarded, used here, dropped or refused.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from serve_app.protocol.base import TEXT_UPSTREAM, Int64, RequestModel, TokenIds

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
"""Stop strings are matched in the gateway against every step of every choice (or
forwarded, where `privacy.forward_stop` says so; docs/upstream-fields.md): bounded, so the
matching stays cheap and a request cannot ride more than a few kilobytes of text on them.
An empty one is refused, as vLLM refuses it: it would match everywhere."""

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]

class StreamOptions(RequestModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(
        None, description="vLLM: usage in every chunk.")


def streamed_only(options: StreamOptions | None,
                  info: ValidationInfo) -> StreamOptions | None:
    """A client's `stream_options` on a request that does not stream is a 400, as OpenAI
    and vLLM (0.26.0) answer it: forwarded, it would be vLLM's 400 or, where the gateway
    streams from the upstream to apply the stops, silently taken."""
    if options is not None and options.model_fields_set and not info.data.get("stream"):
        raise PydanticCustomError("stream_options",
                                  "stream_options can only be set when stream is true")
    return options


class OpenAISampling(RequestModel):
    """Sampling parameters completions and chat share, as OpenAI defines them."""

    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Token id (a decimal string) to a bias in [-100, 100].")
    n: int = Field(1, ge=1)
    presence_penalty: Penalty | None = None
    seed: Int64 | None = None
    stop: Stop | None = Field(
        None, description=f"At most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} "
        "characters, applied by the gateway (forwarded only with privacy.forward_stop).")
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
        "bad_words": TEXT_UPSTREAM,
        "logits_processors": "it names code for the upstream to run",
        "vllm_xargs": TEXT_UPSTREAM,
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


FORWARDED = set(SamplingFields.model_fields)


def sampling_fields(request: StructuredOutputs, fields: dict[str, Any]) -> SamplingFields:
    """`fields` as the allowlist model; a text `response_format` is the default, not sent."""
    if "response_format" not in request.structured_fields():
        fields.pop("response_format", None)
    return SamplingFields.model_validate(fields)
