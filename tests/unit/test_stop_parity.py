"""The gateway applying stop strings answers as the upstream applying them does.

Two gateways in front of one in-process reference upstream (which follows vLLM's stop
rules): one forwards `stop` (`privacy.forward_stop: true`) and lets the reference apply
it; the other keeps it (the default), sends the ids of one-token stops or not
(`privacy.stop_token_ids`), and cuts the reference's stream itself. Every answer must
match: text, finish_reason, stop_reason, usage, logprobs, chunk by chunk when streamed, for
completions and chat.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from serve_app.config import PrivacyConfig
from tests.unit.gateway_client import (
    FRANCE,
    JAPAN,
    GatewayFactory,
    RecordingASGITransport,
    post,
)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "What is the capital of Japan?"}]
MAX_TOKENS = 40


@pytest.fixture
def upstream_bodies(reference_app: Any) -> RecordingASGITransport:
    return RecordingASGITransport(reference_app)


@pytest.fixture
def forwarding(make_gateway: GatewayFactory, reference_app: Any) -> httpx.AsyncClient:
    return make_gateway(RecordingASGITransport(reference_app),
                        privacy=PrivacyConfig(forward_stop=True))


@pytest.fixture(params=[True, False], ids=["token_ids", "no_token_ids"])
def stop_token_ids(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def keeping(make_gateway: GatewayFactory, upstream_bodies: RecordingASGITransport,
            stop_token_ids: bool) -> httpx.AsyncClient:
    return make_gateway(upstream_bodies, privacy=PrivacyConfig(stop_token_ids=stop_token_ids))


def stream_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    blocks = response.text.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    return [orjson.loads(block.removeprefix("data: ")) for block in blocks[:-2]]


def comparable(answer: dict[str, Any], streamed: bool) -> dict[str, Any]:
    """An answer less what differs between any two answers (ids, times). Streamed
    logprobs keep tokens and values: their offsets follow each server's own hold-back."""
    choices = []
    for choice in answer["choices"]:
        choice = dict(choice)
        logprobs = choice.get("logprobs")
        if streamed and isinstance(logprobs, dict) and "text_offset" in logprobs:
            choice["logprobs"] = {k: v for k, v in logprobs.items() if k != "text_offset"}
        choices.append(choice)
    return {"object": answer["object"], "model": answer["model"], "choices": choices,
            "usage": answer.get("usage")}


async def greedy_text(gateway: httpx.AsyncClient, path: str, body: dict[str, Any]) -> str:
    response = await post(gateway, path, **body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return str(choice["text"] if "text" in choice else choice["message"]["content"])


def stop_cases(text: str) -> list[dict[str, Any]]:
    """Stop fields cut from the greedy text: one multi-character stop; several, the later
    listed found first; one new character (one token: its id goes upstream) with a longer
    stop ending on it, each listed first (vLLM takes the first listed of those completing
    in one step); the stop kept in the output; a stop that never appears."""
    assert len(text) >= 24, text
    at = next(i for i in range(8, len(text)) if text[i].isascii() and text[i] not in text[:i])
    char, ending = text[at], text[at - 2 : at + 1]
    return [
        {"stop": text[6:10]},
        {"stop": [text[14:19], text[9:12]]},
        {"stop": [char]},
        {"stop": [char, ending]},
        {"stop": [ending, char]},
        {"stop": text[6:10], "include_stop_str_in_output": True},
        {"stop": [char], "include_stop_str_in_output": True},
        {"stop": ["never-in-the-text"]},
    ]


BODIES = {
    "completions_n": ("/v1/completions", {"prompt": [FRANCE, JAPAN], "n": 2, "logprobs": 1}),
    "chat": (CHAT, {"messages": MESSAGES}),
    "chat_logprobs": (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 1}),
}


@pytest.mark.parametrize("kind", list(BODIES))
async def test_whole_answers_match(forwarding: httpx.AsyncClient, keeping: httpx.AsyncClient,
                                   upstream_bodies: RecordingASGITransport, kind: str,
                                   stop_token_ids: bool) -> None:
    path, base = BODIES[kind]
    base = {**base, "temperature": 0, "max_tokens": MAX_TOKENS}
    reasons = []
    for case in stop_cases(await greedy_text(forwarding, path, base)):
        body = {**base, **case}
        expected = await post(forwarding, path, **body)
        got = await post(keeping, path, **body)
        assert expected.status_code == got.status_code == 200, got.text
        assert comparable(got.json(), False) == comparable(expected.json(), False), case
        reasons.append({(c["finish_reason"], c["stop_reason"]) for c in got.json()["choices"]})
    # Each case but the last stopped its first choice on one of its strings.
    assert all(any(reason[1] for reason in case) for case in reasons[:-1])
    assert reasons[-1] == {("length", None)}
    assert_stops_never_went_upstream(upstream_bodies, stop_token_ids)


@pytest.mark.parametrize("kind", list(BODIES))
@pytest.mark.parametrize("stop_token_ids", [True], ids=["token_ids"])
async def test_streams_match_chunk_by_chunk(
    forwarding: httpx.AsyncClient, keeping: httpx.AsyncClient,
    upstream_bodies: RecordingASGITransport, kind: str, stop_token_ids: bool,
) -> None:
    path, base = BODIES[kind]
    base = {**base, "temperature": 0, "max_tokens": MAX_TOKENS}
    streamed = {"stream": True, "stream_options": {"include_usage": True}}
    for case in stop_cases(await greedy_text(forwarding, path, base)):
        body = {**base, **case, **streamed}
        expected = stream_chunks(await post(forwarding, path, **body))
        got = stream_chunks(await post(keeping, path, **body))
        assert [comparable(c, True) for c in got] == [comparable(c, True) for c in expected], (
            case)
    assert_stops_never_went_upstream(upstream_bodies, stop_token_ids)


def assert_stops_never_went_upstream(bodies: RecordingASGITransport, ids: bool) -> None:
    posts = [orjson.loads(raw) for raw in bodies.bodies if raw]  # not the health probes
    assert posts and all("stop" not in body for body in posts)
    assert any(body.get("stop_token_ids") for body in posts) is ids
