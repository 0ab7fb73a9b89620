"""Every answer the in-process gateway and the reference upstream give, whole or streamed,
success or error, validated against strict copies of the public schemas (`public_schemas`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import openai
import orjson
import pybase64
import pytest
from openai.pagination import SyncPage
from openai.types import chat as sdk_chat
from openai.types import completion_choice, completion_usage, create_embedding_response
from openai.types.chat import chat_completion, chat_completion_chunk, chat_completion_message
from pydantic import BaseModel, ValidationError

from serve_app.config import LimitsConfig, ReferenceConfig
from serve_app.reference.app import create_reference_app
from serve_app.reference.server import ReferenceServer
from tests.unit import public_schemas as public
from tests.unit.gateway_client import FRANCE, MODEL, GatewayFactory, RecordingASGITransport

EMBED = "serve-app-demo-embed"
CHAT = [{"role": "user", "content": FRANCE}]
GREEDY = {"temperature": 0, "max_tokens": 6}

SchemaT = TypeVar("SchemaT", bound=BaseModel)


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> ReferenceServer:
    return ReferenceServer.from_config(ReferenceConfig())


@pytest.fixture(scope="module")
def reference_app(server: ReferenceServer) -> Any:
    """conftest's gateway fixtures reach this app: one model load, and its server to break."""
    return create_reference_app(server)


def valid(schema: type[SchemaT], raw: bytes) -> SchemaT:
    return schema.model_validate_json(raw)


def events(response: httpx.Response) -> list[bytes]:
    """The data of each SSE event before the closing `[DONE]`, which every stream has."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.content.split(b"\n\n")
    assert blocks[-2:] == [b"data: [DONE]", b""], response.text[-300:]
    assert all(block.startswith(b"data: ") for block in blocks[:-2])
    return [block.removeprefix(b"data: ") for block in blocks[:-2]]


def error_body(response: httpx.Response, status: int) -> public.ErrorResponse:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = valid(public.ErrorResponse, response.content)
    assert error.error.message and error.error.type
    return error


def choices_keep_vllm_nulls(raw: bytes) -> None:
    """vLLM writes `logprobs` and `stop_reason` into every choice, null or not."""
    for choice in orjson.loads(raw)["choices"]:
        assert {"logprobs", "stop_reason"} <= set(choice), choice


@pytest.fixture(params=["gateway", "reference"])
def completions_target(request: pytest.FixtureRequest, gateway: httpx.AsyncClient,
                       reference: httpx.AsyncClient, embed: Any) -> tuple[httpx.AsyncClient,
                                                                           dict[str, Any]]:
    """A client for `/v1/completions` and the prompt it takes: text through the gateway,
    the client's own embeddings at the reference upstream."""
    if request.param == "gateway":
        return gateway, {"prompt": FRANCE}
    return reference, {"prompt_embeds": embed(FRANCE)}


# --------------------------------------------------------------------------- completions


@pytest.mark.parametrize("extra", [{}, {"logprobs": 2, "n": 2}, {"logprobs": 0}])
async def test_completion(completions_target: tuple[httpx.AsyncClient, dict[str, Any]],
                          extra: dict[str, Any]) -> None:
    client, prompt = completions_target
    response = await client.post("/v1/completions",
                                 json={"model": MODEL, **prompt, **GREEDY, **extra})
    assert response.status_code == 200, response.text
    answer = valid(public.Completion, response.content)
    choices_keep_vllm_nulls(response.content)
    assert [c.index for c in answer.choices] == list(range(extra.get("n", 1)))
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    for choice in answer.choices:
        assert (choice.logprobs is None) == ("logprobs" not in extra)


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("extra", [{}, {"logprobs": 2, "n": 2}])
async def test_completion_stream(completions_target: tuple[httpx.AsyncClient, dict[str, Any]],
                                 include_usage: bool, extra: dict[str, Any]) -> None:
    client, prompt = completions_target
    response = await client.post("/v1/completions", json={
        "model": MODEL, **prompt, **GREEDY, **extra, "stream": True,
        "stream_options": {"include_usage": include_usage}})
    raw = events(response)
    chunks = [valid(public.CompletionChunk, event) for event in raw]
    if include_usage:
        *chunks, last = chunks
        assert last.choices == [] and last.usage is not None
    assert chunks and all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks)
    for event in raw[:len(chunks)]:
        choices_keep_vllm_nulls(event)
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finished) == list(range(extra.get("n", 1)))


