"""Length before work: how much text a token limit allows, known from the text's length.

`TextBudget.chars_per_token` is the most characters the gateway lets one token stand for:
the bound the tokenizer's own pipeline gives (its longest vocabulary entry, for pipelines
that keep every character: byte-level BPE, SentencePiece) where that is lower, else
`MEASURED_CHARS_PER_TOKEN`. A text of more than `limit × chars_per_token` characters is
refused before it is tokenized; where truncation is asked, it is cut to
`(limit + CUT_SLACK) × chars_per_token` characters first. So the tokenizer never reads more
than a context's worth of text at that density for one text, however long the text is;
`limits.max_text_chars` (`limits.check_text_chars`) bounds the sum over a request's texts.

Text denser than `MEASURED_CHARS_PER_TOKEN` (runs of whitespace, which BERT's pre-tokenizer
drops; a character repeated, which a BPE merges; words past WordPiece's
`max_input_chars_per_word`, each one `[UNK]`) is refused or cut as if it were that dense:
a truncated input of such text keeps fewer tokens than the limit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from serve_app.errors import GatewayError

MEASURED_CHARS_PER_TOKEN = 16
"""Characters per token where the tokenizer's pipeline gives no bound, or a looser one.
Measured with `python benchmarks/chars_per_token.py` (benchmarks/results/chars_per_token.md):
the densest 128-token window of prose, source code, indented JSON, URLs, digits, Japanese,
accented text, emoji, base64 and hex runs at 1 to 4.7 characters per token on the demo
encoder's WordPiece and at 1 to 6.9 on a 65,000-entry byte-level BPE (whose own bound is
4096); this is more than twice the densest."""
CUT_SLACK = 4
"""Tokens past the limit that a truncating cut keeps room for: the word the cut splits,
which may tokenize differently in two, then lies past the tokens that are kept."""

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


@dataclass(frozen=True)
class TextBudget:
    """What one tokenizer allows a text of a given token limit to cost."""

    chars_per_token: int

    @classmethod
    def of(cls, tokenizer: Any, parse_special: bool = True) -> TextBudget:
        bound = chars_per_token(tokenizer, parse_special)
        return cls(MEASURED_CHARS_PER_TOKEN if bound is None
                   else min(bound, MEASURED_CHARS_PER_TOKEN))

    def exceeds(self, texts: Sequence[str], limit: int) -> bool:
        """True when `texts` together have more characters than `limit` tokens may hold."""
        return sum(map(len, texts)) > limit * self.chars_per_token

    def kept_chars(self, limit: int) -> int:
        """The most characters of a text truncation to `limit` tokens tokenizes."""
        return (limit + CUT_SLACK) * self.chars_per_token

    def truncated(self, text: str, limit: int, side: Literal["START", "END"]) -> str:
        """`text` cut to what its first (END) or last (START) `limit` tokens may cover, so
        truncating a huge text tokenizes little of it."""
        keep = self.kept_chars(limit)
        if keep >= len(text):
            return text
        return text[:keep] if side == "END" else text[len(text) - keep:]


def too_long(chars: int, room: int, context: int, max_tokens: int | None,
             param: str) -> GatewayError:
    """The context-length 400, for text refused before it was tokenized."""
    left = f"the {room} tokens max_tokens {max_tokens} leaves" if max_tokens else f"{room} tokens"
    return GatewayError(
        f"This model's maximum context length is {context} tokens; {param} has {chars} "
        f"characters, more than {left} may hold.", 400,
        param="max_tokens" if max_tokens else param, code="context_length_exceeded")
