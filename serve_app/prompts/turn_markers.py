"""The chat template's turn markers, and the guard that keeps client text from writing them.

A template makes turns by writing markers around each message: special tokens
(`<|im_start|>`, `<|eot_id|>`) or plain text (Llama 2's `[INST]` and `<<SYS>>`). Text in a
message that spells a plain-text marker tokenizes to the very ids of a genuine turn, so a
user could write a system turn of their own. At start the gateway renders probe chats, one
distinct word as each message's content, and reads the markers off what the template
writes between the contents: every special token, and every other whitespace-separated
piece of two or more characters with one of `< > [ ] |` in it. Prose a
template adds (Llama 3.1's "Cutting Knowledge Date: December 2023", a default system
prompt) is no marker.

Client text that holds a marker is escaped (a zero-width space after its first character)
or refused (`tokenization.chat_turn_markers`). Then each rendered chat is checked by token
ids: it may hold each marker's ids (as the template's own turns tokenize) no more often than
the same chat with neutral contents does. That catches what no text match can, such as a
normalizer that maps other characters onto a marker's. Where a turn boundary shows no marker,
the probe says so in the log and every special-token string is treated as a marker too.
"""

from __future__ import annotations

import logging
import re
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from serve_app.config import TurnMarkerPolicy
from serve_app.errors import GatewayError

logger = logging.getLogger(__name__)

Render = Callable[[list[dict[str, Any]], bool], str]
"""Renders messages with the template: (messages, add_generation_prompt) -> text."""

ESCAPES = ("\u200b", "\u00b7")
"""What escaping inserts after a marker's first character: a zero-width space, or a middle
dot for tokenizers whose normalizer drops the zero-width space (BERT's `clean_text`)."""

NEUTRAL_TEXT = "serveappneutral"
"""A chat's contents in its neutral twin: one plain word, as the probe's are."""

GENERATION_PROMPT = "generation prompt"

_PROBE_CHATS = (
    ("system", "user", "assistant", "user", "assistant", "user"),
    ("user", "assistant", "user", "system", "user"),  # a system turn mid-chat, where allowed
    ("user", "assistant", "user", "assistant", "user"),
    ("system", "user"),
    ("user",),
)
_TAG_CHARACTERS = frozenset("<>[]|")
_ID_BYTES = array("i").itemsize


def _probe_word(index: int) -> str:
    return f"serveappprobe{'abcdefghijklmnop'[index]}"


@dataclass(frozen=True)
class TurnMarkers:
    """What the probe learned of a template."""

    around: dict[str, tuple[str, ...]]
    """Per role, and for the generation prompt, the markers written next to its content."""
    refused_roles: tuple[str, ...]
    """Roles no probe chat could render (a template that raises for a system message)."""
    unmarked: tuple[str, ...]
    """Turn boundaries with no marker, as "user -> assistant"."""
    sequences: dict[str, frozenset[tuple[int, ...]]]
    """Each marker's token ids, as the template's own turns tokenize."""

    @property
    def found(self) -> bool:
        return not self.unmarked


def probe_turn_markers(tokenizer: Any, render: Render) -> TurnMarkers:
    """The markers of the template `render` applies, from a few probe chats."""
    specials = _specials_pattern(tokenizer)
    around: dict[str, set[str]] = {}
    unmarked: set[str] = set()
    rendered_any: set[str] = set()
    texts: list[str] = []
    for roles in _PROBE_CHATS:
        messages = [{"role": role, "content": _probe_word(i)} for i, role in enumerate(roles)]
        renders: dict[bool, str] = {}
        for generation in (False, True):
            try:
                renders[generation] = render(messages, generation)
            except Exception:  # a template's refusal of this chat: try the next one
                continue
        if not renders:
            continue
        rendered_any.update(roles)
        texts += renders.values()
        for text in renders.values():
            _read_turns(text, roles, specials, around, unmarked)
        if len(renders) == 2 and renders[True] != renders[False]:
            added = renders[True].removeprefix(renders[False])
            prompt = _markers_in(added, specials)
            around.setdefault(GENERATION_PROMPT, set()).update(prompt)
            if not prompt:
                unmarked.add(f"{roles[-1]} -> {GENERATION_PROMPT}")
    markers = {m for found in around.values() for m in found}
    if not markers:  # nothing rendered, or no content found where it was put
        unmarked.add("every turn")
    return TurnMarkers(
        around={role: tuple(sorted(found)) for role, found in around.items()},
        refused_roles=tuple(r for r in ("system", "user", "assistant") if r not in rendered_any),
        unmarked=tuple(sorted(unmarked)),
        sequences={m: _sequences(tokenizer, m, texts) for m in sorted(markers)},
    )


