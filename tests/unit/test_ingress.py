"""Completions through the whole gateway in one process (fixtures in conftest.py)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pybase64
import pytest
import torch

from serve_app.config import EmbeddingModelConfig
from tests.unit.gateway_client import (
    CANARY,
    FRANCE,
    GREEDY,
    JAPAN,
    MODEL,
    GatewayFactory,
    RecordingASGITransport,
    error_of,
    ok,
    post,
    texts,
)

# --------------------------------------------------------------------------- small routes


async def test_models_lists_served_name(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == [MODEL, "serve-app-demo-embed"]
    assert body["data"][0]["object"] == "model"
    assert body["data"][0]["max_model_len"] == 512
    assert body["data"][1]["max_model_len"] == 128


@pytest.mark.parametrize("model", [MODEL, "serve-app-demo-embed"])
async def test_one_model_is_retrieved_as_the_sdk_asks(
    gateway: httpx.AsyncClient, model: str,
) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="EMPTY",
                                http_client=gateway, max_retries=0)
    card = await client.models.retrieve(model)
    assert card.id == model and card.object == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"


async def test_health(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    privacy = await gateway.get("/health/privacy")
    assert privacy.json() == {"transform": {"kind": "none", "apply_to_client_embeds": False},
                              "tenant": "shared"}


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


EMBED_MODEL = "serve-app-demo-embed"


@pytest.mark.parametrize(("path", "body", "serves"), [
    ("/v1/completions", {"model": EMBED_MODEL, "prompt": FRANCE, "max_tokens": 4},
     "embeddings"),
    ("/v1/chat/completions", {"model": EMBED_MODEL, "max_tokens": 4,
                              "messages": [{"role": "user", "content": FRANCE}]},
     "embeddings"),
    ("/v1/embeddings", {"model": MODEL, "input": FRANCE}, "completions"),
    ("/v2/embed", {"model": MODEL, "texts": [FRANCE], "embedding_types": ["float"],
                   "input_type": "classification"}, "completions"),
])
async def test_a_model_asked_on_the_other_api_exists_there(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, path: str,
    body: dict[str, Any], serves: str
) -> None:
    """Both models are listed: asking one on the other's API is a 400 that says where it
    is served, not a 404 saying it does not exist."""
    gateway = make_gateway(recorder, embedding_models=[EmbeddingModelConfig()])
    error = error_of(await gateway.post(path, json=body), 400)
    assert (error["code"], error["param"], error["type"]) == (
        "model_not_supported", "model", "BadRequestError")
    assert f"`{body['model']}` serves {serves} only" in error["message"]
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
    error_of(await gateway.post("/v1/completions", content=b"[1, 2]",
                                headers={"content-type": "application/json"}), 400)


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
    # The gateway forwards `echo`; the reference upstream refuses it with embeddings.
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


@pytest.mark.parametrize("stop", [None, ["x"]], ids=["no-stop", "gateway-stop"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_stream_options_without_stream_is_refused_as_vllm_refuses_it(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, path: str,
    stop: list[str] | None,
) -> None:
    """vLLM 0.26.0 and OpenAI answer it with a 400; forwarded, it would be vLLM's 400, or
    taken silently where the gateway streams from the upstream to apply the stops."""
    prompt: dict[str, Any] = ({"prompt": FRANCE} if path == "/v1/completions" else
                              {"messages": [{"role": "user", "content": FRANCE}]})
    response = await post(gateway, path, **prompt, stop=stop,
                          stream_options={"include_usage": True}, **GREEDY)
    error = error_of(response, 400)
    assert error["param"] == "stream_options" and "stream is true" in error["message"]
    assert recorder.bodies == []
    empty = await post(gateway, path, **prompt, stop=stop, stream_options={}, **GREEDY)
    assert empty.status_code == 200, empty.text  # vLLM takes an empty object too


async def test_user_field_is_not_forwarded(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport
) -> None:
    await ok(gateway, prompt=FRANCE, user=CANARY, **GREEDY)
    assert len(recorder.bodies) == 1
    assert CANARY.encode() not in recorder.bodies[0]
    assert "user" not in orjson.loads(recorder.bodies[0])


async def test_completions_keep_vllm_special_tokens_unless_configured(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport,
) -> None:
    from serve_app.config import TokenizationConfig

    default = make_gateway(recorder)
    as_text = make_gateway(recorder,
                           tokenization=TokenizationConfig(completion_special_tokens="text"))
    parsed = (await ok(default, prompt="a</s>b", **GREEDY))["usage"]["prompt_tokens"]
    split = (await ok(as_text, prompt="a</s>b", **GREEDY))["usage"]["prompt_tokens"]
    assert (parsed, split) == (1 + 3, 1 + 6)  # BOS, then a </s> b or a < / s > b


async def test_add_special_tokens_false_leaves_out_the_bos(gateway: httpx.AsyncClient) -> None:
    with_bos = (await ok(gateway, prompt="ab", **GREEDY))["usage"]["prompt_tokens"]
    without = (await ok(gateway, prompt="ab", add_special_tokens=False,
                        **GREEDY))["usage"]["prompt_tokens"]
    assert (with_bos, without) == (3, 2)
