"""Stop strings applied in the gateway, to a choice's text as the upstream streams it.

The gateway keeps a request's `stop` strings (`privacy.forward_stop: false`) and ends each
choice itself, by vLLM's rules (`check_stop_strings` in `vllm/v1/engine/detokenizer.py`):
after each step of a choice (one upstream event: one token, as vLLM streams), the strings
are looked for in the order the request lists them, among matches that end in that step's
new characters; the first found ends the choice, its text cut before the stop string (after
it with `include_stop_str_in_output`). Steps up to `min_tokens` tokens are not checked.
While a choice streams, its last `max(len(stop)) - 1` characters are held back, since they
could still begin a stop string (none with `include_stop_str_in_output`, as in vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StopRule:
    """A call's stop strings, as the gateway applies them."""

    strings: tuple[str, ...]
    include_in_output: bool = False
    min_tokens: int = 0
    token_ids: dict[int, str] = field(default_factory=dict)
    """Token ids the gateway added to the upstream's `stop_token_ids`, each the one token of
    a stop string: the upstream stops on it, and the gateway reads it as that string."""

    @property
    def holdback(self) -> int:
        """Characters a streaming choice keeps back: the most a stop string's start can be."""
        return 0 if self.include_in_output else max(map(len, self.strings)) - 1


def find_stop(text: str, new_chars: int, rule: StopRule) -> tuple[str, int] | None:
    """The first of the rule's strings, in its order, found ending in the last `new_chars`
    characters of `text`, and the length `text` keeps."""
    if not new_chars:
        return None
    for stop in rule.strings:
        start = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if start >= 0:
            return stop, start + len(stop) if rule.include_in_output else start
    return None


class ChoiceText:
    """One choice's text under a stop rule: what each step settles, and where it stops."""

    def __init__(self, rule: StopRule) -> None:
        self.rule = rule
        self.text = ""
        self.sent = 0
        """Characters of `text` already settled (given out)."""
        self.tokens = 0
        self.stop: str | None = None
        """The stop string that ended the choice, once one has."""

    def step(self, text: str, tokens: int) -> str:
        """Take one step's text, made by `tokens` tokens, and give out what it settles: up
        to the hold-back, or all that is left once a stop string ends the choice."""
        self.text += text
        self.tokens += tokens
        found = find_stop(self.text, len(text), self.rule) if (
            self.tokens > self.rule.min_tokens) else None
        if found is None:
            return self._settle(len(self.text) - self.rule.holdback)
        self.stop, kept = found
        self.text = self.text[:kept]
        return self.rest()

    def rest(self) -> str:
        """Everything not yet given out: the choice has ended."""
        return self._settle(len(self.text))

    def _settle(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece


def one_token_id(tokenizer: Any, text: str, skip_special_tokens: bool) -> int | None:
    """The token `text` is, where it is exactly one: it encodes to one id, whose decoding
    (as the upstream decodes its output) is `text` again."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1 or tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) != text:
        return None
    return int(ids[0])
