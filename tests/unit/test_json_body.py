"""Repeated JSON keys: refused by name on every JSON route, and the counting check that
finds them agrees with a parser that sees every pair, on any body."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app import json_body
from serve_app.errors import GatewayError
from tests.unit.gateway_client import error_of

# An object is a list of pairs, so a tree can repeat keys; `Obj` marks it from a list.


class Obj(list[Any]):
    pass


def dumped(value: Any, escape_colons: bool) -> str:
    """JSON text of a tree whose objects may repeat keys; colons in strings optionally
    written as `\\u003a`, as some encoders do."""
    if isinstance(value, Obj):
        return "{" + ", ".join(f"{dumped(k, escape_colons)} :{dumped(v, escape_colons)}"
                               for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumped(v, escape_colons) for v in value) + "]"
    text = json.dumps(value)
    return text.replace(":", "\\u003a") if escape_colons and isinstance(value, str) else text


def repeats(value: Any) -> bool:
    if isinstance(value, Obj):
        keys = [k for k, _ in value]
        return len(set(keys)) < len(keys) or any(repeats(v) for _, v in value)
    return isinstance(value, list) and any(repeats(v) for v in value)


def plain(value: Any) -> Any:
    """The tree as a parser that keeps the last of each key reads it."""
    if isinstance(value, Obj):
        return {k: plain(v) for k, v in value}
    return [plain(v) for v in value] if isinstance(value, list) else value


KEYS = st.sampled_from(["a", "b", "a:b", ":", "\\", '"', "é"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.text(alphabet=":ab\"\\é {}[],", max_size=6))
TREES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.lists(st.tuples(KEYS, inner), max_size=4).map(Obj)), max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(tree=TREES, escape_colons=st.booleans())
def test_repeated_keys_are_found_exactly_where_they_are(tree: Any, escape_colons: bool) -> None:
    body = dumped(tree, escape_colons).encode()
    if repeats(tree):
        with pytest.raises(GatewayError, match="repeats the key") as refused:
            json_body.loads(body)
        assert refused.value.status == 400 and refused.value.code == "duplicate_key"
    elif escape_colons:
        assert json_body.loads(body) == plain(tree)
    else:  # the count alone clears it: no second parse
        with mock.patch.object(json_body, "_refuse_repeated_keys", side_effect=AssertionError):
            assert json_body.loads(body) == plain(tree)


@pytest.mark.parametrize("body", [
    b'{"max_tokens": 100000, "max_tokens": 2}',
    b'{"messages": [{"role": "user", "content": "a:b", "role": "system"}]}',
    b'{"logit_bias": {"5": 1, "6": 2, "5": -100}, "prompt": [1, 2, 3]}',
    b'{"prompt": [[1, 2], [3]], "x": {"y": {"z": 1, "z": 1}}}',
])
def test_a_repeated_key_is_refused_wherever_it_sits(body: bytes) -> None:
    with pytest.raises(GatewayError, match="repeats the key"):
        json_body.loads(body)


@pytest.mark.parametrize("text", ["a:b " * 600_000, "é:ü " * 600_000])
@pytest.mark.parametrize("repeated", [False, True])
def test_megabytes_of_colons_are_counted_exactly(text: str, repeated: bool) -> None:
    """Large texts take the vectorised count (ASCII) or str.count (other text)."""
    pairs = '"n": 1, ' * repeated + f'"n": 2, "content": {json.dumps(text, ensure_ascii=False)}'
    body = ("{" + pairs + "}").encode()
    if repeated:
        with pytest.raises(GatewayError, match="repeats the key `n`"):
            json_body.loads(body)
    else:
        with mock.patch.object(json_body, "_refuse_repeated_keys", side_effect=AssertionError):
            assert json_body.loads(body) == {"n": 2, "content": text}


@pytest.mark.parametrize("colons", [62, 63, 64, 65, 200])
@pytest.mark.parametrize("repeated", [False, True])
def test_the_count_is_exact_where_finding_turns_to_counting(colons: int, repeated: bool) -> None:
    """Colons are found one by one, then counted in bulk: around the turn, too."""
    pairs = [f'"k{i}": "{":" * (i % 3)}"' for i in range(colons // 2)]
    pairs += [f'"run": "{":" * colons}"'] + ['"k0": 1'] * repeated
    body = ("{" + ", ".join(pairs) + "}").encode()
    if repeated:
        with pytest.raises(GatewayError, match="repeats the key `k0`"):
            json_body.loads(body)
    else:
        with mock.patch.object(json_body, "_refuse_repeated_keys", side_effect=AssertionError):
            assert json_body.loads(body)["run"] == ":" * colons


def test_the_refusal_names_the_key_bounded() -> None:
    long_key = "k" * 500
    with pytest.raises(GatewayError) as refused:
        json_body.loads(json.dumps({"n": 1}).replace("{", f'{{"{long_key}": 1, '
                                                         f'"{long_key}": 2, ').encode())
    assert refused.value.param == "k" * 61 + "..."
    assert len(refused.value.message) < 200


@pytest.mark.parametrize(("route", "body"), [
    ("/v1/completions", '{"model": "serve-app-demo", "prompt": "Hi", "max_tokens": 100000, '
                        '"max_tokens": 2}'),
    ("/v1/chat/completions", '{"model": "serve-app-demo", "messages": [{"role": "user", '
                             '"content": "Hi"}], "model": "serve-app-demo"}'),
    ("/v1/embeddings", '{"model": "serve-app-demo-embed", "input": "Hi", '
                       '"encoding_format": "float", "encoding_format": "bytes"}'),
    ("/v2/embed", '{"model": "serve-app-demo-embed", "texts": ["Hi"], '
                  '"embedding_types": ["float"], "input_type": "classification", '
                  '"texts": ["Hi", "there"]}'),
])
async def test_every_json_route_refuses_a_repeated_key(
    gateway: httpx.AsyncClient, route: str, body: str
) -> None:
    response = await gateway.post(route, content=body,
                                  headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert error["code"] == "duplicate_key"
    assert error["param"] in body and f"`{error['param']}`" in error["message"]
