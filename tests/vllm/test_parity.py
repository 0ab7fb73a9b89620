"""The gateway in front of a real vLLM answers as vLLM answers the same text.

The gateway tokenizes, templates and embeds the text and sends only the rows; vLLM, asked
directly, embeds the same tokens itself. Both reach the same bf16 rows, so every answer here
must match token for token, logprobs within bf16 rounding, choice for choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.vllm.answers import (
    MODEL,
    assert_same_chat,
    assert_same_completion,
    join_chat,
    join_completion,
    sdk_options,
    stop_reason,
)
from tests.vllm.server import MAX_MODEL_LEN, TIER, VllmServer

pytestmark = TIER

PROMPTS = ["What is the capital of France?", "Tell me about Japan.",
           "The capital of Italy is"]
CHATS = [
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Tell me about Japan."}],
]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 24}
SAMPLED: dict[str, Any] = {"temperature": 0.9, "seed": 1234, "max_tokens": 16}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_vllms(prompt: str, gateway: openai.OpenAI,
                                        vllm: openai.OpenAI) -> None:
    expected = vllm.completions.create(model=MODEL, prompt=prompt, logprobs=3, **GREEDY)
    got = gateway.completions.create(model=MODEL, prompt=prompt, logprobs=3, **GREEDY)
    assert expected.choices[0].text
    assert_same_completion(got, expected)


@pytest.mark.parametrize("messages", CHATS, ids=["system+user", "user"])
def test_greedy_chat_equals_vllms(messages: list[dict[str, str]], gateway: openai.OpenAI,
                                  vllm: openai.OpenAI) -> None:
    options: dict[str, Any] = {"logprobs": True, "top_logprobs": 2, **GREEDY}
    expected = vllm.chat.completions.create(model=MODEL, messages=messages, **options)
    got = gateway.chat.completions.create(model=MODEL, messages=messages, **options)
    assert expected.choices[0].message.content
    assert_same_chat(got, expected)


def test_seeded_chat_logprobs_equal_vllms(gateway: openai.OpenAI, vllm: openai.OpenAI) -> None:
    """Sampled tokens: vLLM lists the sampled token's alternatives as its engine ranks them
    (the sampled token first), which the gateway must keep rather than re-sort."""
    options: dict[str, Any] = {"logprobs": True, "top_logprobs": 2, "n": 2, **SAMPLED}
    expected = vllm.chat.completions.create(model=MODEL, messages=CHATS[1], **options)
    got = gateway.chat.completions.create(model=MODEL, messages=CHATS[1], **options)
    assert_same_chat(got, expected)


def test_streamed_completion_equals_the_whole_answer(gateway: openai.OpenAI,
                                                     vllm: openai.OpenAI) -> None:
    options: dict[str, Any] = {"model": MODEL, "prompt": PROMPTS[0], "n": 2, **SAMPLED}
    whole = gateway.completions.create(**options)
    streamed = join_completion(gateway.completions.create(
        stream=True, stream_options={"include_usage": True}, **options))
    theirs = join_completion(vllm.completions.create(
        stream=True, stream_options={"include_usage": True}, **options))
    assert dict(streamed.texts) == {c.index: c.text for c in whole.choices} == dict(theirs.texts)
    assert streamed.finish == {c.index: c.finish_reason for c in whole.choices} == theirs.finish
    assert streamed.usage.completion_tokens == whole.usage.completion_tokens
    assert streamed.usage.prompt_tokens == whole.usage.prompt_tokens == theirs.usage.prompt_tokens
    assert streamed.chunks > 2  # token by token, not one event holding the whole answer


def test_streamed_chat_equals_the_whole_answer(gateway: openai.OpenAI,
                                               vllm: openai.OpenAI) -> None:
    options: dict[str, Any] = {"model": MODEL, "messages": CHATS[0], **GREEDY}
    whole = gateway.chat.completions.create(**options)
    streamed = join_chat(gateway.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **options))
    theirs = join_chat(vllm.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **options))
    assert streamed.texts[0] == whole.choices[0].message.content == theirs.texts[0]
    assert streamed.finish == {0: whole.choices[0].finish_reason} == theirs.finish
    assert streamed.usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_samples_equal_vllms(gateway: openai.OpenAI, vllm: openai.OpenAI) -> None:
    options: dict[str, Any] = {"model": MODEL, "prompt": PROMPTS[1], "n": 3, "logprobs": 1,
                               **SAMPLED}
    expected = vllm.completions.create(**options)
    assert_same_completion(gateway.completions.create(**options), expected)
    assert len({c.text for c in expected.choices}) > 1  # the samples really are sampled


def test_batched_prompts_answer_in_vllms_order(gateway: openai.OpenAI,
                                               vllm: openai.OpenAI) -> None:
    """Index = prompt index × n + sample index, each choice the answer to its own prompt."""
    options: dict[str, Any] = {"model": MODEL, "prompt": PROMPTS, "n": 2, **SAMPLED}
    expected = vllm.completions.create(**options)
    assert len(expected.choices) == 6
    assert_same_completion(gateway.completions.create(**options), expected)


@pytest.mark.parametrize("include", [False, True], ids=["cut", "included"])
def test_stop_strings_cut_where_vllm_cuts(include: bool, gateway: openai.OpenAI,
                                          vllm: openai.OpenAI) -> None:
    """The gateway applies `stop` itself (vLLM never sees it) and must cut as vLLM does."""
    free = vllm.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=32,
                                   temperature=0).choices[0].text
    at = next(i for i in range(6, len(free) - 2) if free[i:i + 2] not in free[:i + 1])
    options = sdk_options({"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 32,
                           "temperature": 0, "stop": ["\x00never", free[at:at + 2]],
                           "include_stop_str_in_output": include, "logprobs": 1})
    expected = vllm.completions.create(**options)
    assert expected.choices[0].finish_reason == "stop"
    assert stop_reason(expected.choices[0]) == free[at:at + 2]
    assert_same_completion(gateway.completions.create(**options), expected)
    streamed = join_completion(gateway.completions.create(stream=True, **options))
    assert streamed.texts[0] == expected.choices[0].text
    assert streamed.finish == {0: "stop"}


def test_max_tokens_ends_the_answer_as_in_vllm(gateway: openai.OpenAI,
                                              vllm: openai.OpenAI) -> None:
    options = sdk_options({"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 5,
                           "temperature": 0, "ignore_eos": True})
    expected = vllm.completions.create(**options)
    assert expected.choices[0].finish_reason == "length"
    assert expected.usage.completion_tokens == 5
    assert_same_completion(gateway.completions.create(**options), expected)


@pytest.mark.parametrize("key", ["prompt_embeds", "prompt-embeds"])
def test_client_prompt_embeds_answer_as_their_text(key: str, gateway: openai.OpenAI,
                                                   vllm: openai.OpenAI,
                                                   client_embeds: Callable[..., str]) -> None:
    """Float32 rows a client made with transformers: the gateway decodes them, casts them to
    bf16 and sends them on; vLLM answers as it answers their text."""
    expected = vllm.completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=2, **GREEDY)
    got = gateway.completions.create(model=MODEL, prompt="", logprobs=2,
                                     extra_body={key: client_embeds(PROMPTS[0])}, **GREEDY)
    assert_same_completion(got, expected)


def test_embeds_and_text_in_one_request_answer_in_vllms_order(
        gateway: openai.OpenAI, vllm: openai.OpenAI,
        client_embeds: Callable[..., str]) -> None:
    """vLLM answers a request's embeddings first, then its text prompts."""
    options: dict[str, Any] = {"model": MODEL, "prompt": PROMPTS[1:], "logprobs": 1,
                               "extra_body": {"prompt_embeds": [client_embeds(PROMPTS[0])]},
                               **GREEDY}
    expected = vllm.completions.create(**options)
    assert len(expected.choices) == 3
    first = vllm.completions.create(model=MODEL, prompt=PROMPTS[0], **GREEDY)
    assert expected.choices[0].text == first.choices[0].text
    assert_same_completion(gateway.completions.create(**options), expected)


