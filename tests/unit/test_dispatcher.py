"""DispatcherCore against a fake upstream (httpx.MockTransport): body, relay, error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import orjson
import pytest
import torch

from serve_app.config import BackendConfig, UpstreamConfig
from serve_app.prompts.codec import EncodedPromptEmbeds, encode_prompt_embeds
from serve_app.protocol import SamplingFields
from serve_app.upstream.call import ChatShape, UpstreamCall, UpstreamReply
from serve_app.upstream.dispatcher import DispatcherCore
from serve_app.upstream.wire import build_upstream_body

SERVED = "serve-app-demo"
UPSTREAM_URL = "http://upstream.test/v1"
DIALECTS = ["vllm", "nim"]
DONE = b"data: [DONE]\n\n"

Handler = Callable[[httpx.Request], Any]


# --------------------------------------------------------------------------- helpers


def make_embeds(*rows: int) -> list[EncodedPromptEmbeds]:
    return [encode_prompt_embeds(torch.randn(count, 8)) for count in rows]


class FakeUpstream:
    """Records every request and answers with `respond(request)`."""

    def __init__(self, respond: Handler) -> None:
        self.respond = respond
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> Any:
        self.requests.append(request)
        return self.respond(request)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [orjson.loads(request.content) for request in self.requests]


@pytest.fixture
async def make_core(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Callable[..., tuple[DispatcherCore, FakeUpstream]]]:
    cores: list[DispatcherCore] = []

    def factory(
        respond: Handler,
        *,
        dialect: str = "vllm",
        model: str | None = None,
        api_key: str | None = None,
    ) -> tuple[DispatcherCore, FakeUpstream]:
        upstream = FakeUpstream(respond)
        key_env = f"TEST_UPSTREAM_KEY_{len(cores)}"
        if api_key is not None:
            monkeypatch.setenv(key_env, api_key)
        backend = BackendConfig(url=UPSTREAM_URL, dialect=dialect, model=model,
                                api_key_env=key_env if api_key is not None else None)
        client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
        core = DispatcherCore(UpstreamConfig(backends=[backend]), client)
        cores.append(core)
        return core, upstream

    yield factory
    for core in cores:
        await core.aclose()


def completion_payload(
    model: str = "upstream-model", prompt_tokens: int = 0, completion_tokens: int = 4
) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": model,
        "choices": [
            {"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length"}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def ok_json(payload: Any = None) -> Handler:
    body = completion_payload() if payload is None else payload
    return lambda request: httpx.Response(200, json=body)


def chunk_event(text: str, index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-s",
        "object": "text_completion",
        "created": 1,
        "model": "upstream-model",
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def sse(*payloads: Any, done: bool = True, newline: bytes = b"\n") -> bytes:
    blank = newline * 2
    out = b"".join(b"data: " + orjson.dumps(p) + blank for p in payloads)
    return out + (b"data: [DONE]" + blank if done else b"")


def chunked(data: bytes, size: int) -> Callable[[], AsyncIterator[bytes]]:
    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), size):
            yield data[start : start + size]

    return body


def stream_reply(data: bytes, size: int = 1 << 20) -> Handler:
    return lambda request: httpx.Response(
        200,
        content=chunked(data, size)(),
        headers={"content-type": "text/event-stream"},
    )


async def collect(
    core: DispatcherCore, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds]
) -> tuple[UpstreamReply, list[bytes]]:
    items = [item async for item in core.stream(call, embeds)]
    head, *events = items
    assert isinstance(head, UpstreamReply)
    assert all(isinstance(event, bytes) for event in events)
    return head, events  # type: ignore[return-value]


def event_payload(event: bytes) -> Any:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n"), event
    return orjson.loads(event[len(b"data: ") : -2])


def error_of(body: bytes) -> dict[str, Any]:
    parsed = orjson.loads(body)
    assert set(parsed) == {"error"}
    assert set(parsed["error"]) == {"message", "type", "param", "code"}
    return parsed["error"]


def raising(exc_type: type[httpx.HTTPError]) -> Handler:
    def respond(request: httpx.Request) -> httpx.Response:
        raise exc_type("boom", request=request)

    return respond


def call(is_stream: bool = False, /, **fields: Any) -> UpstreamCall:
    return UpstreamCall(SERVED, SamplingFields.model_validate(fields), is_stream)


# --------------------------------------------------------------------------- request body


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_single_prompt_body(make_core, dialect: str) -> None:
    core, upstream = make_core(ok_json(), dialect=dialect)
    embeds = make_embeds(3)
    reply = await core.complete(call(max_tokens=5), embeds)
    assert reply.status == 200
    assert len(upstream.requests) == 1
    request = upstream.requests[0]
    assert request.method == "POST"
    assert str(request.url) == f"{UPSTREAM_URL}/completions"
    assert request.headers["content-type"] == "application/json"
    body = orjson.loads(request.content)  # valid JSON
    if dialect == "vllm":
        assert "prompt" not in body and "prompt-embeds" not in body
        assert isinstance(body["prompt_embeds"], str)
        assert body["prompt_embeds"].encode() == embeds[0].data
    else:
        assert "prompt_embeds" not in body
        assert body["prompt"] == ""
        assert isinstance(body["prompt-embeds"], str)
        assert body["prompt-embeds"].encode() == embeds[0].data


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_several_prompts_body_keeps_order(make_core, dialect: str) -> None:
    core, upstream = make_core(ok_json(), dialect=dialect)
    embeds = make_embeds(3, 1, 5)
    reply = await core.complete(call(), embeds)
    assert reply.status == 200
    body = upstream.bodies[0]
    key = "prompt_embeds" if dialect == "vllm" else "prompt-embeds"
    other = "prompt-embeds" if dialect == "vllm" else "prompt_embeds"
    assert other not in body
    assert isinstance(body[key], list)
    assert [item.encode() for item in body[key]] == [item.data for item in embeds]
    if dialect == "nim":
        assert body["prompt"] == ""
    else:
        assert "prompt" not in body


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("stream", [False, True])
async def test_sampling_fields_pass_through(make_core, dialect: str, stream: bool) -> None:
    respond = stream_reply(sse(chunk_event("x"))) if stream else ok_json()
    core, upstream = make_core(respond, dialect=dialect)
    fields = {
        "max_tokens": 7,
        "temperature": 0.25,
        "top_p": 0.9,
        "n": 2,
        "seed": 11,
        "stop": ["\n", "caf\u00e9 \"quoted\" \\ back"],  # needs JSON escaping
        "logprobs": 2,
        "stream": stream,
        "stream_options": {"include_usage": True},
        "repetition_penalty": 1.1,  # a vLLM extension
        "stop_token_ids": [3, 4],
    }
    if stream:
        await collect(core, call(True, **fields), make_embeds(2))
    else:
        assert (await core.complete(call(**fields), make_embeds(2))).status == 200
    body = upstream.bodies[0]
    for name, value in fields.items():
        assert body[name] == value, name


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(
    ("configured", "expected"),
    [(None, SERVED), ("meta/llama-3.1-8b-instruct", "meta/llama-3.1-8b-instruct")],
)
async def test_upstream_model_name(
    make_core, dialect: str, configured: str | None, expected: str
) -> None:
    core, upstream = make_core(ok_json(), dialect=dialect, model=configured)
    await core.complete(call(), make_embeds(1))
    assert upstream.bodies[0]["model"] == expected


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("stream", [False, True])
async def test_authorization_header_only_with_api_key(
    make_core, dialect: str, stream: bool
) -> None:
    respond = stream_reply(sse(chunk_event("x"))) if stream else ok_json()
    with_key, upstream_with = make_core(respond, dialect=dialect, api_key="sk-secret")
    without, upstream_without = make_core(respond, dialect=dialect, api_key=None)
    empty, upstream_empty = make_core(respond, dialect=dialect, api_key="")
    for core in (with_key, without, empty):
        if stream:
            await collect(core, call(True), make_embeds(1))
        else:
            await core.complete(call(), make_embeds(1))
    assert upstream_with.requests[0].headers["authorization"] == "Bearer sk-secret"
    assert "authorization" not in upstream_without.requests[0].headers
    assert "authorization" not in upstream_empty.requests[0].headers


async def test_no_embeds_is_a_400_without_upstream_call(make_core) -> None:
    core, upstream = make_core(ok_json())
    reply = await core.complete(call(), [])
    assert reply.status == 400
    assert error_of(reply.body)["param"] == "prompt"
    head, events = await collect(core, call(True), [])
    assert head.status == 400 and events == []
    assert upstream.requests == []


# --------------------------------------------------------------------------- non-stream reply


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("reported_prompt_tokens", [0, 999])
async def test_reply_model_and_usage_corrected(
    make_core, dialect: str, reported_prompt_tokens: int
) -> None:
    payload = completion_payload("upstream-model", reported_prompt_tokens, 4)
    core, _ = make_core(ok_json(payload), dialect=dialect, model="upstream-model")
    reply = await core.complete(call(), make_embeds(3, 5))
    assert reply.status == 200
    body = orjson.loads(reply.body)
    assert body["model"] == SERVED
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}
    assert body["choices"] == payload["choices"]
    assert body["id"] == "cmpl-1"


async def test_reply_without_completion_tokens(make_core) -> None:
    payload = completion_payload()
    payload["usage"] = {"prompt_tokens": 0, "completion_tokens": None, "total_tokens": 0}
    core, _ = make_core(ok_json(payload))
    body = orjson.loads((await core.complete(call(), make_embeds(6))).body)
    assert body["usage"]["prompt_tokens"] == 6
    assert body["usage"]["total_tokens"] == 6


# --------------------------------------------------------------------------- stream relay


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_stream_relays_events_in_order(make_core, dialect: str) -> None:
    usage_chunk = {
        **chunk_event(""),
        "choices": [],
        "usage": {"prompt_tokens": 0, "completion_tokens": 3, "total_tokens": 3},
    }
    upstream_events = [chunk_event("Hel"), chunk_event("lo"), chunk_event("!", finish="stop")]
    core, upstream = make_core(
        stream_reply(sse(*upstream_events, usage_chunk)), dialect=dialect
    )
    head, events = await collect(core, call(True, stream=True), make_embeds(2, 2))
    assert head == UpstreamReply(200, backend=UPSTREAM_URL)
    assert events[-1] == DONE
    payloads = [event_payload(event) for event in events[:-1]]
    assert len(payloads) == 4
    assert [p["model"] for p in payloads] == [SERVED] * 4
    assert [p["choices"] for p in payloads[:3]] == [e["choices"] for e in upstream_events]
    assert payloads[3]["choices"] == []
    assert payloads[3]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert upstream.bodies[0]["stream"] is True


@pytest.mark.parametrize("size", [1, 2, 5, 13, 64])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
async def test_stream_split_across_chunks(make_core, size: int, newline: bytes) -> None:
    texts = ["The", " capital", " is", " Paris", "."]
    data = sse(*(chunk_event(t) for t in texts), newline=newline)
    core, _ = make_core(stream_reply(data, size))
    head, events = await collect(core, call(True), make_embeds(1))
    assert head.status == 200
    assert events[-1] == DONE
    payloads = [event_payload(event) for event in events[:-1]]
    assert [p["choices"][0]["text"] for p in payloads] == texts
    assert all(p["model"] == SERVED for p in payloads)


async def test_stream_ignores_comments_and_other_fields(make_core) -> None:
    data = (
        b": keep-alive\n\n"
        b"event: message\nid: 1\ndata: " + orjson.dumps(chunk_event("a")) + b"\n\n"
        b"data: [DONE]\n\n"
    )
    core, _ = make_core(stream_reply(data, 3))
    head, events = await collect(core, call(True), make_embeds(1))
    assert head.status == 200
    assert len(events) == 2
    assert event_payload(events[0])["choices"][0]["text"] == "a"
    assert events[1] == DONE


async def test_stream_relays_upstream_error_event(make_core) -> None:
    error = {"error": {"message": "generation failed", "type": "InternalServerError",
                       "param": None, "code": 500}}
    core, _ = make_core(stream_reply(sse(chunk_event("a"), error)))
    head, events = await collect(core, call(True), make_embeds(1))
    assert head.status == 200
    assert event_payload(events[1]) == error
    assert events[-1] == DONE and len(events) == 3


# --------------------------------------------------------------------------- upstream errors


VLLM_NESTED_ERROR = {
    "error": {
        "message": "max_tokens must be at least 1, got 0.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
}
VLLM_FLAT_ERROR = {
    "object": "error",
    "message": "max_tokens must be at least 1, got 0.",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}


@pytest.mark.parametrize("error_body", [VLLM_NESTED_ERROR, VLLM_FLAT_ERROR], ids=["nested", "flat"])
@pytest.mark.parametrize("status", [400, 404, 422])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_4xx_keeps_status_and_message(
    make_core, error_body: dict[str, Any], status: int, stream: bool
) -> None:
    core, _ = make_core(lambda request: httpx.Response(status, json=error_body))
    if stream:
        reply, events = await collect(core, call(True), make_embeds(1))
        assert events == []
    else:
        reply = await core.complete(call(), make_embeds(1))
    assert reply.status == status
    error = error_of(reply.body)
    assert error["message"] == "max_tokens must be at least 1, got 0."


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_4xx_plain_text_body(make_core, stream: bool) -> None:
    core, _ = make_core(lambda request: httpx.Response(401, text="Unauthorized"))
    if stream:
        reply, _events = await collect(core, call(True), make_embeds(1))
    else:
        reply = await core.complete(call(), make_embeds(1))
    assert reply.status == 401
    assert error_of(reply.body)["type"] == "AuthenticationError"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("status", "answered"), [(500, 502), (501, 502), (503, 503), (504, 504)])
async def test_upstream_5xx_is_named(
    make_core, stream: bool, status: int, answered: int
) -> None:
    body = {"error": {"message": "engine dead", "type": "InternalServerError", "code": status}}
    core, _ = make_core(lambda request: httpx.Response(status, json=body))
    if stream:
        reply, events = await collect(core, call(True), make_embeds(1))
        assert events == []
    else:
        reply = await core.complete(call(), make_embeds(1))
    assert reply.status == answered
    error = error_of(reply.body)
    assert str(status) in error["message"] and "engine dead" in error["message"]
    assert error["code"] == "upstream_error"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("exc_type", "status"),
    [
        (httpx.ConnectError, 503),
        (httpx.ReadTimeout, 504),
        (httpx.ConnectTimeout, 503),
        (httpx.RemoteProtocolError, 502),
    ],
)
async def test_transport_errors(
    make_core, stream: bool, exc_type: type[httpx.HTTPError], status: int
) -> None:
    core, upstream = make_core(raising(exc_type))
    if stream:
        reply, events = await collect(core, call(True), make_embeds(1))
        assert events == []
    else:
        reply = await core.complete(call(), make_embeds(1))
    assert len(upstream.requests) == 1
    assert reply.status == status
    error = error_of(reply.body)
    assert error["message"]
    assert "boom" not in error["message"]


async def test_invalid_json_reply_is_502(make_core) -> None:
    core, _ = make_core(lambda request: httpx.Response(200, content=b"<html>oops</html>"))
    reply = await core.complete(call(), make_embeds(1))
    assert reply.status == 502
    assert error_of(reply.body)["code"] == "upstream_error"


async def test_non_object_json_reply_is_502(make_core) -> None:
    core, _ = make_core(lambda request: httpx.Response(200, content=b"[]"))
    reply = await core.complete(call(), make_embeds(1))
    assert reply.status == 502


async def test_stream_non_object_event_is_error_event(make_core) -> None:
    core, _ = make_core(stream_reply(b"data: []\n\n" + DONE))
    head, events = await collect(core, call(True), make_embeds(1))
    assert head.status == 200
    assert "error" in event_payload(events[0])
    assert events[-1] == DONE


# --------------------------------------------------------------------------- stream failures


def _stream_then(exc: Exception | None, first: bytes) -> Handler:
    def respond(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield first
            if exc is not None:
                raise exc

        return httpx.Response(200, content=body())

    return respond


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (httpx.ReadError("connection reset"), "upstream_error"),
        (httpx.ReadTimeout("slow"), "upstream_timeout"),
    ],
)
async def test_mid_stream_failure_ends_with_error_then_done(
    make_core, exc: Exception, code: str
) -> None:
    core, _ = make_core(_stream_then(exc, sse(chunk_event("first"), done=False)))
    head, events = await collect(core, call(True), make_embeds(1))
    assert head == UpstreamReply(200, backend=UPSTREAM_URL)
    assert len(events) == 3
    assert event_payload(events[0])["choices"][0]["text"] == "first"
    error = event_payload(events[1])["error"]
    assert error["code"] == code
    assert events[2] == DONE


async def test_stream_without_done_ends_with_error_then_done(make_core) -> None:
    core, _ = make_core(stream_reply(sse(chunk_event("a"), chunk_event("b"), done=False), 4))
    head, events = await collect(core, call(True), make_embeds(1))
    assert head.status == 200
    assert [event_payload(e)["choices"][0]["text"] for e in events[:2]] == ["a", "b"]
    error = event_payload(events[2])["error"]
    assert "[DONE]" in error["message"]
    assert events[3] == DONE and len(events) == 4


async def test_stream_last_event_without_blank_line(make_core) -> None:
    # The final event lacks its blank line and the stream lacks [DONE].
    data = sse(chunk_event("a"), done=False) + b"data: " + orjson.dumps(chunk_event("tail"))
    core, _ = make_core(stream_reply(data + b"\n", 5))
    head, events = await collect(core, call(True), make_embeds(1))
    assert head.status == 200
    assert [event_payload(e)["choices"][0]["text"] for e in events[:2]] == ["a", "tail"]
    assert "error" in event_payload(events[2])
    assert events[3] == DONE and len(events) == 4


async def test_stream_invalid_json_event(make_core) -> None:
    data = sse(chunk_event("a"), done=False) + b"data: {not json\n\n" + DONE
    core, _ = make_core(stream_reply(data))
    head, events = await collect(core, call(True), make_embeds(1))
    assert head.status == 200
    assert event_payload(events[0])["choices"][0]["text"] == "a"
    assert event_payload(events[1])["error"]["code"] == "upstream_error"
    assert events[2] == DONE and len(events) == 3


async def test_stream_stops_at_done(make_core) -> None:
    data = sse(chunk_event("a")) + b"data: " + orjson.dumps(chunk_event("late")) + b"\n\n"
    core, _ = make_core(stream_reply(data))
    _, events = await collect(core, call(True), make_embeds(1))
    assert len(events) == 2 and events[1] == DONE


# --------------------------------------------------------------------------- build_upstream_body


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize(
    "fields",
    [{}, {"model": "m"}, {"model": "m", "max_tokens": 3, "stop": ["}", "\""], "n": 1}],
)
def test_build_upstream_body(dialect: str, count: int, fields: dict[str, Any]) -> None:
    embeds = make_embeds(*range(1, count + 1))
    raw = b"".join(build_upstream_body(fields, embeds, dialect))
    body = orjson.loads(raw)
    data = [item.data.decode() for item in embeds]
    expected = dict(fields)
    if dialect == "nim":
        expected["prompt"] = ""
        expected["prompt-embeds"] = data[0] if count == 1 else data
    else:
        expected["prompt_embeds"] = data[0] if count == 1 else data
    assert body == expected
    # The sampling fields come first, then the spliced prompt.
    assert list(body)[: len(fields)] == list(fields)
    for item in embeds:
        assert raw.count(item.data) == 1


def test_build_upstream_body_embeds_are_raw_base64_bytes() -> None:
    embeds = make_embeds(3)
    raw = b"".join(build_upstream_body({"model": "m"}, embeds, "vllm"))
    assert raw == b'{"model":"m","prompt_embeds":"' + embeds[0].data + b'"}'
    nim = b"".join(build_upstream_body({}, embeds, "nim"))
    assert nim == b'{"prompt":"","prompt-embeds":"' + embeds[0].data + b'"}'


# --------------------------------------------------------------------------- chat answers


def chat_call(is_stream: bool = False, top_logprobs: int | None = None) -> UpstreamCall:
    return UpstreamCall(SERVED, SamplingFields(stream=True) if is_stream else SamplingFields(),
                        is_stream, chat=ChatShape(top_logprobs))


LOGPROBS = {
    "tokens": ["he", "llo"], "token_logprobs": [-0.5, -1.0], "text_offset": [0, 2],
    "top_logprobs": [{"he": -0.5, "x": -2.0, "y": -3.0}, {"llo": -1.0, "é": -0.25}],
}


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_chat_reply_from_a_nim_style_completion(make_core, dialect: str) -> None:
    payload = completion_payload(prompt_tokens=0)  # NIM may report 0 prompt tokens
    payload["choices"][0]["logprobs"] = LOGPROBS
    core, upstream = make_core(ok_json(payload), dialect=dialect)
    reply = await core.complete(chat_call(top_logprobs=1), make_embeds(5))
    body = orjson.loads(reply.body)
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-1"
    assert body["model"] == SERVED
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "hello", "refusal": None}
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] == {"content": [
        {"token": "he", "logprob": -0.5, "bytes": [104, 101],
         "top_logprobs": [{"token": "he", "logprob": -0.5, "bytes": [104, 101]}]},
        # A sampled token below the top rank stays first, as vLLM's chat lists it.
        {"token": "llo", "logprob": -1.0, "bytes": [108, 108, 111],
         "top_logprobs": [{"token": "llo", "logprob": -1.0, "bytes": [108, 108, 111]}]},
    ]}
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert "messages" not in upstream.bodies[0]


async def test_chat_stream_role_first_then_content(make_core) -> None:
    usage_chunk = {**chunk_event(""), "choices": [],
                   "usage": {"prompt_tokens": 0, "completion_tokens": 3, "total_tokens": 3}}
    upstream_events = [chunk_event("Hel"), chunk_event("Hi", index=1), chunk_event("lo"),
                       chunk_event("", finish="stop"), chunk_event("!", 1, finish="length")]
    core, _ = make_core(stream_reply(sse(*upstream_events, usage_chunk)))
    head, events = await collect(core, chat_call(True), make_embeds(4))
    assert head == UpstreamReply(200, backend=UPSTREAM_URL) and events[-1] == DONE
    payloads = [event_payload(event) for event in events[:-1]]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert {p["id"] for p in payloads} == {"chatcmpl-s"}
    choices = [(c["index"], c["delta"], c["finish_reason"])
               for p in payloads for c in p["choices"]]
    assert choices == [
        (0, {"role": "assistant", "content": ""}, None), (0, {"content": "Hel"}, None),
        (1, {"role": "assistant", "content": ""}, None), (1, {"content": "Hi"}, None),
        (0, {"content": "lo"}, None), (0, {}, "stop"), (1, {"content": "!"}, "length"),
    ]
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3,
                                     "total_tokens": 7}


def usage_of(completion_tokens: int, prompt_tokens: int = 0) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@pytest.mark.parametrize("reported_prompt_tokens", [0, 999])  # NIM's 0, a wrong count
async def test_chat_stream_continuous_usage_in_every_chunk(
    make_core, reported_prompt_tokens: int
) -> None:
    """vLLM's `continuous_usage_stats`: every upstream chunk carries the usage so far, and
    so does every chat chunk made from it, with the gateway's own prompt length."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    upstream_events = [
        {**chunk_event("Hel"), "usage": usage_of(1, reported_prompt_tokens)},
        {**chunk_event("lo"), "usage": usage_of(2, reported_prompt_tokens)},
        {**chunk_event("", finish="stop"), "usage": usage_of(2, reported_prompt_tokens)},
        {**chunk_event(""), "choices": [], "usage": usage_of(2, reported_prompt_tokens)},
    ]
    core, upstream = make_core(stream_reply(sse(*upstream_events)))
    fields = SamplingFields.model_validate({"stream": True, "stream_options": options})
    head, events = await collect(core, UpstreamCall(SERVED, fields, True, chat=ChatShape()),
                                 make_embeds(4))
    assert upstream.bodies[0]["stream_options"] == options
    assert head == UpstreamReply(200, backend=UPSTREAM_URL) and events[-1] == DONE
    payloads = [event_payload(event) for event in events[:-1]]
    *chunks, final = payloads
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        ({"role": "assistant", "content": ""}, None), ({"content": "Hel"}, None),
        ({"content": "lo"}, None), ({}, "stop")]
    # The role chunk and the first text come from the first upstream chunk: both carry it.
    assert [c.get("usage") for c in chunks] == [
        usage_of(1, 4), usage_of(1, 4), usage_of(2, 4), usage_of(2, 4)]
    assert final["choices"] == [] and final["usage"] == usage_of(2, 4)
