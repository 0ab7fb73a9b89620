"""What reaches an upstream: the allowlisted sampling fields and the embeddings, nothing else.

Every request field is forwarded (typed, bounded), used in the gateway, dropped or refused
with a 400 naming it; unknown fields are refused. Checked on the bytes a vLLM and a NIM
upstream receive.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from serve_app.config import BackendConfig, PrivacyConfig, UpstreamConfig
from serve_app.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingFields
from tests.unit.gateway_client import (
    CANARY,
    FRANCE,
    GREEDY,
    MODEL,
    GatewayFactory,
    RecordingASGITransport,
    error_of,
    post,
)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": FRANCE}]
EMBEDS_KEYS = {"vllm": {"prompt_embeds"}, "nim": {"prompt", "prompt-embeds"}}
NEWLINE = 201  # the demo tokenizer's one token for "\n"

# A valid value for every allowlisted field (the demo model's vocabulary has 262 tokens).
EVERY_SAMPLING_FIELD: dict[str, Any] = {
    "frequency_penalty": 0.1, "logit_bias": {"70": 1.5}, "n": 2, "presence_penalty": 0.1,
    "seed": 7, "stop": ["\n\n"], "stream": False, "temperature": 0.5, "top_p": 0.9,
    "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 1,
    "ignore_eos": False, "stop_token_ids": [2], "include_stop_str_in_output": False,
    "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "allowed_token_ids": list(range(3, 200)), "return_tokens_as_token_ids": False,
    "priority": 0, "cache_salt": "c2FsdA==", "logprobs": 1, "max_tokens": 4,
}


def upstream_for(dialect: str) -> UpstreamConfig:
    return UpstreamConfig(backends=[BackendConfig(url="http://ref/v1", dialect=dialect)])


@pytest.fixture(params=["vllm", "nim"])
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def gateway(make_gateway: GatewayFactory, recorder: RecordingASGITransport,
            dialect: str) -> httpx.AsyncClient:
    return make_gateway(recorder, upstream=upstream_for(dialect))


def sent(recorder: RecordingASGITransport) -> dict[str, Any]:
    [body] = recorder.bodies
    parsed: dict[str, Any] = orjson.loads(body)
    return parsed


def test_the_allowlist_is_what_the_table_documents() -> None:
    # docs/upstream-fields.md lists exactly these as forwarded; a new one needs a row there.
    assert set(SamplingFields.model_fields) == {*EVERY_SAMPLING_FIELD, "stream_options",
                                                "response_format", "structured_outputs",
                                                "guided_json", "guided_regex",
                                                "guided_choice", "guided_grammar",
                                                "structural_tag"}


# With the stop strings kept in the gateway (the default), the upstream gets every field but
# `stop`, and streams the answer with its running token counts.
GATEWAY_STOPS = {**{k: v for k, v in EVERY_SAMPLING_FIELD.items() if k != "stop"},
                 "stream": True,
                 "stream_options": {"include_usage": True, "continuous_usage_stats": True}}


@pytest.fixture(params=[True, False], ids=["forward_stop", "gateway_stops"])
def forward_stop(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def forwarding(make_gateway: GatewayFactory, recorder: RecordingASGITransport, dialect: str,
               forward_stop: bool) -> httpx.AsyncClient:
    return make_gateway(recorder, upstream=upstream_for(dialect),
                        privacy=PrivacyConfig(forward_stop=forward_stop))


async def test_completions_forward_exactly_the_allowlisted_fields(
    forwarding: httpx.AsyncClient, recorder: RecordingASGITransport, dialect: str,
    forward_stop: bool,
) -> None:
    response = await post(forwarding, prompt=FRANCE, user=CANARY, **EVERY_SAMPLING_FIELD)
    assert response.status_code == 200, response.text
    body = sent(recorder)
    expected = EVERY_SAMPLING_FIELD if forward_stop else GATEWAY_STOPS
    assert set(body) == {*expected, "model", *EMBEDS_KEYS[dialect]}
    assert {name: body[name] for name in expected} == expected


async def test_chat_forwards_exactly_the_allowlisted_fields(
    forwarding: httpx.AsyncClient, recorder: RecordingASGITransport, dialect: str,
    forward_stop: bool,
) -> None:
    fields = {k: v for k, v in EVERY_SAMPLING_FIELD.items() if k not in ("logprobs",
                                                                          "max_tokens")}
    response = await post(forwarding, CHAT, messages=MESSAGES, logprobs=True, top_logprobs=1,
                          max_completion_tokens=4, **fields)
    assert response.status_code == 200, response.text
    body = sent(recorder)
    expected = EVERY_SAMPLING_FIELD if forward_stop else GATEWAY_STOPS
    assert set(body) == {*expected, "model", *EMBEDS_KEYS[dialect]}
    assert body["logprobs"] == 1 and body["max_tokens"] == 4


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "messages", [{"role": "user", "content": CANARY}]),
        ("/v1/completions", "metadata", {"note": CANARY}),
        ("/v1/completions", "made_up_field", CANARY),
        (CHAT, "made_up_field", {"text": CANARY}),
        (CHAT, "prompt", CANARY),
        (CHAT, "context", CANARY),
    ],
)
async def test_unknown_fields_are_refused_by_name(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, path: str, field: str,
    value: Any,
) -> None:
    body = {"prompt": FRANCE} if path == "/v1/completions" else {"messages": MESSAGES}
    error = error_of(await post(gateway, path, **body, **{field: value}), 400)
    assert error["param"] == field and error["code"] == "unrecognized_argument"
    assert error["message"] == f"Unrecognized request argument supplied: {field}"
    assert recorder.bodies == []


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "suffix", CANARY),
        ("/v1/completions", "bad_words", [CANARY]),
        ("/v1/completions", "vllm_xargs", {"x": CANARY}),
        ("/v1/completions", "logits_processors", [CANARY]),
        ("/v1/completions", "request_id", CANARY),
        ("/v1/completions", "truncate_prompt_tokens", 4),
        (CHAT, "truncate_prompt_tokens", 4),
        (CHAT, "documents", [{"title": "t", "text": CANARY}]),
        (CHAT, "chat_template", "{{ '" + CANARY + "' }}"),
        (CHAT, "mm_processor_kwargs", {"x": CANARY}),
        (CHAT, "prediction", {"type": "content", "content": CANARY}),
        (CHAT, "bad_words", [CANARY]),
        (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]),
    ],
)
async def test_fields_that_would_carry_text_or_are_not_served_are_refused(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, path: str, field: str,
    value: Any,
) -> None:
    body = {"prompt": FRANCE} if path == "/v1/completions" else {"messages": MESSAGES}
    error = error_of(await post(gateway, path, **body, **{field: value}), 400)
    assert error["param"] == field and field in error["message"]
    assert CANARY not in error["message"]
    assert recorder.bodies == []


async def test_identifiers_clients_send_routinely_are_dropped(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport,
) -> None:
    dropped = {"user": CANARY, "metadata": {"session": CANARY}, "store": False,
               "service_tier": "auto", "prompt_cache_key": CANARY,
               "safety_identifier": CANARY, "parallel_tool_calls": False,
               "modalities": ["text"], "response_format": {"type": "text"},
               "tool_choice": "none"}
    response = await post(gateway, CHAT, messages=MESSAGES, **dropped, **GREEDY)
    assert response.status_code == 200, response.text
    assert CANARY.encode() not in recorder.bodies[0]
    assert not set(dropped) & set(sent(recorder))


@pytest.mark.parametrize(
    ("path", "structured"),
    [
        (CHAT, {"response_format": {"type": "json_object"}}),
        (CHAT, {"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "description": CANARY}}}}),
        ("/v1/completions", {"structured_outputs": {"regex": CANARY}}),
        ("/v1/completions", {"guided_json": {"description": CANARY}}),
        ("/v1/completions", {"guided_choice": [CANARY, "no"]}),
        ("/v1/completions", {"guided_grammar": CANARY}),
    ],
)
async def test_structured_outputs_are_refused_unless_the_operator_allows_them(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, path: str,
    structured: dict[str, Any],
) -> None:
    body = {"prompt": FRANCE} if path == "/v1/completions" else {"messages": MESSAGES}
    [field] = structured
    refusing = make_gateway(recorder)
    error = error_of(await post(refusing, path, **body, **structured), 400)
    assert error["param"] == field and "text" in error["message"]
    assert "privacy.forward_structured_outputs" in error["message"]
    assert recorder.bodies == []

    seen: list[dict[str, Any]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(orjson.loads(request.content))
        return httpx.Response(200, json={"id": "cmpl-1", "object": "text_completion",
                                         "created": 1, "model": MODEL, "choices": [
                                             {"index": 0, "text": "{}", "logprobs": None,
                                              "finish_reason": "stop"}]})

    allowing = make_gateway(httpx.MockTransport(upstream),
                            privacy=PrivacyConfig(forward_structured_outputs=True))
    response = await post(allowing, path, **body, **structured)
    assert response.status_code == 200, response.text
    assert seen[0][field] == structured[field]


@pytest.mark.parametrize("forward_stop", [True, False])
async def test_stop_strings_are_bounded(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, forward_stop: bool,
) -> None:
    gateway = make_gateway(recorder, privacy=PrivacyConfig(forward_stop=forward_stop))
    for stop, param in ((["x"] * (MAX_STOP_STRINGS + 1), "stop"),
                        ("x" * (MAX_STOP_CHARS + 1), "stop"), ("", "stop"),
                        (["x", ""], "stop.1")):
        error = error_of(await post(gateway, prompt=FRANCE, stop=stop), 400)
        assert error["param"] == param
    assert recorder.bodies == []
    stops = ["y" * MAX_STOP_CHARS] * MAX_STOP_STRINGS
    assert (await post(gateway, prompt=FRANCE, stop=stops, **GREEDY)).status_code == 200
    assert ("stop" in sent(recorder)) is forward_stop


async def test_stop_strings_are_forwarded_where_the_operator_says_so(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport,
) -> None:
    gateway = make_gateway(recorder, privacy=PrivacyConfig(forward_stop=True))
    for path, body in (("/v1/completions", {"prompt": FRANCE}), (CHAT, {"messages": MESSAGES})):
        response = await post(gateway, path, **body, stop=[CANARY, "\n"], **GREEDY)
        assert response.status_code == 200, response.text
        sent_body = orjson.loads([raw for raw in recorder.bodies if raw][-1])  # not probes
        assert sent_body["stop"] == [CANARY, "\n"] and "stop_token_ids" not in sent_body


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_strings_never_reach_the_upstream(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, stream: bool,
) -> None:
    for path, body in (("/v1/completions", {"prompt": FRANCE}), (CHAT, {"messages": MESSAGES})):
        response = await post(gateway, path, **body, stop=[CANARY, "\n"], stream=stream,
                              **GREEDY)
        assert response.status_code == 200, response.text
    posts = [raw for raw in recorder.bodies if raw]  # not the fleet's health probes
    assert len(posts) == 2
    for raw in posts:
        assert CANARY.encode() not in raw
        sent_body = orjson.loads(raw)
        assert "stop" not in sent_body and sent_body["stream"] is True
        # "\n" is one token of the demo model: not even its id goes by default.
        assert "stop_token_ids" not in sent_body


IDS = {"stop_token_ids": True}


@pytest.mark.parametrize(("privacy", "fields", "stop", "expected"), [
    (IDS, {}, ["\n", "ab", "é", "\n"], [NEWLINE]),  # "é" is two byte-level tokens
    (IDS, {"stop_token_ids": [5]}, ["\n"], [5, NEWLINE]),
    (IDS, {"stop_token_ids": [NEWLINE]}, ["\n"], [NEWLINE]),  # the client's: reported as id
    (IDS, {"min_tokens": 2}, ["\n"], None),  # vLLM would not sample it before min_tokens
    (IDS, {}, ["</s>"], None),  # a special token's text is not in the output
    (IDS, {"skip_special_tokens": False}, ["</s>"], [1]),
    ({}, {}, ["\n"], None),  # the default sends no id
    ({}, {"stop_token_ids": [5]}, ["\n"], [5]),
])
async def test_one_token_stop_strings_go_upstream_as_their_ids(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, privacy: dict[str, Any],
    fields: dict[str, Any], stop: list[str], expected: list[int] | None,
) -> None:
    gateway = make_gateway(recorder, privacy=PrivacyConfig(**privacy))
    response = await post(gateway, prompt=FRANCE, stop=stop, **fields, **GREEDY)
    assert response.status_code == 200, response.text
    assert sent(recorder).get("stop_token_ids") == expected


async def test_no_client_header_reaches_the_upstream(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport,
) -> None:
    headers = {"x-canary": CANARY, "cookie": f"session={CANARY}", "x-forwarded-for": "1.2.3.4",
               "user-agent": CANARY, "openai-organization": CANARY}
    response = await gateway.post("/v1/completions", headers=headers,
                                  json={"model": MODEL, "prompt": FRANCE, **GREEDY})
    assert response.status_code == 200
    [upstream_headers] = recorder.headers
    assert CANARY not in str(list(upstream_headers.raw))
    assert not {"x-canary", "cookie", "x-forwarded-for", "openai-organization"} & set(
        upstream_headers)
