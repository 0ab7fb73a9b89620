"""One sentence-embedding model's inputs: tokenized with its prompt, refused or truncated
to its limit before and after tokenizing, and token ids checked against its vocabulary;
and what its other inputs need: the chat template for `messages`, the calibration for
int8 / uint8."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from serve_app.config import EncoderBatchingConfig, TurnMarkerPolicy
from serve_app.errors import GatewayError, item_param
from serve_app.prompts.chat_template import ChatTemplate
from serve_app.prompts.text_budget import TextBudget
from serve_app.protocol import TokenIds
from serve_app.sentence.encoder import SentenceSpec
from serve_app.sentence.quantize import Calibration

Truncation = Literal["START", "END"] | None


@dataclass
class SentenceModel:
    name: str
    spec: SentenceSpec
    tokenizer: Any
    truncate_by_default: bool
    chat_template: str | None = None
    """The configured template for `messages`; None: the tokenizer's own, if any."""
    chat_parses_special_tokens: bool = False
    """`tokenization.chat_special_tokens: parse`, as for chat completions."""
    chat_turn_markers: TurnMarkerPolicy = "escape"
    """`tokenization.chat_turn_markers`, as for chat completions."""
    calibration: Calibration = field(default_factory=Calibration)
    chunk_tokens: int = EncoderBatchingConfig().max_batch_tokens
    """Tokens per Encoder call: its `batching.max_batch_tokens`, one batch's worth."""

    def __post_init__(self) -> None:
        # One tokenizer per truncation side: a call never changes another's settings.
        self.truncating: dict[str, Any] = {}
        for side, hf_side in (("START", "left"), ("END", "right")):
            self.truncating[side] = copy.deepcopy(self.tokenizer)
            self.truncating[side].truncation_side = hf_side
        self.budget = TextBudget.of(self.tokenizer)
        self.chat = ChatTemplate(self.tokenizer, self.chat_template,
                                 special_tokens_as_text=not self.chat_parses_special_tokens,
                                 turn_markers=self.chat_turn_markers)
        self.chat_budget = TextBudget.of(self.tokenizer, self.chat_parses_special_tokens)

    def _within_budget(self, text: str, truncation: Truncation, limit: int, param: str) -> str:
        """Length before work: an input that cannot fit is refused (or, when truncated,
        cut to what `limit` tokens can cover) before it is tokenized."""
        if truncation is not None:
            return self.budget.truncated(text, limit, truncation)
        if self.budget.exceeds([text], limit):
            raise GatewayError(
                f"{param} has {len(text)} characters, more than this model's {limit} "
                "tokens can hold. Ask for truncation, or shorten it.", 400, param=param,
                code="context_length_exceeded")
        return text

    def text_chars(self, texts: Sequence[str], prompt: str, truncation: Truncation,
                   limit: int, param: str, listed: bool = True) -> int:
        """The characters tokenizing `texts` reads: each text with the prompt, cut first
        when truncated. An input that cannot fit, untruncated, is refused here."""
        kept = self.budget.kept_chars(limit)
        chars = 0
        for index, text in enumerate(texts):
            if truncation is None:
                self._within_budget(text, None, limit, item_param(param, index, listed))
            chars += len(prompt) + (len(text) if truncation is None else min(len(text), kept))
        return chars

    def tokenize(self, texts: Sequence[str], prompt: str, truncation: Truncation,
                 limit: int, param: str, listed: bool = True) -> list[list[int]]:
        prompted = [prompt + self._within_budget(t, truncation, limit,
                                                 item_param(param, index, listed))
                    for index, t in enumerate(texts)]
        if truncation is None:
            ids = self.tokenizer(prompted).input_ids
        else:
            ids = self.truncating[truncation](prompted, truncation=True, max_length=limit)
            ids = ids.input_ids
        return self.check([list(i) for i in ids], None, limit, param, listed)

    def check(self, ids: list[list[int]], truncation: Truncation, limit: int,
              param: str, listed: bool = True) -> list[list[int]]:
        """Each input's token ids, refused (by its path) when empty or, untruncated, over
        `limit`; else cut to `limit` from the `truncation` side."""
        out = []
        for index, sequence in enumerate(ids):
            item = item_param(param, index, listed)
            if not sequence:
                raise GatewayError(f"{item} has no tokens.", 400, param=item)
            if len(sequence) > limit:
                if truncation is None:
                    raise GatewayError(
                        f"{item} has {len(sequence)} tokens; this model takes at most "
                        f"{limit}. Ask for truncation, or shorten it.", 400, param=item,
                        code="context_length_exceeded")
                sequence = sequence[-limit:] if truncation == "START" else sequence[:limit]
            out.append(sequence)
        return out

    def check_vocab(self, ids: list[TokenIds], param: str, listed: bool) -> None:
        """Given token ids within the vocabulary; a refusal names the input's path."""
        vocab = len(self.tokenizer)
        for index, sequence in enumerate(ids):
            if any(not 0 <= i < vocab for i in sequence):
                item = item_param(param, index, listed)
                raise GatewayError(f"{item}: token ids must lie in [0, {vocab}).", 400,
                                   param=item)