def test_chat_prompt_embeds_part_equals_vllms(gateway: openai.OpenAI, vllm: openai.OpenAI,
                                              client_embeds: Callable[..., str]) -> None:
    """vLLM's `prompt_embeds` content part: the rows stand where the part stands."""
    embeds = client_embeds(" the capital of France?", bos=False)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is"},
        {"type": "prompt_embeds", "data": embeds}]}]
    expected = vllm.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    got = gateway.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert_same_chat(got, expected)


def test_empty_prompt_beside_embeds_is_a_prompt_to_vllm(
        gateway: openai.OpenAI, vllm: openai.OpenAI, vllm_server: VllmServer,
        client_embeds: Callable[..., str]) -> None:
    """A difference the gateway keeps on purpose: `prompt: ""` beside embeddings (NIM's
    convention, and what the OpenAI SDK makes a client send) is no prompt to the gateway,
    while vLLM answers it as a second prompt, the tokenizer's BOS alone."""
    embeds = client_embeds(PROMPTS[0])
    direct = httpx.post(f"{vllm_server.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "", "prompt_embeds": embeds, **GREEDY})
    assert direct.status_code == 200, direct.text
    choices = direct.json()["choices"]
    bos = httpx.post(f"{vllm_server.url}/tokenize", json={"model": MODEL, "prompt": ""},
                     timeout=60).json()["tokens"]
    assert len(bos) == 1
    assert [c["text"] for c in choices] == [
        vllm.completions.create(model=MODEL, prompt=PROMPTS[0], **GREEDY).choices[0].text,
        vllm.completions.create(model=MODEL, prompt=bos, **GREEDY).choices[0].text]
    got = gateway.completions.create(model=MODEL, prompt="",
                                     extra_body={"prompt_embeds": embeds}, **GREEDY)
    assert [c.text for c in got.choices] == [choices[0]["text"]]


def test_chat_without_max_tokens_gets_the_completions_default(
        gateway: openai.OpenAI, vllm: openai.OpenAI) -> None:
    """A difference to decide on: the gateway sends chat as a completion, and a completion
    without `max_tokens` gets vLLM's completions default (16 tokens), where vLLM's own chat
    generates up to the end of the context."""
    options: dict[str, Any] = {"model": MODEL, "messages": CHATS[1], "temperature": 0,
                               "extra_body": {"ignore_eos": True}}
    theirs = vllm.chat.completions.create(**options)
    assert theirs.usage.completion_tokens == MAX_MODEL_LEN - theirs.usage.prompt_tokens
    ours = gateway.chat.completions.create(**options)
    assert (ours.usage.completion_tokens, ours.choices[0].finish_reason) == (16, "length")