def _specials_pattern(tokenizer: Any) -> re.Pattern[str]:
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values()
                       if t.special and t.content.strip()}, key=len, reverse=True)
    return re.compile("(" + ("|".join(map(re.escape, specials)) or "(?!)") + ")")


def _markers_in(glue: str, specials: re.Pattern[str]) -> list[str]:
    """The markers in text the template wrote: special tokens, and tag-like pieces."""
    found = []
    for index, piece in enumerate(specials.split(glue)):
        if index % 2:  # the pattern's captured group: a special token
            found.append(piece)
            continue
        found += [word for word in piece.split()
                  if len(word) >= 2 and not _TAG_CHARACTERS.isdisjoint(word)]
    return found


def _read_turns(text: str, roles: Sequence[str], specials: re.Pattern[str],
                around: dict[str, set[str]], unmarked: set[str]) -> None:
    """Sorts the markers of one probe render by the contents they stand next to."""
    placed = sorted((text.find(_probe_word(i)), i) for i in range(len(roles))
                    if _probe_word(i) in text)
    end, previous = 0, "start"
    for start, index in placed:
        glue = _markers_in(text[end:start], specials)
        around.setdefault(roles[index], set()).update(glue)
        if previous != "start":
            around.setdefault(previous, set()).update(glue)
        if not glue:
            unmarked.add(f"{previous} -> {roles[index]}")
        end, previous = start + len(_probe_word(index)), roles[index]
    if placed:
        around.setdefault(previous, set()).update(_markers_in(text[end:], specials))


def _sequences(tokenizer: Any, marker: str, texts: Iterable[str]) -> frozenset[tuple[int, ...]]:
    """The marker's ids where the probe renders hold it, and alone."""
    found = {tuple(tokenizer(marker, add_special_tokens=False).input_ids)}
    for text in texts:
        try:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # a slow tokenizer has no offsets: the marker alone
            break
        spans = encoded["offset_mapping"]
        start = text.find(marker)
        while start >= 0:
            end = start + len(marker)
            found.add(tuple(i for i, (s, e) in zip(encoded.input_ids, spans, strict=True)
                            if s < end and e > start))
            start = text.find(marker, start + 1)
    return frozenset(s for s in found if s)


def occurrences(ids: Sequence[int], sequences: Iterable[tuple[int, ...]]) -> int:
    """How many times `ids` hold the marker: matches of its sequences, overlapping ones
    (`▁` `[INST]` and `[INST]` at one place) counted once."""
    return _count(_blob(ids), sequences)


def _blob(ids: Sequence[int]) -> bytes:
    """The ids as fixed-width bytes, where `bytes.find` looks for a sequence at C speed."""
    return array("i", ids).tobytes()


def _count(blob: bytes, sequences: Iterable[tuple[int, ...]]) -> int:
    spans = []
    for sequence in sequences:
        needle = _blob(sequence)
        at = blob.find(needle)
        while at >= 0:
            if at % _ID_BYTES == 0:
                spans.append((at, at + len(needle)))
            at = blob.find(needle, at + 1)
    count, reach = 0, -1
    for start, end in sorted(spans):
        if start >= reach:
            count += 1
        reach = max(reach, end)
    return count


