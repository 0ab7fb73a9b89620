"""The whole gateway in one process, no Ray: ingress -> embedder core -> dispatcher core ->
reference backend app, every hop through httpx.ASGITransport."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pybase64
import pytest
import torch

from serve_app.config import AppConfig, ModelConfig, ReferenceBackendConfig, UpstreamConfig
from serve_app.dispatcher import DispatcherCore
from serve_app.embedder import EmbedderCore
from serve_app.ingress import CompletionsService, InProcessBackend, create_gateway_app
from serve_app.reference_backend import ReferenceBackend, create_reference_app

MODEL = "serve-app-demo"
UPSTREAM = UpstreamConfig(url="http://ref/v1")
FRANCE = "What is the capital of France?"
JAPAN = "Tell me about Japan."
CANARY = "CANARY-7f3a9-do-not-leak"


class RecordingASGITransport(httpx.ASGITransport):
    """ASGITransport that keeps every request body it sends to the app."""

    def __init__(self, app: Any) -> None:
        super().__init__(app=app)
        self.bodies: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(await request.aread())
        return await super().handle_async_request(request)


@pytest.fixture(scope="module")
def reference_app(cache_dir: Path) -> Any:
    return create_reference_app(ReferenceBackend.from_config(ReferenceBackendConfig()))


@pytest.fixture(scope="module")
def embedder(demo_model_dir: Path) -> EmbedderCore:
    return EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig())


GatewayFactory = Callable[[httpx.AsyncBaseTransport], httpx.AsyncClient]


@pytest.fixture
async def make_gateway(
    embedder: EmbedderCore, cache_dir: Path
) -> AsyncIterator[GatewayFactory]:
    """A gateway client whose dispatcher reaches the upstream through `transport`."""
    closers: list[Any] = []

    def factory(transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
        upstream_client = httpx.AsyncClient(transport=transport, base_url="http://ref")
        dispatcher = DispatcherCore(UPSTREAM, upstream_client)
        service = CompletionsService.from_config(
            AppConfig(upstream=UPSTREAM), InProcessBackend(embedder, dispatcher)
        )
        gateway = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_gateway_app(service)),
            base_url="http://gateway",
        )
        closers.extend([dispatcher.aclose, gateway.aclose])
        return gateway

    yield factory
    for close in closers:
        await close()


@pytest.fixture
def recorder(reference_app: Any) -> RecordingASGITransport:
    return RecordingASGITransport(reference_app)


@pytest.fixture
def gateway(make_gateway: GatewayFactory, recorder: RecordingASGITransport) -> httpx.AsyncClient:
    return make_gateway(recorder)


@pytest.fixture
async def reference(reference_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=reference_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ref") as client:
        yield client


@pytest.fixture(scope="module")
def embed(demo_tokenizer: Any, demo_causal_lm: Any) -> Callable[[str], str]:
    """What a client computes itself: base64 of torch.save of the prompt's embeddings."""

    def compute(text: str) -> str:
        ids = torch.tensor(demo_tokenizer(text).input_ids)
        with torch.no_grad():
            tensor = demo_causal_lm.get_input_embeddings()(ids)
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        return pybase64.b64encode(buffer.getvalue()).decode("ascii")

    return compute


