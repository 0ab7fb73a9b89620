"""Chat messages -> the model's chat template -> token-id runs and client tensors' places.

The gateway applies the template itself (NIM takes embeddings on completions only), so
chat works against every upstream. Only the template makes turns:
- text that would write one of the template's turn markers (`[INST]`, `<|im_start|>`) is
  escaped or refused, and the rendered ids are checked (`prompts.turn_markers`,
  `tokenization.chat_turn_markers`);
- a special-token string the client typed (`</s>`, `<|im_start|>`) is tokenized as plain
  text (unless `tokenization.chat_special_tokens` is `parse`, vLLM's behaviour).
Two kinds of placeholder with a per-request nonce, which client text cannot forge, stand in
the text the template renders: a `prompt_embeds` content part's, where its tensor is
spliced in, and a typed special-token string's. The text around them is tokenized with the
template's own special tokens intact. transformers' `sanitize_control_tokens` does the same
for whole-chat tokenization, which cannot splice tensors in; this uses only the tokenizer's
public `split_special_tokens`.
"""

from __future__ import annotations

import inspect
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from jinja2 import TemplateError

from serve_app.config import TurnMarkerPolicy
from serve_app.errors import GatewayError
from serve_app.prompts.turn_markers import NEUTRAL_TEXT, TurnGuard, probe_turn_markers
from serve_app.protocol import ChatMessage, EmbedsPart

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


class EmbedsData(NamedTuple):
    """A `prompt_embeds` part's base64 text, and its path in the request
    (`messages.0.content.1.data`), which a refusal of the tensor names."""

    param: str
    data: str


@dataclass(frozen=True)
class RenderedChat:
    """Token-id runs, and in between the index of the `prompt_embeds` part that goes there."""

    segments: list[list[int] | int]
    embeds: list[EmbedsData]

    @property
    def token_count(self) -> int:
        return sum(len(segment) for segment in self.segments if isinstance(segment, list))


class ChatRequest(Protocol):
    """What rendering reads of a request: a chat completion's, or a chat to embed."""

    @property
    def messages(self) -> Sequence[ChatMessage]: ...
    @property
    def add_generation_prompt(self) -> bool: ...
    @property
    def continue_final_message(self) -> bool: ...
    @property
    def add_special_tokens(self) -> bool: ...
    @property
    def chat_template_kwargs(self) -> dict[str, Any] | None: ...


# Template variables the tokenizer or Jinja environment sets: a client may not replace them.
_TEMPLATE_NAMES = {"messages", "tools", "documents", "add_generation_prompt",
                   "continue_final_message", "raise_exception", "strftime_now",
                   "additional_special_tokens"}


class ChatTemplate:
    def __init__(self, tokenizer: Any, template: str | None = None,
                 special_tokens_as_text: bool = True,
                 turn_markers: TurnMarkerPolicy = "escape") -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.available = template is not None or bool(getattr(tokenizer, "chat_template", None))
        special_names = getattr(tokenizer, "SPECIAL_TOKENS_ATTRIBUTES", ())
        self.reserved = (set(inspect.signature(tokenizer.apply_chat_template).parameters)
                         | _TEMPLATE_NAMES | set(special_names)
                         | set(tokenizer.special_tokens_map))
        all_specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values()
                               if t.special}, key=len, reverse=True)
        self.specials = all_specials if special_tokens_as_text else []
        self.special_index = {text: index for index, text in enumerate(self.specials)}
        self.special_pattern = re.compile("|".join(map(re.escape, self.specials)) or "(?!)")
        self.guard: TurnGuard | None = None
        if self.available and turn_markers != "allow":
            markers = probe_turn_markers(tokenizer, self._probe)
            self.guard = TurnGuard(tokenizer, markers, turn_markers, all_specials)
            self.guard.log()

    def _apply(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
               continue_final_message: bool, kwargs: dict[str, Any]) -> str:
        return str(self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **kwargs))

    def _probe(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self._apply(messages, add_generation_prompt, False, {})

    def render(self, request: ChatRequest) -> RenderedChat:
        if not self.available:
            raise GatewayError(
                "This model has no chat template; set model.chat_template in the gateway "
                "config, or use /v1/completions.", 400, param="messages")
        kwargs = request.chat_template_kwargs or {}
        clash = sorted(self.reserved & set(kwargs))
        if clash:
            raise GatewayError(f"chat_template_kwargs may not set {', '.join(clash)}.", 400,
                               param="chat_template_kwargs")
        placeholders = _Placeholders(secrets.token_hex(8), self)
        messages = [_template_message(i, m, placeholders)
                    for i, m in enumerate(request.messages)]
        variables = placeholders.text(kwargs, "chat_template_kwargs")
        segments = self._split(self._rendered(messages, request, variables), placeholders)
        if self.guard is not None:
            # The template variables stay as escaped: a template may branch on them.
            neutral = self._rendered(_neutral(messages), request, variables)
            self.guard.check(_runs(segments), self._ids(neutral))
        if request.add_special_tokens:  # vLLM's option: the tokenizer's BOS on top
            segments.insert(0, list(self.tokenizer("", add_special_tokens=True).input_ids))
        return RenderedChat(segments, placeholders.embeds)

    def _rendered(self, messages: list[dict[str, Any]], request: ChatRequest,
                  kwargs: dict[str, Any]) -> str:
        try:
            return self._apply(messages, request.add_generation_prompt,
                               request.continue_final_message, kwargs)
        except TemplateError as exc:
            # Template authors' own messages ("roles must alternate"); they name no content.
            raise GatewayError(f"The chat template refused the messages: {exc}", 400,
                               param="messages") from None
        except Exception as exc:
            # A template tripping over the client's variables; its message may quote them.
            raise GatewayError(f"The chat template could not render this request "
                               f"({type(exc).__name__}).", 400, param="messages") from None

    def _split(self, rendered: str, placeholders: _Placeholders) -> list[list[int] | int]:
        """Token-id runs and embeds-part indices, in the rendered text's order."""
        segments: list[list[int] | int] = []
        texts = re.split(placeholders.pattern, rendered)
        for position in range(0, len(texts), 3):
            if texts[position]:
                segments.append(self._ids(texts[position]))
            if position + 1 < len(texts):
                kind, index = texts[position + 1], int(texts[position + 2])
                if kind == "embeds":
                    segments.append(index)
                else:
                    segments.append(self._ids(self.specials[index], as_text=True))
        placed = sorted(segment for segment in segments if isinstance(segment, int))
        if placed != list(range(len(placeholders.embeds))):
            raise GatewayError("The chat template dropped or repeated a prompt_embeds part.",
                               400, param="messages")
        return segments

    def _ids(self, text: str, as_text: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False,
                                   split_special_tokens=as_text).input_ids)


