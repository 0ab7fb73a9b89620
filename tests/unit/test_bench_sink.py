"""The benchmark sink's payload extraction agrees with a full JSON parse."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from bench_servers import split_payload  # noqa: E402

PAYLOAD = "UEsDBAAACAgAAAAAAA+/" * 500


def _as_text(payload: object) -> str:
    return payload if isinstance(payload, str) else bytes(payload).decode()  # type: ignore[arg-type]


@pytest.mark.parametrize("body", [
    json.dumps({"model": "m", "prompt_embeds": PAYLOAD, "max_tokens": 1}).encode(),
    orjson.dumps({"model": "m", "max_tokens": 1, "prompt_embeds": PAYLOAD}),
    orjson.dumps({"model": "m", "prompt_embeds": [PAYLOAD, PAYLOAD[:8]]}),
    b'{"model": "m", "prompt_embeds": "UEsD\\u0042", "x": [1, {"y": "z"}]}',
])
def test_split_matches_a_full_parse(body: bytes) -> None:
    parsed = orjson.loads(body)
    rest, payloads = split_payload(body)
    expected = parsed.pop("prompt_embeds")
    assert [_as_text(p) for p in payloads] == (expected if isinstance(expected, list)
                                                else [expected])
    assert {k: v for k, v in rest.items() if k != "prompt_embeds"} == parsed


def test_the_rest_of_the_body_is_still_parsed_strictly() -> None:
    with pytest.raises(orjson.JSONDecodeError):
        split_payload(b'{"model": "m", "prompt_embeds": "UEsD", "max_tokens": }')
