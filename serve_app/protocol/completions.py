"""OpenAI `/v1/completions`: the request (with vLLM's and NIM's prompt-embeds extras) and
its answers, whole and streamed."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from serve_app.protocol.base import TokenIds, token_id_shape
from serve_app.protocol.common import ResponseModel, UsageInfo
from serve_app.protocol.sampling import (
    FORWARDED,
    SamplingFields,
    sampling_fields,
    streamed_only,
)


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

    _streamed_only = field_validator("stream_options")(streamed_only)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        return token_id_shape(value, "prompt")

    def prompt_listed(self) -> bool:
        """Whether `prompt` is a list of prompts, whose refusals then name the item."""
        return isinstance(self.prompt, list) and bool(self.prompt) and not isinstance(
            self.prompt[0], int)

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
        return sampling_fields(self, self.model_dump(include=FORWARDED, exclude_unset=True))

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


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None


class CompletionChoice(ResponseModel):
    """One choice, whole or as a stream chunk's piece; dumped with its nulls, since vLLM
    writes `logprobs` and `stop_reason` into every choice."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(
        None, description="vLLM: the stop string or token id that ended the choice.")


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    """One event of a completions stream: the same shape, with `choices: []` and `usage`
    in the last one when `stream_options.include_usage` asks for it."""
