"""Request bodies as JSON: orjson's parse, with repeated keys refused.

JSON parsers keep the last of a repeated key, so `"max_tokens": 100000, "max_tokens": 2`
would pass checks as 2 while another reader of the same bytes sees 100000. orjson has no
hook for repeated keys, and the standard library's `object_pairs_hook` parses a body of
token ids about twice as slowly, so the check counts instead: every key of the text is
followed by exactly one colon outside the strings, so a body whose colons, less those
inside its parsed strings, outnumber its parsed keys repeats a key. Only then (or where a
colon written as `\\u003a` defeats the count) does the standard library parse it again, to
name the key. `benchmarks/json_body.py` measures the check: a tenth of orjson's parse on a
22 MB `prompt_embeds` body, half of it on 20 MB of text full of colons.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

from serve_app.errors import GatewayError, shown

_CHUNK = 1 << 20
_COLON = ord(":")
_FIND_ONE_BY_ONE = 64


def loads(body: bytes) -> Any:
    """The body's JSON value; a 400 naming the key if any object repeats one."""
    value = orjson.loads(body)
    if may_repeat_keys(body, value):
        _refuse_repeated_keys(body)
    return value


def may_repeat_keys(body: bytes, value: Any) -> bool:
    """Whether `body`, parsed as `value`, may repeat a key: exact unless a colon is written
    as an escape."""
    keys, quoted_colons = _keys_and_quoted_colons(value)
    if quoted_colons and b"\\" in body and (b"\\u003a" in body or b"\\u003A" in body):
        return True  # a colon written as an escape counts in a string but not in the text
    return _colons(body) - quoted_colons > keys


def _keys_and_quoted_colons(value: Any) -> tuple[int, int]:
    """How many keys the parsed objects hold, and how many colons their strings (keys
    included) hold."""
    keys = colons = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if type(item) is dict:
            keys += len(item)
            colons += sum(_quoted_colons(key) for key in item)
            pending.extend(item.values())
        elif type(item) is list:
            if not _numbers_only(item):
                pending.extend(item)
        elif type(item) is str:
            colons += _quoted_colons(item)
    return keys, colons


def _quoted_colons(text: str) -> int:
    if ":" not in text:  # memchr: most strings (base64 payloads, keys) end here
        return 0
    if len(text) >= _CHUNK and text.isascii():
        return _colons(text.encode("ascii"))
    return text.count(":")


def _colons(text: bytes) -> int:
    """The colons in `text`: found one by one while they are few (`find` is memchr, which
    skips a base64 payload at memory speed), then counted in bulk."""
    found, at = 0, text.find(b":")
    while at != -1:
        found += 1
        if found == _FIND_ONE_BY_ONE:
            return found + _count_in_bulk(memoryview(text)[at + 1:])
        at = text.find(b":", at + 1)
    return found


def _count_in_bulk(text: memoryview) -> int:
    """numpy compares bytes ~3x faster than `bytes.count`; in chunks, to keep its mask small."""
    array = np.frombuffer(text, np.uint8)
    return sum(int(np.count_nonzero(array[start:start + _CHUNK] == _COLON))
               for start in range(0, len(array), _CHUNK))


def _numbers_only(items: list[Any]) -> bool:
    """Whether a list holds numbers only (token ids), which have no keys and no strings.
    `sum` runs at C speed and raises TypeError on a string, object, list or null."""
    try:
        sum(items)
    except TypeError:
        return False
    return True


def _refuse_repeated_keys(body: bytes) -> None:
    try:
        json.loads(body, object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise GatewayError("The request body is nested too deeply.", 400,
                           code="invalid_json") from None


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise GatewayError(f"The request body repeats the key `{shown(key)}` in one "
                               "object; send each key once.", 400, param=shown(key),
                               code="duplicate_key")
        seen.add(key)
    return dict(pairs)