def _runs(segments: list[list[int] | int]) -> list[list[int]]:
    """The ids that reach the model back to back: runs between client tensors joined."""
    runs: list[list[int]] = [[]]
    for segment in segments:
        if isinstance(segment, int):
            runs.append([])
        else:
            runs[-1].extend(segment)
    return runs


def _neutral(value: Any) -> Any:
    """The messages' neutral twin: every text made one plain word, roles kept, so the
    template writes the same turns around it."""
    if isinstance(value, str):
        return NEUTRAL_TEXT
    if isinstance(value, dict):
        return {key: item if key == "role" else _neutral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_neutral(item) for item in value]
    return value


@dataclass
class _Placeholders:
    """One request's placeholders: `<serve-app-{embeds|text}-{nonce}-{index}>`."""

    nonce: str
    template: ChatTemplate
    embeds: list[EmbedsData] = field(default_factory=list)

    @property
    def pattern(self) -> str:
        return f"<serve-app-(embeds|text)-{self.nonce}-(\\d+)>"

    def embeds_part(self, part: EmbedsPart, param: str) -> str:
        """The placeholder of `part` (found at `param`), where its tensor is spliced in."""
        self.embeds.append(EmbedsData(f"{param}.data", part.data))
        return f"<serve-app-embeds-{self.nonce}-{len(self.embeds) - 1}>"

    def text(self, value: Any, param: str) -> Any:
        """`value` (found at `param`) with its turn markers escaped, and every special-token
        string in its strings replaced by a placeholder."""
        if isinstance(value, str):
            if self.template.guard is not None:
                value = self.template.guard.clean(value, param)
            return self.template.special_pattern.sub(self._special_placeholder, value)
        if isinstance(value, dict):
            return {key: self.text(item, f"{param}.{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [self.text(item, f"{param}.{index}") for index, item in enumerate(value)]
        return value

    def _special_placeholder(self, match: re.Match[str]) -> str:
        index = self.template.special_index[match.group(0)]
        return f"<serve-app-text-{self.nonce}-{index}>"


def _template_message(index: int, message: ChatMessage,
                      placeholders: _Placeholders) -> dict[str, Any]:
    """The message as templates expect it: string content, `developer` read as `system`."""
    param = f"messages.{index}"
    content = message.content
    if isinstance(content, list):
        content = PART_SEPARATOR.join(
            placeholders.embeds_part(part, f"{param}.content.{number}")
            if isinstance(part, EmbedsPart)
            else placeholders.text(part.text, f"{param}.content.{number}.text")
            for number, part in enumerate(content))
    else:
        content = placeholders.text(content or "", f"{param}.content")
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                           "content": content}
    if message.name is not None:
        out["name"] = placeholders.text(message.name, f"{param}.name")
    return out
