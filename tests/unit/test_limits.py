"""Request limits: each refusal is OpenAI-shaped, names its limit, and nothing goes upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from serve_app.config import LimitsConfig
from tests.unit.gateway_client import (
    FRANCE,
    GREEDY,
    GatewayFactory,
    RecordingASGITransport,
    error_of,
)

LIMITS = LimitsConfig(max_body_bytes=4096, max_items=3, max_n=2, max_tokens=8)
CHAT = [{"role": "user", "content": FRANCE}]


@pytest.fixture
def limited(make_gateway: GatewayFactory, recorder: RecordingASGITransport) -> httpx.AsyncClient:
    return make_gateway(recorder, limits=LIMITS)


async def test_declared_body_over_the_cap_is_413_unread(
    limited: httpx.AsyncClient, recorder: RecordingASGITransport
) -> None:
    body = {"model": "serve-app-demo", "prompt": "x" * 5000, **GREEDY}
    error = error_of(await limited.post("/v1/completions", json=body), 413)
    assert error["code"] == "request_too_large" and "4096" in error["message"]
    assert recorder.bodies == []


async def test_streamed_body_over_the_cap_is_413(limited: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "serve-app-demo", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000  # no content-length: the cap is enforced as bytes arrive
        yield b'"}'

    response = await limited.post("/v1/completions", content=chunks(),
                                  headers={"content-type": "application/json"})
    error_of(response, 413)


async def test_body_under_the_cap_passes(limited: httpx.AsyncClient) -> None:
    body = {"model": "serve-app-demo", "prompt": FRANCE, **GREEDY}
    body["max_tokens"] = 8
    assert (await limited.post("/v1/completions", json=body)).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": [FRANCE] * 4}, "prompt"),
        ("/v1/completions", {"prompt": FRANCE, "n": 3}, "n"),
        ("/v1/completions", {"prompt": FRANCE, "max_tokens": 9}, "max_tokens"),
        ("/v1/chat/completions", {"messages": CHAT * 4}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}] * 4}]}, "messages"),
        ("/v1/chat/completions", {"messages": CHAT, "n": 3}, "n"),
        ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 9}, "max_tokens"),
        ("/v1/embeddings", {"model": "serve-app-demo-embed", "input": ["a"] * 4}, "input"),
        ("/v2/embed", {"model": "serve-app-demo-embed", "texts": ["a"] * 4}, "texts"),
    ],
)
async def test_each_limit_is_a_400_naming_it(
    limited: httpx.AsyncClient, recorder: RecordingASGITransport, path: str,
    body: dict[str, Any], param: str,
) -> None:
    body.setdefault("model", "serve-app-demo")
    error = error_of(await limited.post(path, json=body), 400)
    assert error["param"] == param
    assert any(str(v) in error["message"] for v in (3, 2, 8))
    assert recorder.bodies == []


async def test_at_the_limits_requests_pass(limited: httpx.AsyncClient) -> None:
    body = {"model": "serve-app-demo", "prompt": [FRANCE] * 3, "n": 2, "max_tokens": 8,
            "temperature": 0}
    response = await limited.post("/v1/completions", json=body)
    assert response.status_code == 200 and len(response.json()["choices"]) == 6


class SlowTransport(httpx.AsyncBaseTransport):
    """The reference upstream, answering completions only once `release` is set (its
    health probes pass at once: the gateway is ready)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.arrived.set()
            await self.release.wait()
        return await self.inner.handle_async_request(request)


async def test_concurrency_beyond_the_limit_is_an_openai_429(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport
) -> None:
    slow = SlowTransport(recorder)
    gateway = make_gateway(slow, limits=LimitsConfig(max_concurrent_requests=1))
    body = {"model": "serve-app-demo", "prompt": FRANCE, **GREEDY}
    first = asyncio.ensure_future(gateway.post("/v1/completions", json=body))
    await asyncio.wait_for(slow.arrived.wait(), 30)  # the first holds the only slot
    turned_away = await gateway.post("/v1/completions", json=body)
    error = error_of(turned_away, 429)
    assert error["code"] == "overloaded" and turned_away.headers["retry-after"] == "1"
    assert (await gateway.get("/health")).status_code == 200  # not an API route
    slow.release.set()
    assert (await first).status_code == 200
    assert (await gateway.post("/v1/completions", json=body)).status_code == 200  # slot freed


@pytest.mark.parametrize("prefix", ["", "/gw"])
async def test_concurrency_limit_holds_under_a_route_prefix(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, prefix: str
) -> None:
    slow = SlowTransport(recorder)
    gateway = make_gateway(slow, limits=LimitsConfig(max_concurrent_requests=1),
                           root_path=prefix)
    body = {"model": "serve-app-demo", "prompt": FRANCE, **GREEDY}
    first = asyncio.ensure_future(gateway.post(prefix + "/v1/completions", json=body))
    await asyncio.wait_for(slow.arrived.wait(), 30)
    error_of(await gateway.get(prefix + "/v1/models"), 429)  # every guarded route counts
    assert (await gateway.get(prefix + "/health")).status_code == 200
    slow.release.set()
    assert (await first).status_code == 200


# --------------------------------------------------------------------------- the body


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings",
                                  "/v2/embed"])
