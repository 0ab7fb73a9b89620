"""The gateway's stream relay when the pipeline fails after the stream began: the status line
and the first events have gone, so the client gets an OpenAI error event, then `[DONE]`,
then nothing; and the pipeline's events are closed, which ends the upstream request.

The pipeline is a fake whose events fail on cue, as a Dispatcher replica that dies or a
connection between replicas that breaks would make them fail in Serve.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from ray.exceptions import ActorDiedError, RayActorError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import DeploymentUnavailableError

from serve_app.api.app import create_gateway_app
from serve_app.api.served_model import ServedModel
from serve_app.config import AppConfig, ModelConfig
from serve_app.errors import GatewayError
from serve_app.prompts.checkpoint import read_model_spec
from serve_app.prompts.embedder import PromptInput
from serve_app.protocol import ChatCompletionChunk, CompletionStreamResponse
from serve_app.upstream.call import UpstreamCall, UpstreamReply
from tests.unit.gateway_client import CANARY, FRANCE, MODEL

DONE = "data: [DONE]"
COMPLETION_EVENT = b"data: " + CompletionStreamResponse.model_validate({
    "id": "cmpl-1", "created": 1, "model": MODEL,
    "choices": [{"index": 0, "text": "Paris", "logprobs": None, "finish_reason": None}],
}).model_dump_json().encode() + b"\n\n"
CHAT_EVENT = b"data: " + ChatCompletionChunk.model_validate({
    "id": "chatcmpl-1", "created": 1, "model": MODEL, "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
         "finish_reason": None}],
}).model_dump_json(exclude_unset=True).encode() + b"\n\n"


class FailingEvents:
    """An `EventStream` that yields `events`, then raises `error`; it records its closing."""

    def __init__(self, events: list[bytes], error: BaseException) -> None:
        self.events = events
        self.error = error
        self.closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        for event in self.events:
            yield event
        raise self.error

    async def aclose(self) -> None:
        self.closed = True


class FailingPipeline:
    """A `Pipeline` whose streams start (a 200 head) and fail after `events`."""

    def __init__(self, events: list[bytes], error: BaseException) -> None:
        self.events = events
        self.error = error
        self.calls: list[UpstreamCall] = []
        self.streams: list[FailingEvents] = []

    async def complete(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                       tenant: str) -> UpstreamReply:
        raise AssertionError("only streams are asked for here")

    async def open_stream(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                          tenant: str) -> tuple[UpstreamReply, FailingEvents]:
        self.calls.append(call)
        self.streams.append(FailingEvents(self.events, self.error))
        return UpstreamReply(200), self.streams[-1]

    async def upstream_status(self) -> list[dict[str, Any]]:
        return []

    async def upstream_ready(self) -> bool:
        return True


FAILURES = {
    # An unexpected exception: its message may quote the request, so it is never sent.
    "runtime": (RuntimeError(f"failed on {CANARY}"), "InternalServerError"),
    # What a handle raises when the Dispatcher replica it streams from dies.
    "actor-died": (ActorDiedError(), "ServiceUnavailableError"),
    "ray-actor": (RayActorError(), "ServiceUnavailableError"),
    "deployment-unavailable": (DeploymentUnavailableError(DeploymentID("Dispatcher", "gw")),
                               "ServiceUnavailableError"),
    # A failure the pipeline names itself keeps its status and code.
    "gateway-error": (GatewayError("upstream connection lost mid-stream", 502,
                                   code="upstream_error"), "BadGatewayError"),
}


@pytest.fixture(scope="module")
def parts(demo_model_dir: Path, demo_tokenizer: Any) -> tuple[AppConfig, Any, Any]:
    config = AppConfig()
    return config, demo_tokenizer, read_model_spec(demo_model_dir, ModelConfig())


async def stream(parts: tuple[AppConfig, Any, Any], pipeline: FailingPipeline, path: str,
                 **body: Any) -> httpx.Response:
    served = ServedModel(*parts, pipeline)
    transport = httpx.ASGITransport(app=create_gateway_app(served))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.post(path, json={"model": MODEL, "stream": True, **body})


def assert_ends_with_an_error_then_done(response: httpx.Response, sent: list[bytes],
                                        error_type: str | None) -> dict[str, Any]:
    """`sent` as they were, one OpenAI error event, `[DONE]`, and nothing after them."""
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[:len(sent)] == [event.decode().removesuffix("\n\n") for event in sent]
    assert len(blocks) == len(sent) + 3, blocks
    error_block, done, end = blocks[len(sent):]
    assert (done, end) == (DONE, "")
    assert error_block.startswith("data: ")
    body = orjson.loads(error_block.removeprefix("data: "))
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert isinstance(error["message"], str) and error["message"]
    if error_type is not None:
        assert error["type"] == error_type
    assert CANARY not in response.text
    return error


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize(("path", "body", "event"), [
    ("/v1/completions", {"prompt": FRANCE, "max_tokens": 8}, COMPLETION_EVENT),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": FRANCE}]}, CHAT_EVENT),
], ids=["completions", "chat"])
async def test_a_failure_after_the_first_event_ends_with_an_error_then_done(
    parts: tuple[AppConfig, Any, Any], failure: str, path: str, body: dict[str, Any],
    event: bytes,
) -> None:
    exc, error_type = FAILURES[failure]
    pipeline = FailingPipeline([event], exc)
    response = await stream(parts, pipeline, path, **body)
    assert_ends_with_an_error_then_done(response, [event], error_type)
    [call] = pipeline.calls
    assert call.stream and (call.chat is not None) == path.endswith("chat/completions")
    [events] = pipeline.streams
    assert events.closed  # the Dispatcher's stream, and with it the upstream request, ends


async def test_a_failure_before_any_event_still_ends_the_stream(
    parts: tuple[AppConfig, Any, Any],
) -> None:
    """The 200 head has gone before the first event: the same ending, with no events."""
    pipeline = FailingPipeline([], ActorDiedError())
    response = await stream(parts, pipeline, "/v1/completions", prompt=FRANCE)
    assert_ends_with_an_error_then_done(response, [], None)
    assert pipeline.streams[0].closed


async def test_the_error_event_is_the_mapped_error(parts: tuple[AppConfig, Any, Any]) -> None:
    unavailable = DeploymentUnavailableError(DeploymentID("Dispatcher", "gw"))
    response = await stream(parts, FailingPipeline([COMPLETION_EVENT], unavailable),
                            "/v1/completions", prompt=FRANCE)
    error = assert_ends_with_an_error_then_done(response, [COMPLETION_EVENT],
                                                "ServiceUnavailableError")
    assert error["code"] == "unavailable"
    named = GatewayError("upstream timed out mid-stream", 504, code="upstream_timeout")
    response = await stream(parts, FailingPipeline([COMPLETION_EVENT, COMPLETION_EVENT], named),
                            "/v1/completions", prompt=FRANCE)
    error = assert_ends_with_an_error_then_done(response, [COMPLETION_EVENT] * 2,
                                                "GatewayTimeoutError")
    assert (error["message"], error["code"]) == ("upstream timed out mid-stream",
                                                 "upstream_timeout")