class TurnGuard:
    """Escapes or refuses the markers in client text, and checks rendered chats' ids
    (`chat_turn_markers: allow` has no guard)."""

    def __init__(self, tokenizer: Any, markers: TurnMarkers, policy: TurnMarkerPolicy,
                 specials: Sequence[str]) -> None:
        self.markers = markers
        self.policy = policy
        sequences = dict(markers.sequences)
        if not markers.found:  # fail safe: every special-token string is a marker too
            for special in specials:
                sequences.setdefault(special, frozenset(
                    {tuple(tokenizer(special, add_special_tokens=False).input_ids)}))
        guarded = sorted((m for m in sequences if len(m) >= 2), key=len, reverse=True)
        self.sequences = sequences
        self.guarded = guarded
        alternatives = "|".join(map(re.escape, guarded)) or "(?!)"
        self.pattern = re.compile(alternatives)
        self.starts = re.compile(f"(?=(?:{alternatives}))")
        self.escape_character = self._working_escape(tokenizer)

    def _working_escape(self, tokenizer: Any) -> str | None:
        """The first escape whose escaped markers tokenize to no marker's ids."""
        for character in ESCAPES:
            if all(not self._holds_marker(tokenizer(text, add_special_tokens=False).input_ids)
                   for marker in self.guarded
                   for text in (self.escape(marker, character),
                                f" {self.escape(marker, character)} ")):
                return character
        return None

    def _holds_marker(self, ids: Sequence[int]) -> bool:
        return any(occurrences(ids, sequences) for sequences in self.sequences.values())

    def escape(self, text: str, character: str) -> str:
        """`text` with `character` after the first character of every marker in it
        (overlapping ones included), so that no marker is left whole."""
        cuts = sorted({match.start() + 1 for match in self.starts.finditer(text)})
        if not cuts:
            return text
        pieces = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)],
                                                         strict=True)]
        return character.join(pieces)

    def clean(self, text: str, param: str) -> str:
        """Client text as the template may render it, or a 400 naming where it is."""
        match = self.pattern.search(text)
        if match is None:
            return text
        if self.policy == "refuse" or self.escape_character is None:
            raise GatewayError(
                f"{param} holds {match.group(0)!r}, a turn marker of this model's chat "
                "template, which only the template may write.", 400, param=param)
        return self.escape(text, self.escape_character)

    def check(self, runs: Iterable[Sequence[int]], neutral: Sequence[int]) -> None:
        """A 400 where the chat's ids hold a marker more often than its neutral twin's."""
        blobs, neutral_blob = [_blob(run) for run in runs], _blob(neutral)
        for marker, sequences in self.sequences.items():
            if sum(_count(blob, sequences) for blob in blobs) > _count(neutral_blob,
                                                                       sequences):
                raise GatewayError(
                    f"The messages tokenize to the token ids of {marker!r}, a turn marker of "
                    "this model's chat template, which only the template may write.", 400,
                    param="messages")

    def log(self) -> None:
        """The start-up record: the markers found per role (never any message content)."""
        found = "; ".join(f"{role}: {' '.join(markers) or '(none)'}"
                          for role, markers in self.markers.around.items())
        logger.info("chat template turn markers: %s (chat_turn_markers: %s)",
                    found or "(none)", self.policy)
        if self.markers.refused_roles:
            logger.info("the chat template refuses %s messages",
                        ", ".join(self.markers.refused_roles))
        if not self.markers.found:
            logger.warning(
                "the chat template shows no turn marker at %s; chat_turn_markers: %s applies "
                "to the markers found and to every special-token string",
                ", ".join(self.markers.unmarked), self.policy)
        if self.policy == "escape" and self.escape_character is None:
            logger.warning("no escape character breaks this tokenizer's turn markers: text "
                           "that holds one is refused")
        elif self.policy == "escape" and self.escape_character != ESCAPES[0]:
            logger.warning("this tokenizer's normalizer drops a zero-width space: turn "
                           "markers are escaped with %s", ascii(self.escape_character))
