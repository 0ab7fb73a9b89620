"""Bearer keys on the ingress: read from the environment or a file, checked on API routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app import envs
from serve_app.config import AppConfig, LimitsConfig
from tests.unit.gateway_client import (
    FRANCE,
    GREEDY,
    GatewayFactory,
    RecordingASGITransport,
    error_of,
)

KEYS = ("sk-first-key", "sk-second-key")


@pytest.fixture
def guarded(make_gateway: GatewayFactory, recorder: RecordingASGITransport) -> httpx.AsyncClient:
    return make_gateway(recorder, api_keys=KEYS)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


ROUTES = [
    ("POST", "/v1/completions", {"model": "serve-app-demo", "prompt": FRANCE, **GREEDY}),
    ("POST", "/v1/chat/completions",
     {"model": "serve-app-demo", "messages": [{"role": "user", "content": FRANCE}], **GREEDY}),
    ("POST", "/v1/embeddings", {"model": "serve-app-demo-embed", "input": "x"}),
    ("POST", "/v2/embed", {"model": "serve-app-demo-embed", "texts": ["x"]}),
    ("GET", "/v1/models", None),
    ("GET", "/health/upstreams", None),  # it names the backends
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [{}, bearer("sk-wrong"), bearer(""), {"authorization": "Basic " + KEYS[0]},
     {"authorization": KEYS[0]}, bearer(KEYS[0] + "x"), bearer(KEYS[0][:-1])],
)
async def test_missing_or_wrong_key_is_401(
    guarded: httpx.AsyncClient, recorder: RecordingASGITransport, method: str, path: str,
    body: dict[str, object] | None, headers: dict[str, str],
) -> None:
    response = await guarded.request(method, path, json=body, headers=headers)
    error = error_of(response, 401)
    assert error["type"] == "AuthenticationError" and error["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert recorder.bodies == []  # nothing reached the upstream


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize("key", KEYS)
async def test_each_accepted_key_passes(
    guarded: httpx.AsyncClient, method: str, path: str, body: dict[str, object] | None,
    key: str,
) -> None:
    response = await guarded.request(method, path, json=body, headers=bearer(key))
    assert response.status_code == 200, response.text


async def test_health_and_openapi_stay_open(guarded: httpx.AsyncClient) -> None:
    assert (await guarded.get("/health")).status_code == 200
    assert (await guarded.get("/openapi.json")).status_code == 200


async def never_sent(read: list[str]) -> AsyncIterator[bytes]:
    """A body whose first byte never comes; `read` notes that the gateway asked for it."""
    read.append("asked")
    await asyncio.sleep(3600)
    yield b"{}"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"content-type": "application/json", "content-length": str(64 << 20)},
                     id="not-413"),
        pytest.param({"content-type": "text/plain"}, id="not-415"),
        pytest.param({"content-type": "application/json"}, id="not-408"),
    ],
)
async def test_the_key_is_checked_before_the_body_is_read(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, headers: dict[str, str],
) -> None:
    """An anonymous client gets its 401 at once, whatever its body: the gateway neither
    reads a large body first (nor waits for a slow one, the 408) nor judges its type (the
    415), which would make refusing strangers cost a read of up to 64 MiB."""
    guarded = make_gateway(recorder, api_keys=KEYS,
                           limits=LimitsConfig(body_timeout_s=0.2, max_body_bytes=1 << 20))
    read: list[str] = []
    response = await guarded.post("/v1/completions", content=never_sent(read),
                                  headers=headers)
    assert error_of(response, 401)["code"] == "invalid_api_key"
    assert read == []


# --------------------------------------------------------------------------- deny by default

PREFIX = "/gw"
"""Where Serve mounts the app in these tests: it keeps the prefix in the path."""

EVERY_ROUTE = [*ROUTES, ("GET", "/v1/models/serve-app-demo", None)]
WRONG_KEYS = [
    {}, bearer("sk-wrong"), {"authorization": "Basic " + KEYS[0]},
    {"authorization": f"Token {KEYS[0]}"},
    # Two headers are ambiguous, even when one of them holds the key.
    [("authorization", f"Bearer {KEYS[0]}"), ("authorization", "Bearer sk-wrong")],
    [("authorization", f"Bearer {KEYS[0]}"), ("authorization", f"Bearer {KEYS[0]}")],
]


@pytest.fixture
def mounted(make_gateway: GatewayFactory, recorder: RecordingASGITransport) -> httpx.AsyncClient:
    return make_gateway(recorder, api_keys=KEYS, root_path=PREFIX)


@pytest.mark.parametrize(("method", "path", "body"), EVERY_ROUTE)
@pytest.mark.parametrize("headers", WRONG_KEYS)
async def test_under_a_route_prefix_every_route_needs_the_key(
    mounted: httpx.AsyncClient, recorder: RecordingASGITransport, method: str, path: str,
    body: dict[str, object] | None, headers: Any,
) -> None:
    response = await mounted.request(method, PREFIX + path, json=body, headers=headers)
    assert error_of(response, 401)["code"] == "invalid_api_key"
    assert recorder.bodies == []


@pytest.mark.parametrize(("method", "path", "body"), EVERY_ROUTE)
async def test_under_a_route_prefix_the_key_opens_every_route(
    mounted: httpx.AsyncClient, method: str, path: str, body: dict[str, object] | None,
) -> None:
    response = await mounted.request(method, PREFIX + path, json=body, headers=bearer(KEYS[0]))
    assert response.status_code == 200, response.text


async def test_only_health_and_the_openapi_document_are_open(
    mounted: httpx.AsyncClient,
) -> None:
    for path in ("/health", "/openapi.json", "/docs"):
        assert (await mounted.get(PREFIX + path)).status_code == 200, path
    # Anything else is denied before routing, unknown routes and near-misses included.
    for path in ("/no/such/route", "/health/", "/health/upstreams", "/openapi.json/x",
                 "/v3/anything", "//v1/models"):
        error_of(await mounted.get(PREFIX + path), 401)
    error_of(await mounted.get(PREFIX + "/no/such/route", headers=bearer(KEYS[0])), 404)


async def test_no_keys_configured_means_open(gateway: httpx.AsyncClient) -> None:
    assert (await gateway.get("/v1/models")).status_code == 200


async def test_streams_pass_through_the_check(guarded: httpx.AsyncClient) -> None:
    response = await guarded.post("/v1/completions", headers=bearer(KEYS[1]), json={
        "model": "serve-app-demo", "prompt": FRANCE, "stream": True, **GREEDY})
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n")


def test_keys_from_environment_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_KEYS", " sk-a, sk-b,,sk-a,\n")
    key_file = tmp_path / "keys"
    key_file.write_text("sk-c\n\n  sk-d\t\r\n")
    assert envs.api_keys("GATEWAY_KEYS", None) == ("sk-a", "sk-b")
    assert envs.api_keys(None, str(key_file)) == ("sk-c", "sk-d")
    assert envs.api_keys("GATEWAY_KEYS", str(key_file)) == ("sk-a", "sk-b", "sk-c", "sk-d")
    assert envs.api_keys(None, None) == ()


def test_a_named_source_without_keys_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_KEYS", raising=False)
    with pytest.raises(ValueError, match="holds no key"):
        envs.api_keys("GATEWAY_KEYS", None)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="holds no key"):
        envs.api_keys(None, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot be read"):
        envs.api_keys(None, str(tmp_path / "missing"))


def test_comment_lines_in_the_key_file_are_not_keys(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# client keys, rotated by ops\nsk-live\n   # old: sk-gone\n\n")
    assert envs.api_keys(None, str(key_file)) == ("sk-live",)


def test_a_key_file_line_with_inner_whitespace_refuses_to_start(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("sk-first\n# note\nsk-secret-half other-half\n")
    with pytest.raises(ValueError, match="line 3 has whitespace") as refused:
        envs.api_keys(None, str(key_file))
    assert "sk-secret-half" not in str(refused.value)
    assert "other-half" not in str(refused.value)


def test_an_environment_item_with_inner_whitespace_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_KEYS", "sk-a,sk-b sk-c")
    with pytest.raises(ValueError, match="GATEWAY_KEYS: item 2 has whitespace") as refused:
        envs.api_keys("GATEWAY_KEYS", None)
    assert "sk-b" not in str(refused.value)


def test_keys_cannot_be_written_into_the_config() -> None:
    with pytest.raises(ValueError, match="api_keys"):
        AppConfig.model_validate({"auth": {"api_keys": ["sk-in-the-yaml"]}})


async def test_openai_sdk_sees_authentication_error(guarded: httpx.AsyncClient) -> None:
    import openai

    def sdk(key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=key, max_retries=0,
                                  http_client=guarded)

    with pytest.raises(openai.AuthenticationError):
        await sdk("sk-wrong").models.list()
    models = await sdk(KEYS[0]).models.list()
    assert "serve-app-demo" in [m.id for m in models.data]


@pytest.mark.parametrize("status", [200, 401, 500])
async def test_upstream_key_is_sent_but_never_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    import logging

    import torch

    from serve_app.config import BackendConfig, UpstreamConfig
    from serve_app.prompts.codec import encode_prompt_embeds
    from serve_app.upstream.call import UpstreamCall
    from serve_app.upstream.dispatcher import DispatcherCore

    secret = "sk-upstream-secret-5c1e"
    monkeypatch.setenv("UPSTREAM_KEY", secret)
    seen: list[str] = []

    def respond(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(status, json={"error": {"message": "no"}} if status >= 400 else
                              {"choices": [], "usage": {"completion_tokens": 0}})

    config = UpstreamConfig(backends=[BackendConfig(url="http://up/v1",
                                                    api_key_env="UPSTREAM_KEY")])
    core = DispatcherCore(config, httpx.AsyncClient(transport=httpx.MockTransport(respond)))
    caplog.set_level(logging.DEBUG)
    reply = await core.complete(UpstreamCall("m"), [encode_prompt_embeds(torch.ones(2, 4))])
    await core.aclose()
    assert seen == [f"Bearer {secret}"]
    assert secret not in caplog.text and secret.encode() not in reply.body
