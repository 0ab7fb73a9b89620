"""DispatcherCore applying the gateway's stop strings, against fake upstreams
(httpx.MockTransport) that generate one event per token and record how far they were read
and whether the gateway closed them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest

from serve_app.config import BackendConfig, UpstreamConfig
from serve_app.protocol import SamplingFields
from serve_app.upstream.call import ChatShape, UpstreamCall
from serve_app.upstream.dispatcher import DispatcherCore
from serve_app.upstream.stops import StopRule
from tests.unit.test_dispatcher import (
    DONE,
    SERVED,
    UPSTREAM_URL,
    chunk_event,
    collect,
    event_payload,
    make_embeds,
)

STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}
TOKENS = ["The", " cap", "ital", " is", " Par", "is", "."] + [" more"] * 200
STOP = StopRule(("is P", "never"))  # completes at the fifth token
CUT = "The capital "


class Generation(httpx.AsyncByteStream):
    """An upstream answer, given one event at a time as it is read: `given` counts them,
    `closed` says whether the gateway closed the request."""

    def __init__(self, events: list[dict[str, Any]], usage: dict[str, Any] | None) -> None:
        self.events = [b"data: " + orjson.dumps(event) + b"\n\n" for event in events]
        if usage is not None:
            self.events.append(b"data: " + orjson.dumps(usage) + b"\n\n")
        self.events.append(DONE)
        self.given = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self.events:
            self.given += 1
            yield event

    async def aclose(self) -> None:
        self.closed = True


class FakeGenerator:
    """A fake upstream: answers each request with a new `Generation` of `events`."""

    def __init__(self, events: list[dict[str, Any]], completion_tokens: int | None = None):
        self.event_list = events
        self.completion_tokens = len(events) if completion_tokens is None else completion_tokens
        self.bodies: list[dict[str, Any]] = []
        self.generations: list[Generation] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(orjson.loads(request.content))
        usage = {**chunk_event(""), "choices": [], "usage": {
            "prompt_tokens": 0, "completion_tokens": self.completion_tokens,
            "total_tokens": self.completion_tokens}}
        self.generations.append(Generation(self.event_list, usage))
        return httpx.Response(200, stream=self.generations[-1],
                              headers={"content-type": "text/event-stream"})

    @property
    def generation(self) -> Generation:
        [generation] = self.generations
        return generation


@pytest.fixture
async def make_core() -> AsyncIterator[Callable[[FakeGenerator], DispatcherCore]]:
    cores: list[DispatcherCore] = []

    def factory(upstream: FakeGenerator) -> DispatcherCore:
        client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
        cores.append(DispatcherCore(UpstreamConfig(backends=[BackendConfig(url=UPSTREAM_URL)]),
                                    client))
        return cores[-1]

    yield factory
    for core in cores:
        await core.aclose()


def tokens(texts: list[str], index: int = 0, last: str = "length") -> list[dict[str, Any]]:
    """One event per token, the last one finishing the choice."""
    events = [chunk_event(text, index) for text in texts]
    events[-1]["choices"][0]["finish_reason"] = last
    return events


def stop_call(stream: bool = False, rule: StopRule = STOP, chat: ChatShape | None = None,
              **fields: Any) -> UpstreamCall:
    if stream:
        fields["stream"] = True
    return UpstreamCall(SERVED, SamplingFields.model_validate(fields), stream, chat=chat,
                        stops=rule)


def texts_of(events: list[bytes]) -> dict[int, str]:
    joined: dict[int, str] = {}
    for event in events[:-1]:
        for choice in event_payload(event)["choices"]:
            joined[choice["index"]] = joined.get(choice["index"], "") + choice["text"]
    return joined


# --------------------------------------------------------------------------- the body


@pytest.mark.parametrize("stream", [False, True])
async def test_the_upstream_streams_without_the_stop_strings(make_core, stream: bool) -> None:
    upstream = FakeGenerator(tokens(TOKENS[:3]))
    core = make_core(upstream)
    call = stop_call(stream, max_tokens=9, stop_token_ids=[201, 7])
    if stream:
        await collect(core, call, make_embeds(2))
    else:
        assert (await core.complete(call, make_embeds(2))).status == 200
    [body] = upstream.bodies
    assert "stop" not in body and "is P" not in orjson.dumps(body).decode()
    assert body["stream"] is True and body["stream_options"] == STREAM_OPTIONS
    assert body["stop_token_ids"] == [201, 7] and body["max_tokens"] == 9


# --------------------------------------------------------------------------- cut and closed


async def test_a_stream_is_cut_at_the_stop_and_the_upstream_closed(make_core) -> None:
    upstream = FakeGenerator(tokens(TOKENS))
    head, events = await collect(make_core(upstream), stop_call(
        True, stream_options={"include_usage": True}), make_embeds(3))
    assert head.status == 200 and events[-1] == DONE
    *chunks, usage = [event_payload(event) for event in events[:-1]]
    pieces = [chunk["choices"][0]["text"] for chunk in chunks]
    # One chunk per token, empty while held back, none with part of the stop string.
    assert pieces == ["", "The", " cap", "ita", "l "]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["stop"]
    assert chunks[-1]["choices"][0]["stop_reason"] == "is P"
    assert all(chunk["model"] == SERVED and "usage" not in chunk for chunk in chunks)
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert upstream.generation.closed and upstream.generation.given == 5


async def test_a_whole_answer_is_joined_from_the_cut_stream(make_core) -> None:
    upstream = FakeGenerator(tokens(TOKENS))
    reply = await make_core(upstream).complete(stop_call(), make_embeds(3))
    assert reply.status == 200 and reply.backend == UPSTREAM_URL
    answer = orjson.loads(reply.body)
    assert answer["object"] == "text_completion" and answer["model"] == SERVED
    assert answer["choices"] == [{"index": 0, "text": CUT, "logprobs": None,
                                  "finish_reason": "stop", "stop_reason": "is P"}]
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert upstream.generation.closed and upstream.generation.given == 5


@pytest.mark.parametrize("stream", [False, True])
async def test_include_stop_str_in_output(make_core, stream: bool) -> None:
    upstream = FakeGenerator(tokens(TOKENS))
    call = stop_call(stream, StopRule(("is P",), include_in_output=True))
    if stream:
        _, events = await collect(make_core(upstream), call, make_embeds(1))
        text = texts_of(events)[0]
    else:
        text = orjson.loads((await make_core(upstream).complete(call, make_embeds(1))).body)[
            "choices"][0]["text"]
    assert text == "The capital is P"
    assert upstream.generation.given == 5


async def test_each_choice_stops_on_its_own(make_core) -> None:
    """n = 2: the upstream is closed only once both choices have stopped; the first one's
    events after its stop are dropped."""
    first = tokens(["a", "b", "STOP", "c", "d", "e", "f"], 0)
    second = tokens(["w", "x", "y", "STOP", "z", "zz", "zzz"], 1)
    interleaved = [event for pair in zip(first, second, strict=True) for event in pair]
    upstream = FakeGenerator(interleaved)
    rule = StopRule(("STOP",))
    head, events = await collect(make_core(upstream), stop_call(
        True, rule, n=2, stream_options={"include_usage": True}), make_embeds(1))
    assert texts_of(events) == {0: "ab", 1: "wxy"}
    finishes = [(c["index"], c["finish_reason"], c["stop_reason"])
                for e in events[:-2] for c in event_payload(e)["choices"]]
    assert finishes.count((0, "stop", "STOP")) == 1 and finishes[-1] == (1, "stop", "STOP")
    assert [index for index, *_ in finishes] == [0, 1] * 3 + [1]
    assert event_payload(events[-2])["usage"]["completion_tokens"] == 3 + 4
    assert upstream.generation.closed and upstream.generation.given == 8

    reply = await make_core(FakeGenerator(interleaved)).complete(
        stop_call(False, rule, n=2), make_embeds(1))
    choices = orjson.loads(reply.body)["choices"]
    assert [(c["index"], c["text"], c["stop_reason"]) for c in choices] == [
        (0, "ab", "STOP"), (1, "wxy", "STOP")]


async def test_a_choice_that_ends_first_gives_out_its_held_back_text(make_core) -> None:
    """No stop: the upstream's finish ends the choice, with the text held back so far, and
    the upstream's own usage stands."""
    upstream = FakeGenerator(tokens(["no", " stop", " here"]), completion_tokens=3)
    _, events = await collect(make_core(upstream), stop_call(
        True, stream_options={"include_usage": True}), make_embeds(2))
    chunks = [event_payload(event) for event in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["", "no ", "stop here"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-2]["choices"][0]["stop_reason"] is None
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert upstream.generation.given == 5  # read to its [DONE]


# --------------------------------------------------------------------------- token counts


async def test_running_counts_count_merged_events(make_core) -> None:
    """An upstream that put several tokens in one event (vLLM when its reader fell
    behind) says so in its running count (`continuous_usage_stats`)."""
    events = tokens(["The cap", "ital is", " Par", "is."])
    for event, running in zip(events, (2, 4, 5, 7), strict=True):
        event["usage"] = {"prompt_tokens": 0, "completion_tokens": running,
                          "total_tokens": running}
    reply = await make_core(FakeGenerator(events)).complete(stop_call(), make_embeds(1))
    answer = orjson.loads(reply.body)
    assert answer["choices"][0]["text"] == CUT
    assert answer["usage"]["completion_tokens"] == 5


async def test_continuous_usage_when_the_client_asks(make_core) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    _, events = await collect(make_core(FakeGenerator(tokens(TOKENS))),
                              stop_call(True, stream_options=options), make_embeds(2))
    usages = [event_payload(event)["usage"]["completion_tokens"] for event in events[:-1]]
    assert usages == [1, 2, 3, 4, 5, 5]


def with_logprobs(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for step, event in enumerate(events):
        [choice] = event["choices"]
        choice["logprobs"] = {"tokens": [choice["text"]], "token_logprobs": [-float(step)],
                              "top_logprobs": [{choice["text"]: -float(step)}],
                              "text_offset": [999]}
    return events


async def test_logprobs_are_cut_with_the_text(make_core) -> None:
    reply = await make_core(FakeGenerator(with_logprobs(tokens(TOKENS)))).complete(
        stop_call(logprobs=0), make_embeds(1))
    logprobs = orjson.loads(reply.body)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == TOKENS[:5]
    assert logprobs["token_logprobs"] == [0.0, -1.0, -2.0, -3.0, -4.0]
    # vLLM's offsets of a whole answer: each token's start in the joined tokens.
    assert logprobs["text_offset"] == [0, 3, 7, 11, 14]


async def test_streamed_logprobs_offsets_follow_the_text_given_out(make_core) -> None:
    """vLLM streams each chunk's offsets from the length of the text it has sent, which
    the hold-back keeps short of the tokens'."""
    _, events = await collect(make_core(FakeGenerator(with_logprobs(tokens(TOKENS)))),
                              stop_call(True, logprobs=0), make_embeds(1))
    offsets = [event_payload(e)["choices"][0]["logprobs"]["text_offset"] for e in events[:-1]]
    assert offsets == [[0], [0], [3], [7], [10]]


# --------------------------------------------------------------------------- stop token ids


@pytest.mark.parametrize("include", [False, True])
async def test_the_upstream_stopping_on_the_gateways_token_id(make_core, include: bool) -> None:
    """The upstream stopped on the id the gateway sent for "\\n": vLLM leaves the token's
    text out unless `include_stop_str_in_output`; either way the answer is the one vLLM
    gives applying the string, and the upstream, done, is read to its end."""
    events = tokens(["one", " two", "\n" if include else ""], last="stop")
    events[-1]["choices"][0]["stop_reason"] = 201
    upstream = FakeGenerator(events)
    rule = StopRule(("\n",), include_in_output=include, token_ids={201: "\n"})
    answer = orjson.loads((await make_core(upstream).complete(
        stop_call(False, rule, stop_token_ids=[201]), make_embeds(1))).body)
    [choice] = answer["choices"]
    assert choice["text"] == ("one two\n" if include else "one two")
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "\n")
    assert answer["usage"]["completion_tokens"] == 3
    assert upstream.generation.given == len(upstream.generation.events)


async def test_the_gateways_token_id_is_searched_as_its_string(make_core) -> None:
    """The stop token's text takes part in the search as vLLM's would: an earlier listed
    stop string it completes wins."""
    events = tokens(["one", " two", ""], last="stop")
    events[-1]["choices"][0]["stop_reason"] = 201
    rule = StopRule(("two\n", "\n"), token_ids={201: "\n"})
    answer = orjson.loads((await make_core(FakeGenerator(events)).complete(
        stop_call(False, rule, stop_token_ids=[201]), make_embeds(1))).body)
    [choice] = answer["choices"]
    assert (choice["text"], choice["stop_reason"]) == ("one ", "two\n")


async def test_the_gateways_token_id_reads_as_its_string_even_without_its_text(
    make_core,
) -> None:
    """An upstream that leaves the stop token's text out even with
    `include_stop_str_in_output`: the stop is still the string's."""
    events = tokens(["one", ""], last="stop")
    events[-1]["choices"][0]["stop_reason"] = 201
    rule = StopRule(("\n",), include_in_output=True, token_ids={201: "\n"})
    answer = orjson.loads((await make_core(FakeGenerator(events)).complete(
        stop_call(False, rule, stop_token_ids=[201]), make_embeds(1))).body)
    [choice] = answer["choices"]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (
        "one", "stop", "\n")


async def test_a_client_stop_token_id_stays_an_id(make_core) -> None:
    events = tokens(["one", ""], last="stop")
    events[-1]["choices"][0]["stop_reason"] = 7
    rule = StopRule(("\n",), token_ids={201: "\n"})
    answer = orjson.loads((await make_core(FakeGenerator(events)).complete(
        stop_call(False, rule, stop_token_ids=[7, 201]), make_embeds(1))).body)
    assert answer["choices"][0]["stop_reason"] == 7


# --------------------------------------------------------------------------- chat, errors


async def test_chat_answers_are_cut(make_core) -> None:
    chat = ChatShape()
    reply = await make_core(FakeGenerator(tokens(TOKENS))).complete(
        stop_call(chat=chat), make_embeds(2))
    answer = orjson.loads(reply.body)
    [choice] = answer["choices"]
    assert answer["object"] == "chat.completion"
    assert choice["message"]["content"] == CUT
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "is P")
    assert answer["usage"]["completion_tokens"] == 5

    _, events = await collect(make_core(FakeGenerator(tokens(TOKENS))),
                              stop_call(True, chat=chat), make_embeds(2))
    chunks = [event_payload(event)["choices"][0] for event in events[:-1]]
    assert "".join(c["delta"].get("content") or "" for c in chunks) == CUT
    assert (chunks[-1]["finish_reason"], chunks[-1]["stop_reason"]) == ("stop", "is P")


async def test_an_upstream_error_event_is_the_whole_answers_error(make_core) -> None:
    error = {"error": {"message": "engine died", "type": "InternalServerError",
                       "param": None, "code": 500}}
    reply = await make_core(FakeGenerator([chunk_event("a"), error])).complete(
        stop_call(), make_embeds(1))
    assert reply.status == 502
    assert "engine died" in orjson.loads(reply.body)["error"]["message"]