async def post(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("model", MODEL)
    return await client.post("/v1/completions", json=body)


async def ok(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await post(client, **body)
    assert response.status_code == 200, response.text
    return response.json()


async def texts(client: httpx.AsyncClient, **body: Any) -> list[str]:
    return [choice["text"] for choice in (await ok(client, **body))["choices"]]


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


GREEDY = {"temperature": 0, "max_tokens": 16}


# --------------------------------------------------------------------------- small routes


async def test_models_lists_served_name(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model"
    assert body["data"][0]["max_model_len"] == 512


async def test_health(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_unknown_route_is_openai_404(gateway: httpx.AsyncClient) -> None:
    error = error_of(await gateway.get("/v1/nothing-here"), 404)
    assert error["type"] == "NotFoundError"


# --------------------------------------------------------------------------- completions


async def test_text_prompt_equals_reference_on_client_embeddings(
    gateway: httpx.AsyncClient,
    reference: httpx.AsyncClient,
    embed: Callable[[str], str],
    demo_tokenizer: Any,
) -> None:
    via_gateway = await ok(gateway, prompt=FRANCE, **GREEDY)
    direct = await ok(reference, prompt_embeds=embed(FRANCE), **GREEDY)
    assert via_gateway["choices"][0]["text"]
    assert via_gateway["choices"][0]["text"] == direct["choices"][0]["text"]
    assert via_gateway["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"]
    assert via_gateway["model"] == MODEL
    rows = len(demo_tokenizer(FRANCE).input_ids)
    assert via_gateway["usage"] == {
        "prompt_tokens": rows,
        "completion_tokens": 16,
        "total_tokens": rows + 16,
    }


async def test_token_id_prompts(gateway: httpx.AsyncClient, demo_tokenizer: Any) -> None:
    fr_ids = demo_tokenizer(FRANCE).input_ids
    jp_ids = demo_tokenizer(JAPAN).input_ids
    fr_text, jp_text = await texts(gateway, prompt=FRANCE, **GREEDY), await texts(
        gateway, prompt=JAPAN, **GREEDY
    )
    assert fr_text != jp_text
    assert await texts(gateway, prompt=fr_ids, **GREEDY) == fr_text
    assert await texts(gateway, prompt=[fr_ids, jp_ids], **GREEDY) == fr_text + jp_text
    assert await texts(gateway, prompt=[FRANCE, JAPAN], **GREEDY) == fr_text + jp_text
    body = await ok(gateway, prompt=[fr_ids, jp_ids], **GREEDY)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == len(fr_ids) + len(jp_ids)


async def test_client_embeds_both_spellings(
    gateway: httpx.AsyncClient, embed: Callable[[str], str]
) -> None:
    expected = await texts(gateway, prompt=FRANCE, **GREEDY)
    b64 = embed(FRANCE)
    assert await texts(gateway, prompt_embeds=b64, **GREEDY) == expected
    nim = await post(gateway, prompt="", **{"prompt-embeds": b64}, **GREEDY)
    assert nim.status_code == 200, nim.text
    assert [c["text"] for c in nim.json()["choices"]] == expected
    assert await texts(gateway, prompt_embeds=[b64], **GREEDY) == expected


async def test_embeds_choices_come_before_text_choices(
    gateway: httpx.AsyncClient, embed: Callable[[str], str]
) -> None:
    fr = await texts(gateway, prompt=FRANCE, **GREEDY)
    jp = await texts(gateway, prompt=JAPAN, **GREEDY)
    assert fr != jp
    body = await ok(gateway, prompt=FRANCE, prompt_embeds=embed(JAPAN), **GREEDY)
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["text"] for c in choices] == jp + fr
    # n samples per prompt keep that order too: index = prompt_index * n + sample.
    body = await ok(gateway, prompt=[FRANCE], prompt_embeds=embed(JAPAN), n=2, **GREEDY)
    assert [c["text"] for c in body["choices"]] == jp * 2 + fr * 2


async def test_stream_equals_non_stream(gateway: httpx.AsyncClient) -> None:
    full = await ok(gateway, prompt=JAPAN, **GREEDY)
    response = await post(
        gateway, prompt=JAPAN, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    events = [orjson.loads(block.removeprefix("data: ")) for block in blocks[:-2]]
    assert all(event["model"] == MODEL for event in events)
    deltas = "".join(c["text"] for event in events for c in event["choices"])
    assert deltas == full["choices"][0]["text"]
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == full["usage"]


async def test_prompt_text_never_goes_upstream(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, demo_tokenizer: Any
) -> None:
    prompt = f"Tell me about {CANARY} and France."
    await ok(gateway, prompt=prompt, **GREEDY)
    await ok(gateway, prompt=[prompt, JAPAN], **GREEDY)
    response = await post(gateway, prompt=prompt, stream=True, **GREEDY)
    assert response.status_code == 200
    assert len(recorder.bodies) == 3
    for raw in recorder.bodies:
        assert CANARY.encode() not in raw
        assert b"France" not in raw
        body = orjson.loads(raw)
        assert "prompt" not in body
        encoded = body["prompt_embeds"]
        for item in encoded if isinstance(encoded, list) else [encoded]:
            assert CANARY.encode() not in pybase64.b64decode(item, validate=True)
    first = orjson.loads(recorder.bodies[0])
    assert isinstance(first["prompt_embeds"], str)
    assert first["model"] == MODEL
    assert first["temperature"] == 0 and first["max_tokens"] == 16


# --------------------------------------------------------------------------- request errors


async def test_invalid_base64(gateway: httpx.AsyncClient) -> None:
    error = error_of(await post(gateway, prompt_embeds="@@@ not base64 @@@"), 400)
    assert error["param"] == "prompt_embeds"
    assert error["type"] == "BadRequestError"


async def test_unknown_model(gateway: httpx.AsyncClient, recorder: RecordingASGITransport) -> None:
    error = error_of(await post(gateway, model="gpt-4o", prompt=FRANCE), 404)
    assert error["code"] == "model_not_found"
    assert recorder.bodies == []


async def test_no_prompt(gateway: httpx.AsyncClient) -> None:
    error = error_of(await post(gateway, max_tokens=4), 400)
    assert error["param"] == "prompt"
    error_of(await post(gateway, prompt=[], max_tokens=4), 400)
    error_of(await post(gateway, prompt=[[1, 2], []], max_tokens=4), 400)


async def test_token_id_out_of_vocab(gateway: httpx.AsyncClient, demo_causal_lm: Any) -> None:
    vocab = demo_causal_lm.config.vocab_size
    assert (await post(gateway, prompt=[1, 5, vocab - 1], max_tokens=2)).status_code == 200
    for bad_id in (vocab, 10**6, -1):
        error = error_of(await post(gateway, prompt=[1, 5, bad_id]), 400)
        assert error["param"] == "prompt"
        error_of(await post(gateway, prompt=[[1, 5], [bad_id]]), 400)


async def test_context_too_long(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport
) -> None:
    error = error_of(await post(gateway, prompt=[5] * 513), 400)
    assert error["code"] == "context_length_exceeded"
    error = error_of(await post(gateway, prompt="word " * 100, max_tokens=100), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "max_tokens"
    assert recorder.bodies == []


async def test_client_embeds_too_long(gateway: httpx.AsyncClient) -> None:
    buffer = io.BytesIO()
    torch.save(torch.zeros(500, 64), buffer)
    b64 = pybase64.b64encode(buffer.getvalue()).decode()
    error = error_of(await post(gateway, prompt_embeds=b64, max_tokens=20), 400)
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe"])
async def test_malformed_json(gateway: httpx.AsyncClient, raw: bytes) -> None:
    response = await gateway.post(
        "/v1/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert error_of(response, 400)["code"] == "invalid_json"


async def test_body_not_an_object(gateway: httpx.AsyncClient) -> None:
    error_of(await gateway.post("/v1/completions", content=b"[1, 2]"), 400)


async def test_wrong_field_type(gateway: httpx.AsyncClient) -> None:
    error = error_of(await post(gateway, prompt=FRANCE, max_tokens="x"), 400)
    assert error["param"] == "max_tokens"
    assert "max_tokens" in error["message"]


async def test_both_embeds_spellings(
    gateway: httpx.AsyncClient, embed: Callable[[str], str]
) -> None:
    b64 = embed(FRANCE)
    response = await post(gateway, prompt_embeds=b64, **{"prompt-embeds": b64})
    error = error_of(response, 400)
    assert "not both" in error["message"]


async def test_upstream_rejection_is_relayed(gateway: httpx.AsyncClient) -> None:
    # The gateway forwards `echo`; the reference backend refuses it with embeddings.
    error = error_of(await post(gateway, prompt=FRANCE, echo=True), 400)
    assert "not compatible" in error["message"]
    response = await post(gateway, prompt=FRANCE, echo=True, stream=True)
    assert "not compatible" in error_of(response, 400)["message"]


# --------------------------------------------------------------------------- upstream down


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_unreachable(make_gateway: GatewayFactory, stream: bool) -> None:
    attempts: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    gateway = make_gateway(httpx.MockTransport(refuse))
    error = error_of(await post(gateway, prompt=FRANCE, stream=stream, max_tokens=4), 503)
    assert error["type"] == "ServiceUnavailableError"
    assert error["code"] == "upstream_unreachable"
    assert len(attempts) == 1


@pytest.mark.parametrize(
    ("field", "value"), [("echo", True), ("suffix", CANARY), ("prompt_logprobs", 1)]
)
async def test_fields_vllm_refuses_with_embeds_are_refused_before_upstream(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, field: str, value: Any
) -> None:
    response = await post(gateway, prompt=FRANCE, **{field: value}, **GREEDY)
    error = error_of(response, 400)
    assert "not compatible" in error["message"] and error["param"] == field
    assert recorder.bodies == []  # not even the suffix text left the gateway


async def test_user_field_is_not_forwarded(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport
) -> None:
    await ok(gateway, prompt=FRANCE, user=CANARY, **GREEDY)
    assert len(recorder.bodies) == 1
    assert CANARY.encode() not in recorder.bodies[0]
    assert "user" not in orjson.loads(recorder.bodies[0])