# --------------------------------------------------------------------------- chat


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 2, "n": 2},
                                   {"logprobs": True}])
async def test_chat(gateway: httpx.AsyncClient, extra: dict[str, Any]) -> None:
    response = await gateway.post("/v1/chat/completions",
                                  json={"model": MODEL, "messages": CHAT, **GREEDY, **extra})
    assert response.status_code == 200, response.text
    answer = valid(public.ChatCompletion, response.content)
    assert [c.index for c in answer.choices] == list(range(extra.get("n", 1)))
    for choice in answer.choices:
        assert (choice.logprobs is None) == ("logprobs" not in extra)
        for token in (choice.logprobs.content or []) if choice.logprobs else []:
            assert len(token.top_logprobs) == extra.get("top_logprobs", 0)


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 2, "n": 2}])
async def test_chat_stream(gateway: httpx.AsyncClient, include_usage: bool,
                           extra: dict[str, Any]) -> None:
    response = await gateway.post("/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, **GREEDY, **extra, "stream": True,
        "stream_options": {"include_usage": include_usage}})
    chunks = [valid(public.ChatCompletionChunk, event) for event in events(response)]
    if include_usage:
        *chunks, last = chunks
        assert last.choices == [] and last.usage is not None
    assert chunks and all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks)
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert roles == sorted(finished) == list(range(extra.get("n", 1)))
    if extra:
        assert any(c.choices[0].logprobs for c in chunks)


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("body", [{"input": ["Paris", FRANCE]}, {"input": "Paris"},
                                  {"input": [[1, 5, 2]], "dimensions": 16}])
async def test_openai_embeddings(gateway: httpx.AsyncClient, encoding: str,
                                 body: dict[str, Any]) -> None:
    response = await gateway.post("/v1/embeddings", json={
        "model": EMBED, **body, "encoding_format": encoding})
    assert response.status_code == 200, response.text
    answer = valid(public.CreateEmbeddingResponse, response.content)
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    assert [item.index for item in answer.data] == list(range(len(inputs)))
    for item in answer.data:
        vector = item.embedding
        if encoding == "base64":
            assert isinstance(vector, str)
            vector = np.frombuffer(pybase64.b64decode(vector, validate=True), "<f4").tolist()
        assert isinstance(vector, list) and len(vector) == body.get("dimensions", 32)


@pytest.mark.parametrize("kinds", [["float"], ["int8"], ["uint8"], ["binary"], ["ubinary"],
                                   ["base64"],
                                   ["float", "int8", "uint8", "binary", "ubinary", "base64"]])
async def test_cohere_embed(gateway: httpx.AsyncClient, kinds: list[str]) -> None:
    texts = ["Paris", FRANCE, "Tokyo"]
    response = await gateway.post("/v2/embed", json={
        "model": EMBED, "texts": texts, "input_type": "search_query",
        "embedding_types": kinds})
    assert response.status_code == 200, response.text
    answer = valid(public.EmbedByTypeResponse, response.content)
    assert answer.texts == texts
    sent = orjson.loads(response.content)["embeddings"]
    assert set(sent) == set(kinds)  # only the types asked for, as Cohere answers
    for kind in kinds:
        rows = sent[kind]
        assert len(rows) == len(texts)
        width = {"float": 32, "int8": 32, "uint8": 32, "binary": 4, "ubinary": 4}.get(kind)
        if width is not None:
            assert all(len(row) == width for row in rows)
    assert answer.meta is not None and answer.meta.billed_units is not None
    assert answer.meta.billed_units.input_tokens


# --------------------------------------------------------------------------- models


async def test_models(gateway: httpx.AsyncClient, reference: httpx.AsyncClient) -> None:
    for client in (gateway, reference):
        response = await client.get("/v1/models")
        assert response.status_code == 200
        cards = valid(public.ModelList, response.content).data
        assert MODEL in [card.id for card in cards]
    for name in (MODEL, EMBED):
        response = await gateway.get(f"/v1/models/{name}")
        assert response.status_code == 200
        assert valid(public.Model, response.content).id == name


# --------------------------------------------------------------------------- errors

