"""The real Serve graph driven by the official OpenAI SDK, sync and async."""

from __future__ import annotations

import asyncio

import openai
import pytest

from serve_app.protocol import CompletionResponse, ModelList
from tests.integration.conftest import client_side_embeds

pytestmark = pytest.mark.integration

PROMPT = "Tell me about France"


def complete(client: openai.OpenAI, model: str, **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("max_tokens", 16)
    kwargs.setdefault("temperature", 0)
    return client.completions.create(model=model, **kwargs)


def test_models_lists_the_served_model(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    ids = [model.id for model in client.models.list()]
    assert ids == [serve_graph.model, "serve-app-demo-embed"]
    ModelList.model_validate(client.models.with_raw_response.list().http_response.json())


def test_text_prompt_completes_from_embeddings(client, serve_graph, demo_tokenizer) -> None:  # type: ignore[no-untyped-def]
    before = len(serve_graph.proxy.bodies)
    raw = client.completions.with_raw_response.create(
        model=serve_graph.model, prompt=PROMPT, max_tokens=16, temperature=0)
    response = CompletionResponse.model_validate(raw.http_response.json())
    assert response.model == serve_graph.model
    assert len(response.choices) == 1
    assert response.choices[0].text.strip()
    assert response.choices[0].finish_reason in {"stop", "length"}
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(demo_tokenizer(PROMPT).input_ids)
    sent = serve_graph.proxy.bodies[before:]
    assert len(sent) == 1 and b'"prompt_embeds":"' in sent[0] and b'"prompt"' not in sent[0]


@pytest.mark.parametrize("spelling", ["prompt_embeds", "prompt-embeds"])
@pytest.mark.parametrize("prompt", ["", None])
def test_client_embeddings_equal_the_text_path(  # type: ignore[no-untyped-def]
    client, serve_graph, demo_tokenizer, demo_causal_lm, spelling, prompt
) -> None:
    text = complete(client, serve_graph.model, prompt=PROMPT)
    b64 = client_side_embeds(demo_tokenizer, demo_causal_lm, PROMPT)
    embedded = complete(client, serve_graph.model, prompt=prompt, extra_body={spelling: b64})
    assert embedded.choices[0].text == text.choices[0].text
    assert embedded.usage.prompt_tokens == text.usage.prompt_tokens


def test_stream_joined_equals_non_stream(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    whole = complete(client, serve_graph.model, prompt=PROMPT, max_tokens=24)
    chunks = list(complete(client, serve_graph.model, prompt=PROMPT, max_tokens=24, stream=True,
                           stream_options={"include_usage": True}))
    assert len(chunks) > 2
    streamed = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert streamed == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert {chunk.model for chunk in chunks} == {serve_graph.model}


def test_invalid_base64_is_a_bad_request(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, serve_graph.model, prompt="", extra_body={"prompt_embeds": "not*base64!"})
    assert caught.value.status_code == 400
    assert "base64" in caught.value.body["message"]


def test_unknown_model_is_not_found(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError):
        complete(client, "no-such-model", prompt=PROMPT)


def test_text_never_reaches_the_upstream(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    canary = "CANARY-7f3a9c-do-not-forward"
    before = len(serve_graph.proxy.bodies)
    complete(client, serve_graph.model, prompt=f"{canary} {PROMPT}", max_tokens=4)
    complete(client, serve_graph.model, prompt=[canary, PROMPT], max_tokens=4)
    list(complete(client, serve_graph.model, prompt=canary, max_tokens=4, stream=True))
    sent = serve_graph.proxy.bodies[before:]
    assert len(sent) == 3
    for body in sent:
        assert canary.encode() not in body
        assert b"prompt_embeds" in body


async def test_concurrent_async_requests_equal_sequential_ones(  # type: ignore[no-untyped-def]
    async_client, serve_graph
) -> None:
    prompts = [f"What is the capital of {c}?" for c in ("France", "Italy", "Japan", "Germany")]

    async def one(prompt: str) -> str:
        response = await async_client.completions.create(
            model=serve_graph.model, prompt=prompt, max_tokens=28, temperature=0)
        return response.choices[0].text

    sequential = [await one(p) for p in prompts]
    concurrent = await asyncio.gather(*(one(p) for p in prompts * 3))
    # Batched rows come back to their own requests: no mix-ups, no cross-talk.
    assert concurrent == sequential * 3
    assert len(set(sequential)) > 1