async def test_a_body_must_be_declared_json(
    limited: httpx.AsyncClient, recorder: RecordingASGITransport, path: str,
    content_type: str | None,
) -> None:
    # What a browser may post cross-origin without a preflight: never parsed.
    body = orjson.dumps({"model": "serve-app-demo", "prompt": FRANCE, "messages": CHAT})
    headers = {"content-type": content_type} if content_type else {}
    response = await limited.post(path, content=body, headers=headers)
    assert error_of(response, 415)["code"] == "unsupported_media_type"
    assert recorder.bodies == []


async def test_json_with_a_charset_is_json(limited: httpx.AsyncClient) -> None:
    body = orjson.dumps({"model": "serve-app-demo", "prompt": FRANCE, **GREEDY, "max_tokens": 8})
    response = await limited.post("/v1/completions", content=body,
                                  headers={"content-type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 200, response.text


async def trickle(prefix: bytes, gap_s: float, pieces: int = 1000) -> AsyncIterator[bytes]:
    """A body that arrives a byte every `gap_s` seconds: a slow or hostile client."""
    yield prefix
    for _ in range(pieces):
        await asyncio.sleep(gap_s)
        yield b" "


async def test_a_body_that_does_not_arrive_in_time_is_a_408(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport,
) -> None:
    gateway = make_gateway(recorder, limits=LimitsConfig(body_timeout_s=0.5))
    started = asyncio.get_running_loop().time()
    response = await gateway.post("/v1/completions", content=trickle(b'{"model": ', 0.1),
                                  headers={"content-type": "application/json"})
    assert error_of(response, 408)["code"] == "body_timeout"
    assert asyncio.get_running_loop().time() - started < 5
    assert recorder.bodies == []


async def test_clients_still_sending_hold_no_slot(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport,
) -> None:
    gateway = make_gateway(recorder, limits=LimitsConfig(max_concurrent_requests=2,
                                                         body_timeout_s=30))
    tricklers = [asyncio.ensure_future(gateway.post(
        "/v1/completions", content=trickle(b'{"model": "serve-app-demo"', 0.2),
        headers={"content-type": "application/json"})) for _ in range(20)]
    await asyncio.sleep(0.5)  # all twenty are inside the gateway, sending
    body = {"model": "serve-app-demo", "prompt": FRANCE, **GREEDY}
    for _ in range(3):
        assert (await gateway.post("/v1/completions", json=body)).status_code == 200
        assert (await gateway.get("/v1/models")).status_code == 200
    for task in tricklers:
        task.cancel()
    await asyncio.gather(*tricklers, return_exceptions=True)


# --------------------------------------------------------------------------- sampling fields


@pytest.mark.parametrize(
    ("path", "change", "param"),
    [
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"-1": 1}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"5": 1, "262": 1}}, "logit_bias.262"),
        ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias.5"),
        ("/v1/chat/completions", {"logit_bias": {"99999999999": 1}}, "logit_bias"),
        ("/v1/completions", {"stop_token_ids": [1, 300]}, "stop_token_ids.1"),
        ("/v1/chat/completions", {"allowed_token_ids": [300]}, "allowed_token_ids.0"),
        ("/v1/completions", {"allowed_token_ids": [1, "2"]}, "allowed_token_ids.1"),
        ("/v1/completions", {"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
        ("/v1/completions", {"top_k": 10**6}, "top_k"),
        ("/v1/completions", {"cache_salt": "not a salt!"}, "cache_salt"),
        ("/v1/completions", {"n": "2"}, "n"),
        ("/v1/completions", {"n": 2.0}, "n"),
        ("/v1/completions", {"stream": "true"}, "stream"),
        ("/v1/completions", {"temperature": "0"}, "temperature"),
        ("/v1/completions", {"seed": 2**64}, "seed"),
    ],
)
async def test_sampling_fields_are_typed_and_bounded(
    limited: httpx.AsyncClient, recorder: RecordingASGITransport, path: str,
    change: dict[str, Any], param: str,
) -> None:
    base = {"prompt": FRANCE} if path == "/v1/completions" else {"messages": CHAT}
    body = {"model": "serve-app-demo", **base, "max_tokens": 8, **change}
    assert error_of(await limited.post(path, json=body), 400)["param"] == param
    assert recorder.bodies == []


@pytest.mark.parametrize("prompt", [["7"], [[1, "7"]], [1, True], [[True]], [1.0, 2], [[1.5]],
                                    [-1], [[3, -2]], [[1], "a"], [None]])
async def test_token_ids_are_strict_integers(
    limited: httpx.AsyncClient, recorder: RecordingASGITransport, prompt: list[Any],
) -> None:
    if prompt == ["7"]:  # a list of strings is a list of text prompts, as in OpenAI's API
        body = {"model": "serve-app-demo", "prompt": prompt, "max_tokens": 8}
        assert (await limited.post("/v1/completions", json=body)).status_code == 200
        return
    for path, field in (("/v1/completions", "prompt"), ("/v1/embeddings", "input")):
        model = "serve-app-demo" if field == "prompt" else "serve-app-demo-embed"
        error = error_of(await limited.post(path, json={"model": model, field: prompt}), 400)
        assert error["param"] == field
        assert "token ids (non-negative integers)" in error["message"], error
    assert recorder.bodies == []
