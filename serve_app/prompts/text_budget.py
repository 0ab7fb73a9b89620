"""Length before work: text too long for the context is refused before it is tokenized.

A token covers at most `chars_per_token` characters of text, its tokenizer's longest
vocabulary entry, so a text of more than `limit × chars_per_token` characters cannot fit in
`limit` tokens and is refused from its length alone. That bound holds for tokenizers that
keep every character in some token (byte-level BPE, SentencePiece); where the normalizer or
pre-tokenizer can drop characters (BERT's whitespace split, accent stripping) there is no
such bound. Either way, text longer than `limit × WINDOWED_ABOVE` characters is then counted
window by window, stopping once the count passes the limit, so the tokenizer never works on
much more than a context's worth of text for a request it refuses. A text that fits is
tokenized whole, as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from serve_app.errors import GatewayError

WINDOWED_ABOVE = 8
"""Count window by window above this many characters per token of the limit: ordinary text
runs at 3 to 5, so a prompt that fits is never counted twice."""
WINDOW_CHARS = 16384
WINDOW_SLACK = 4
"""Tokens one window cut can add to a count (a word split in two, a prepended space):
subtracted per window, so a windowed count never exceeds the true one."""

# Pieces of a tokenizer.json pipeline that keep every character of the text.
# (`Sequence`s are walked into their members.)
_KEEPING_NORMALIZERS = {"NFD", "NFKD", "Lowercase", "Prepend"}
_COMPOSING_NORMALIZERS = {"NFC", "NFKC"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation",
                           "UnicodeScripts", "Split"}
_MAX_COMPOSITION = 4
"""NFC composes at most this many code points into one (the longest canonical
decomposition), so a composing normalizer shrinks text by no more than this."""


def _steps(component: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not component:
        return []
    if component.get("type") == "Sequence":
        return [step for inner in component.get(key, []) for step in _steps(inner, key)]
    return [component]


def _lengthens(replace: dict[str, Any]) -> bool:
    """A `Replace` of a plain string by one at least as long (a regex may match any length)."""
    pattern = (replace.get("pattern") or {}).get("String")
    return isinstance(pattern, str) and 0 < len(pattern) <= len(replace.get("content") or "")


def _shrink_factor(pipeline: dict[str, Any]) -> int | None:
    """How many characters of input text one character of tokenized text may stand for;
    None when the pipeline may drop characters outright."""
    factor = 1
    for step in _steps(pipeline.get("normalizer"), "normalizers"):
        kind = step.get("type")
        if kind == "Replace" and _lengthens(step):
            continue  # SentencePiece's space -> "▁": one for one
        if kind in _COMPOSING_NORMALIZERS:
            factor = _MAX_COMPOSITION
        elif kind not in _KEEPING_NORMALIZERS:
            return None
    for step in _steps(pipeline.get("pre_tokenizer"), "pretokenizers"):
        kind = step.get("type")
        if kind not in _KEEPING_PRE_TOKENIZERS or step.get("behavior") == "Removed":
            return None
    return factor


def chars_per_token(tokenizer: Any, parse_special: bool) -> int | None:
    """The most characters of client text one token can stand for, or None where the
    tokenizer may drop characters (no bound from length alone)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    pipeline = json.loads(backend.to_str())
    factor = _shrink_factor(pipeline)
    if factor is None:
        return None
    # Added tokens are matched in the text before the model runs: the special ones only
    # where special-token strings are parsed, the others always.
    added = pipeline.get("added_tokens", [])
    unmatched = set() if parse_special else {t["content"] for t in added if t.get("special")}
    vocab = pipeline["model"].get("vocab") or {}
    pieces = [entry[0] for entry in vocab] if isinstance(vocab, list) else list(vocab)  # Unigram
    entries = [*pieces, *(t["content"] for t in added)]
    longest = max((len(e) for e in entries if e not in unmatched), default=1)
    return longest * factor


def _windows(text: str, from_end: bool = False) -> Iterator[str]:
    """`text` in pieces of about WINDOW_CHARS (the last ones first with `from_end`), each
    cut before a space, where pre-tokenizers cut too, or hard where none is near."""
    start, end = 0, len(text)
    while end - start > WINDOW_CHARS:
        if from_end:
            cut = text.find(" ", end - WINDOW_CHARS, end - WINDOW_CHARS * 3 // 4)
            piece_start = cut if cut > start else end - WINDOW_CHARS
            yield text[piece_start:end]
            end = piece_start
        else:
            cut = text.rfind(" ", start + WINDOW_CHARS * 3 // 4, start + WINDOW_CHARS)
            piece_end = cut if cut > start else start + WINDOW_CHARS
            yield text[start:piece_end]
            start = piece_end
    yield text[start:end]


@dataclass(frozen=True)
class TextBudget:
    """What one tokenizer allows a text of a given token budget to cost."""

    tokenizer: Any
    chars_per_token: int | None

    @classmethod
    def of(cls, tokenizer: Any, parse_special: bool = True) -> TextBudget:
        return cls(tokenizer, chars_per_token(tokenizer, parse_special))

    def exceeds(self, texts: Sequence[str], limit: int) -> bool:
        """True only when `texts` together certainly hold more than `limit` tokens."""
        chars = sum(map(len, texts))
        if self.chars_per_token is not None and chars > limit * self.chars_per_token:
            return True
        if chars <= limit * WINDOWED_ABOVE:
            return False
        counted = 0
        for text in texts:
            for window in _windows(text):
                ids = self.tokenizer(window, add_special_tokens=False).input_ids
                counted += max(0, len(ids) - WINDOW_SLACK)
                if counted > limit:
                    return True
        return False

    def truncated(self, text: str, limit: int, side: Literal["START", "END"]) -> str:
        """`text` cut to what its first (END) or last (START) `limit` tokens can cover,
        with a window to spare, so truncating a huge text tokenizes little of it."""
        keep = self._chars_for(text, limit, from_end=side == "START")
        if keep >= len(text):
            return text
        return text[:keep] if side == "END" else text[len(text) - keep:]

    def _chars_for(self, text: str, limit: int, from_end: bool) -> int:
        if self.chars_per_token is not None:
            return (limit + WINDOW_SLACK) * self.chars_per_token + WINDOW_CHARS
        if len(text) <= limit * WINDOWED_ABOVE:
            return len(text)
        counted = taken = 0
        for window in _windows(text, from_end):
            taken += len(window)
            counted += len(self.tokenizer(window, add_special_tokens=False).input_ids)
            if counted > limit + WINDOW_SLACK:
                return taken + WINDOW_CHARS
        return len(text)


def too_long(chars: int, room: int, context: int, max_tokens: int | None,
             param: str) -> GatewayError:
    """The context-length 400, for text refused before it was tokenized."""
    left = f"the {room} tokens max_tokens {max_tokens} leaves" if max_tokens else f"{room} tokens"
    return GatewayError(
        f"This model's maximum context length is {context} tokens; the prompt's {chars} "
        f"characters cannot fit in {left}.", 400,
        param="max_tokens" if max_tokens else param, code="context_length_exceeded")
