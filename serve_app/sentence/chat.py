"""`messages` on /v1/embeddings (vLLM's chat embeddings): one chat, held to the limits chat
completions have, templated with the embedding model's chat template, becomes one input's
token ids. No sentence-transformers prompt is added: the template shapes the text, as in
vLLM."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from serve_app.config import LimitsConfig
from serve_app.errors import GatewayError
from serve_app.limits import check_items, check_text_chars
from serve_app.protocol import ChatMessage
from serve_app.protocol.chat import json_strings
from serve_app.protocol.embeddings import EmbeddingRequest
from serve_app.sentence.inputs import SentenceModel

_PROBE = "probe"


@dataclass(frozen=True)
class _Chat:
    """The chat as the renderer reads it. Special tokens are added around the whole
    templated chat here (CLS ... SEP for an encoder), not by the renderer, which only
    prepends what a generator's tokenizer starts a text with."""

    messages: Sequence[ChatMessage]
    add_generation_prompt: bool
    continue_final_message: bool
    chat_template_kwargs: dict[str, Any] | None
    add_special_tokens: bool = False


def chat_token_ids(model: SentenceModel, request: EmbeddingRequest,
                   limits: LimitsConfig) -> list[int]:
    """The templated chat's token ids; refused before rendering when its text cannot fit.

    Without truncation the text must fit the model's limit, as an `input` must; with it,
    the limit on a chat completion's prompt (`limits.max_prompt_tokens`) bounds the work,
    and the ids are cut afterwards like an input's."""
    messages = request.messages or []
    parts = sum(len(m.content) if isinstance(m.content, list) else 1 for m in messages)
    check_items(parts, limits, "messages")
    if not model.chat.available:
        raise GatewayError(f"The model `{model.name}` has no chat template; set "
                           "embedding_models[].chat_template in the gateway config, or send "
                           "input.", 400, param="messages")
    texts = [text for message in messages for text in message.texts()]
    texts += list(json_strings(request.chat_template_kwargs))
    truncating = request.truncate_prompt_tokens is not None or model.truncate_by_default
    limit = model.spec.max_seq_length
    if truncating:
        limit = limits.prompt_tokens_cap(limit)
    if model.chat_budget.exceeds(texts, limit):
        raise GatewayError(
            f"The messages have {sum(map(len, texts))} characters, more than {limit} tokens "
            "can hold.", 400, param="messages", code="context_length_exceeded")
    check_text_chars(sum(map(len, texts)), limits, "messages")
    rendered = model.chat.render(_Chat(messages, request.add_generation_prompt,
                                       request.continue_final_message,
                                       request.chat_template_kwargs))
    ids = [i for run in rendered.segments if isinstance(run, list) for i in run]
    if request.add_special_tokens:
        before, after = _special_frame(model.tokenizer)
        ids = before + ids + after
    return ids


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] / [SEP], a
    BOS, or none), read off a probe: transformers 5 tokenizers no longer offer
    `build_inputs_with_special_tokens`."""
    framed = list(tokenizer(_PROBE, add_special_tokens=True).input_ids)
    plain = list(tokenizer(_PROBE, add_special_tokens=False).input_ids)
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain):]
    return [], []