BAD_REQUESTS = [
    ("/v1/completions", {"model": MODEL, "prompt": FRANCE, "max_tokens": "x"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": FRANCE, "echo": True, "stream": True}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": FRANCE, "no_such_field": 1}, 400),
    ("/v1/completions", {"model": "gpt-4o", "prompt": FRANCE}, 404),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tools": []}, 400),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": CHAT}, 404),
    ("/v1/embeddings", {"model": EMBED, "input": []}, 400),
    ("/v1/embeddings", {"model": EMBED, "input": "x", "dimensions": 12}, 400),
    ("/v1/embeddings", {"model": "nope", "input": "x"}, 404),
    ("/v2/embed", {"model": EMBED, "texts": ["x"], "embedding_types": ["int4"]}, 400),
    ("/v2/embed", {"model": "nope", "texts": ["x"]}, 404),
]


@pytest.mark.parametrize(("path", "body", "status"), BAD_REQUESTS)
async def test_refusals(gateway: httpx.AsyncClient, path: str, body: dict[str, Any],
                        status: int) -> None:
    error_body(await gateway.post(path, json=body), status)


async def test_transport_level_errors(make_gateway: GatewayFactory,
                                      recorder: RecordingASGITransport) -> None:
    gateway = make_gateway(recorder)
    error_body(await gateway.post("/v1/completions", content=b"{not json",
                                  headers={"content-type": "application/json"}), 400)
    error_body(await gateway.get("/v1/nothing-here"), 404)
    error_body(await gateway.get("/v1/models/no-such-model"), 404)
    error_body(await gateway.post("/v1/completions", content=b"{}",
                                  headers={"content-type": "text/plain"}), 415)
    limited = make_gateway(recorder, limits=LimitsConfig(max_body_bytes=1024))
    for path in ("/v1/completions", "/v1/embeddings"):
        error_body(await limited.post(path, json={"model": MODEL, "prompt": "x" * 2000}), 413)
    keyed = make_gateway(recorder, api_keys=("sk-schema-test",))
    error_body(await keyed.get("/v1/models"), 401)
    error_body(await keyed.post("/v1/completions", json={"model": MODEL, "prompt": FRANCE},
                                headers={"authorization": "Bearer wrong"}), 401)


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_unreachable(make_gateway: GatewayFactory, stream: bool) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    gateway = make_gateway(httpx.MockTransport(refuse))
    response = await gateway.post("/v1/completions", json={
        "model": MODEL, "prompt": FRANCE, "stream": stream, **GREEDY})
    error_body(response, 503)


async def test_reference_refusals(reference: httpx.AsyncClient, embed: Any) -> None:
    b64 = embed(FRANCE)
    for body, status in [({"prompt": FRANCE}, 400), ({"prompt_embeds": "QUJD"}, 400),
                         ({"prompt_embeds": b64, "echo": True}, 400),
                         ({"prompt_embeds": b64, "max_tokens": 100_000}, 400),
                         ({"prompt_embeds": b64, "model": "gpt-4o"}, 404)]:
        response = await reference.post("/v1/completions", json={"model": MODEL, **body})
        error_body(response, status)


class WithoutDone(httpx.AsyncBaseTransport):
    """The reference upstream's answers with `[DONE]` cut from each stream: an upstream that
    fails after its first event."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = (await response.aread()).replace(b"data: [DONE]\n\n", b"")
        headers = [(k, v) for k, v in response.headers.items() if k != "content-length"]
        return httpx.Response(response.status_code, headers=headers, content=body)


@pytest.mark.parametrize(("path", "prompt", "chunk_schema"), [
    ("/v1/completions", {"prompt": FRANCE}, public.CompletionChunk),
    ("/v1/chat/completions", {"messages": CHAT}, public.ChatCompletionChunk)])
async def test_error_event_in_a_gateway_stream(
    make_gateway: GatewayFactory, reference_app: Any, path: str, prompt: dict[str, Any],
    chunk_schema: type[BaseModel],
) -> None:
    gateway = make_gateway(WithoutDone(reference_app))
    response = await gateway.post(path, json={"model": MODEL, **prompt, **GREEDY,
                                              "stream": True})
    *chunks, failure = events(response)
    assert chunks and all(valid(chunk_schema, chunk) for chunk in chunks)
    assert valid(public.ErrorResponse, failure).error.message


async def test_error_event_in_a_reference_stream(
    completions_target: tuple[httpx.AsyncClient, dict[str, Any]], server: ReferenceServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reference upstream failing mid-stream, seen directly and relayed by the gateway."""
    client, prompt = completions_target
    generate_one = server.generate_one
    calls = iter(range(100))

    def fails_on_the_second_sample(*args: Any) -> Any:
        if next(calls) == 1:
            raise RuntimeError("the device fell over")
        return generate_one(*args)

    monkeypatch.setattr(server, "generate_one", fails_on_the_second_sample)
    response = await client.post("/v1/completions", json={
        "model": MODEL, **prompt, **GREEDY, "n": 2, "stream": True})
    *chunks, failure = events(response)
    assert chunks and all(valid(public.CompletionChunk, chunk) for chunk in chunks)
    assert valid(public.ErrorResponse, failure).error.code == "internal_error"


