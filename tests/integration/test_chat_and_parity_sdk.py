"""Chat completions and completions parity through the official OpenAI SDK, real Serve graph."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from serve_app.protocol import ChatCompletionChunk, ChatCompletionResponse
from tests.integration.conftest import client_side_embeds

pytestmark = pytest.mark.integration

MESSAGES: list[Any] = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 16}
FRANCE = "What is the capital of France?"
JAPAN = "Tell me about Japan."


def templated_ids(tokenizer: Any, messages: list[Any]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True).input_ids)


# --------------------------------------------------------------------------- chat


def test_chat_equals_completions_on_the_templated_embeddings(  # type: ignore[no-untyped-def]
    client, serve_graph, demo_tokenizer, demo_causal_lm
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=serve_graph.model, messages=MESSAGES, **GREEDY)
    ChatCompletionResponse.model_validate(raw.http_response.json())
    answer = raw.parse()
    ids = templated_ids(demo_tokenizer, MESSAGES)
    embeds = client_side_embeds(demo_tokenizer, demo_causal_lm, ids)
    completion = client.completions.create(model=serve_graph.model, prompt="",
                                           extra_body={"prompt_embeds": embeds}, **GREEDY)
    assert answer.object == "chat.completion"
    assert answer.model == serve_graph.model
    [choice] = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content == completion.choices[0].text
    assert choice.finish_reason == completion.choices[0].finish_reason
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(ids) == completion.usage.prompt_tokens
    assert answer.usage.completion_tokens == 16
    assert answer.usage.total_tokens == len(ids) + 16


def test_chat_stream_joins_to_the_message(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    whole = client.chat.completions.create(model=serve_graph.model, messages=MESSAGES,
                                           **GREEDY)
    raw = client.chat.completions.with_raw_response.create(
        model=serve_graph.model, messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}, **GREEDY)
    events = raw.http_response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        ChatCompletionChunk.model_validate_json(event.removeprefix("data: "))
    chunks = list(client.chat.completions.create(
        model=serve_graph.model, messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


async def test_async_chat_stream_and_non_stream(async_client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    whole = await async_client.chat.completions.create(
        model=serve_graph.model, messages=MESSAGES, **GREEDY)
    stream = await async_client.chat.completions.create(
        model=serve_graph.model, messages=MESSAGES, stream=True, **GREEDY)
    content = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert content == whole.choices[0].message.content


def test_chat_prompt_embeds_part(  # type: ignore[no-untyped-def]
    client, serve_graph, demo_tokenizer, demo_causal_lm
) -> None:
    secret = "of France?"
    part = client_side_embeds(demo_tokenizer, demo_causal_lm,
                              demo_tokenizer(secret, add_special_tokens=False).input_ids)
    before = len(serve_graph.proxy.bodies)
    spliced = client.chat.completions.create(model=serve_graph.model, **GREEDY, messages=[
        MESSAGES[0],
        {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                     {"type": "prompt_embeds", "data": part}]},
    ])
    plain = client.chat.completions.create(model=serve_graph.model, **GREEDY, messages=[
        MESSAGES[0], {"role": "user", "content": "What is the capital\n" + secret}])
    assert spliced.choices[0].message.content == plain.choices[0].message.content
    assert spliced.usage == plain.usage
    sent = [orjson.loads(b)["prompt_embeds"] for b in serve_graph.proxy.bodies[before:]]
    assert len(sent) == 2 and sent[0] == sent[1]


def test_chat_n_and_logprobs(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    answer = client.chat.completions.create(model=serve_graph.model, messages=MESSAGES, n=2,
                                            logprobs=True, top_logprobs=2, **GREEDY)
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        tokens = [entry.token for entry in choice.logprobs.content]
        assert "".join(tokens) == choice.message.content
        assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)


@pytest.mark.parametrize(
    "change",
    [
        {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]},
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
        {"max_tokens": 600},
        {"messages": [{"role": "user", "content": [
            {"type": "prompt_embeds", "data": "bm90IGEgdGVuc29y"}]}]},
    ],
)
def test_chat_bad_requests(client, serve_graph, change) -> None:  # type: ignore[no-untyped-def]
    before = len(serve_graph.proxy.bodies)
    body = {"messages": MESSAGES, **GREEDY, **change}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=serve_graph.model, **body)
    assert len(serve_graph.proxy.bodies) == before


# --------------------------------------------------------------------------- completions


def test_two_embeddings_give_two_indexed_choices(  # type: ignore[no-untyped-def]
    client, serve_graph, demo_tokenizer, demo_causal_lm
) -> None:
    embeds = [client_side_embeds(demo_tokenizer, demo_causal_lm, t) for t in (FRANCE, JAPAN)]
    singles = [client.completions.create(model=serve_graph.model, prompt="",
                                         extra_body={"prompt_embeds": e}, **GREEDY)
               for e in embeds]
    both = client.completions.create(model=serve_graph.model, prompt="",
                                     extra_body={"prompt_embeds": embeds}, **GREEDY)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [s.choices[0].text for s in singles]
    assert both.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    chunks = list(client.completions.create(model=serve_graph.model, prompt="", stream=True,
                                            extra_body={"prompt_embeds": embeds}, **GREEDY))
    for index in (0, 1):
        text = "".join(c.choices[0].text for c in chunks if c.choices[0].index == index)
        assert text == both.choices[index].text


def test_mixed_prompts_and_n_order(  # type: ignore[no-untyped-def]
    client, serve_graph, demo_tokenizer, demo_causal_lm
) -> None:
    japan = client_side_embeds(demo_tokenizer, demo_causal_lm, JAPAN)
    fr = client.completions.create(model=serve_graph.model, prompt=FRANCE, **GREEDY)
    jp = client.completions.create(model=serve_graph.model, prompt=JAPAN, **GREEDY)
    mixed = client.completions.create(model=serve_graph.model, prompt=[FRANCE], n=2,
                                      extra_body={"prompt_embeds": [japan]}, **GREEDY)
    # Embeddings' choices first (vLLM), index = prompt index x n + sample index.
    assert [c.index for c in mixed.choices] == [0, 1, 2, 3]
    assert [c.text for c in mixed.choices] == [jp.choices[0].text] * 2 + [fr.choices[0].text] * 2
    assert mixed.usage.prompt_tokens == fr.usage.prompt_tokens + jp.usage.prompt_tokens
    chunks = list(client.completions.create(model=serve_graph.model, prompt=[FRANCE], n=2,
                                            stream=True, extra_body={"prompt_embeds": [japan]},
                                            **GREEDY))
    streamed = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i)
                for i in range(4)}
    assert [streamed[i] for i in range(4)] == [c.text for c in mixed.choices]


def test_sampled_n_with_seed_is_reproducible(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    args: dict[str, Any] = {"model": serve_graph.model, "prompt": FRANCE, "n": 2,
                            "temperature": 1.0, "top_p": 0.9, "seed": 11, "max_tokens": 12}
    first, again = client.completions.create(**args), client.completions.create(**args)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 24


@pytest.mark.parametrize("k", [0, 1])
def test_completion_logprobs_shape(client, serve_graph, k) -> None:  # type: ignore[no-untyped-def]
    answer = client.completions.create(model=serve_graph.model, prompt=FRANCE, logprobs=k,
                                       **GREEDY)
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 16
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(16)]
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert [len(top) for top in logprobs.top_logprobs] == [1] * 16  # greedy: sampled = top 1
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs,
                              strict=True):
        assert top == {token: lp}


@pytest.mark.parametrize(
    "change",
    [
        {"echo": True},
        {"suffix": "and then"},
        {"extra_body": {"prompt_logprobs": 1}},
        {"max_tokens": 600},
        {"prompt": None},
    ],
)
def test_completion_bad_requests(client, serve_graph, change) -> None:  # type: ignore[no-untyped-def]
    before = len(serve_graph.proxy.bodies)
    body: dict[str, Any] = {"prompt": FRANCE, **GREEDY, **change}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=serve_graph.model, **body)
    if "max_tokens" in change:
        assert "512" in caught.value.message and "600" in caught.value.message
    assert len(serve_graph.proxy.bodies) == before


def test_extra_fields_reach_the_upstream(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    before = len(serve_graph.proxy.bodies)
    client.completions.create(model=serve_graph.model, prompt=FRANCE, presence_penalty=0.5,
                              frequency_penalty=0.5, user="someone", stop=["\n"],
                              extra_body={"top_k": 5, "min_tokens": 1}, **GREEDY)
    [sent] = [orjson.loads(b) for b in serve_graph.proxy.bodies[before:]]
    assert sent["top_k"] == 5 and sent["min_tokens"] == 1 and "stop" not in sent
    assert sent["presence_penalty"] == 0.5 and "user" not in sent
