"""Chat messages -> the model's chat template -> token-id runs and client tensors' places.

The gateway applies the template itself (NIM takes embeddings on completions only), so
chat works against every upstream. A `prompt_embeds` content part stands in the rendered
text as a marker with a per-request nonce, which client text cannot forge; the text
around the markers is tokenized and the part's tensor is spliced in at its place.
"""

from __future__ import annotations

import inspect
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from serve_app.errors import GatewayError
from serve_app.protocol import ChatCompletionRequest, ChatMessage, EmbedsPart

PART_SEPARATOR = "\n"
"""Content parts of one message are joined with this, as vLLM joins text parts."""


def load_chat_template(value: str | None) -> str | None:
    """A configured template: Jinja text, or the path of a file that holds it."""
    if value is None or "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"chat_template: no such file {value!r}, and not a Jinja template")
    return path.read_text()


@dataclass(frozen=True)
class RenderedChat:
    """Token-id runs, and in between the index of the `prompt_embeds` part that goes there."""

    pieces: list[list[int] | int]
    embeds: list[str]

    @property
    def token_count(self) -> int:
        return sum(len(piece) for piece in self.pieces if isinstance(piece, list))


class ChatTemplate:
    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.available = template is not None or bool(getattr(tokenizer, "chat_template", None))
        # Template variables may not shadow apply_chat_template's own arguments.
        self.reserved = set(inspect.signature(tokenizer.apply_chat_template).parameters)

    def render(self, request: ChatCompletionRequest) -> RenderedChat:
        if not self.available:
            raise GatewayError(
                "This model has no chat template; set model.chat_template in the gateway "
                "config, or use /v1/completions.", 400, param="messages")
        kwargs = request.chat_template_kwargs or {}
        clash = sorted(self.reserved & set(kwargs))
        if clash:
            raise GatewayError(f"chat_template_kwargs may not set {', '.join(clash)}.", 400,
                               param="chat_template_kwargs")
        nonce = secrets.token_hex(8)
        embeds: list[str] = []
        messages = [_template_message(m, nonce, embeds) for m in request.messages]
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message, **kwargs)
        except (TemplateError, ValueError) as exc:
            # Template authors' own messages ("roles must alternate"); they name no content.
            raise GatewayError(f"The chat template refused the messages: {exc}", 400,
                               param="messages") from None
        return RenderedChat(self._split(str(rendered), nonce, len(embeds)), embeds)

    def _split(self, rendered: str, nonce: str, parts: int) -> list[list[int] | int]:
        pieces: list[list[int] | int] = []
        for position, segment in enumerate(re.split(_marker_pattern(nonce), rendered)):
            if position % 2:
                pieces.append(int(segment))
            elif segment:
                ids = self.tokenizer(segment, add_special_tokens=False).input_ids
                pieces.append(list(ids))
        placed = sorted(piece for piece in pieces if isinstance(piece, int))
        if placed != list(range(parts)):
            raise GatewayError("The chat template dropped or repeated a prompt_embeds part.",
                               400, param="messages")
        return pieces


def _marker(nonce: str, index: int) -> str:
    return f"<serve-app-embeds-{nonce}-{index}>"


def _marker_pattern(nonce: str) -> str:
    return f"<serve-app-embeds-{nonce}-(\\d+)>"


def _template_message(message: ChatMessage, nonce: str, embeds: list[str]) -> dict[str, Any]:
    """The message as templates expect it: string content, `developer` read as `system`."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, EmbedsPart):
                texts.append(_marker(nonce, len(embeds)))
                embeds.append(part.data)
            else:
                texts.append(part.text)
        content = PART_SEPARATOR.join(texts)
    out: dict[str, Any] = {**(message.model_extra or {})}
    out.update(role="system" if message.role == "developer" else message.role,
               content=content or "")
    if message.name is not None:
        out["name"] = message.name
    return out