# --------------------------------------------------------------------------- the copies

SDK_MODELS: dict[type[public.Strict], type[BaseModel]] = {
    public.CompletionUsage: openai.types.CompletionUsage,
    public.CompletionTokensDetails: completion_usage.CompletionTokensDetails,
    public.PromptTokensDetails: completion_usage.PromptTokensDetails,
    public.CompletionLogprobs: completion_choice.Logprobs,
    public.CompletionChoice: openai.types.CompletionChoice,
    public.Completion: openai.types.Completion,
    # A stream's chunks are `Completion` objects in the SDK.
    public.CompletionChunkChoice: openai.types.CompletionChoice,
    public.CompletionChunk: openai.types.Completion,
    public.TopLogprob: sdk_chat.chat_completion_token_logprob.TopLogprob,
    public.ChatCompletionTokenLogprob: sdk_chat.ChatCompletionTokenLogprob,
    public.ChoiceLogprobs: chat_completion.ChoiceLogprobs,
    public.FunctionCall: chat_completion_message.FunctionCall,
    public.ToolCall: sdk_chat.ChatCompletionMessageFunctionToolCall,
    public.UrlCitation: chat_completion_message.AnnotationURLCitation,
    public.Annotation: chat_completion_message.Annotation,
    public.ChatCompletionAudio: sdk_chat.ChatCompletionAudio,
    public.ChatCompletionMessage: sdk_chat.ChatCompletionMessage,
    public.ChatChoice: chat_completion.Choice,
    public.ChatCompletion: sdk_chat.ChatCompletion,
    public.ChoiceDeltaFunctionCall: chat_completion_chunk.ChoiceDeltaFunctionCall,
    public.ChoiceDeltaToolCall: chat_completion_chunk.ChoiceDeltaToolCall,
    public.ChoiceDelta: chat_completion_chunk.ChoiceDelta,
    public.ChatChunkChoice: chat_completion_chunk.Choice,
    public.ChatCompletionChunk: sdk_chat.ChatCompletionChunk,
    public.Embedding: openai.types.Embedding,
    public.EmbeddingUsage: create_embedding_response.Usage,
    public.CreateEmbeddingResponse: openai.types.CreateEmbeddingResponse,
    public.Model: openai.types.Model,
    public.ModelList: SyncPage,
    public.ErrorObject: openai.types.ErrorObject,
}
# The SDK reads an error body's `error` object itself; the Cohere SDK is no dependency.
NO_SDK_MODEL = {public.ErrorResponse, public.CohereEmbeddings, public.CohereImage,
                public.CohereApiVersion, public.CohereBilledUnits, public.CohereTokens,
                public.CohereMeta, public.EmbedByTypeResponse}


def test_every_copy_is_paired_with_the_sdk_or_says_why_not() -> None:
    copies = {value for value in vars(public).values() if isinstance(value, type)
              and issubclass(value, public.Strict) and value is not public.Strict}
    assert copies == set(SDK_MODELS) | NO_SDK_MODEL


@pytest.mark.parametrize("copy", list(SDK_MODELS), ids=lambda copy: copy.__name__)
def test_copy_declares_only_the_sdks_fields(copy: type[public.Strict]) -> None:
    sdk = SDK_MODELS[copy]
    extras = set(copy.model_fields) - set(sdk.model_fields)
    assert extras == set(public.VLLM_EXTRAS.get(copy, ())), extras
    required_by_sdk = {name for name, field in sdk.model_fields.items() if field.is_required()}
    required_here = {name for name, field in copy.model_fields.items() if field.is_required()}
    assert required_by_sdk <= required_here, required_by_sdk - required_here


def test_the_copies_refuse_a_stray_field() -> None:
    card = {"id": "m", "created": 1, "object": "model", "owned_by": "me"}
    public.Model.model_validate_json(orjson.dumps(card))
    with pytest.raises(ValidationError, match="Extra inputs"):
        public.Model.model_validate_json(orjson.dumps({**card, "root": "m"}))
    with pytest.raises(ValidationError):
        public.ErrorResponse.model_validate_json(b'{"error": {"message": "m", "type": "t"}}')
