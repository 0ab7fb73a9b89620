"""Every field the gateway forwards, as a real vLLM takes it beside prompt embeddings, and
vLLM's own refusals as the client gets them (docs/upstream-fields.md, docs/api.md).

A forwarded field is accepted when the gateway's answer with it equals vLLM's own answer to
the same text with it: vLLM honoured it on the embeddings exactly as on the text.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from serve_app.config import LimitsConfig, PrivacyConfig
from serve_app.protocol.sampling import FORWARDED, STRUCTURED_OUTPUT_FIELDS
from tests.vllm.answers import (
    MODEL,
    assert_same_chat,
    assert_same_completion,
    join_completion,
    sdk_options,
)
from tests.vllm.fields import PROMPT_BLIND, field_cases
from tests.vllm.gateway import Gateway
from tests.vllm.server import MAX_LOGPROBS, MAX_MODEL_LEN, TIER

pytestmark = TIER

PROMPT = "What is the capital of France?"
BASE: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def token_id(vllm_model_dir: Path) -> Callable[[str], int]:
    """The id of a one-token text (the demo tokenizer is byte-level)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)

    def one(text: str) -> int:
        [only] = tokenizer(text, add_special_tokens=False).input_ids
        return int(only)

    return one


@pytest.mark.parametrize("name", sorted(FORWARDED - set(STRUCTURED_OUTPUT_FIELDS)))
def test_forwarded_field_is_honoured_as_on_text(name: str, gateway: openai.OpenAI,
                                                vllm: openai.OpenAI,
                                                token_id: Callable[[str], int]) -> None:
    options = sdk_options({**BASE, **field_cases(token_id)[name]})
    if options.get("stream"):
        got, expected = (join_completion(client.completions.create(**options))
                         for client in (gateway, vllm))
        assert dict(got.texts) == dict(expected.texts) and got.finish == expected.finish
        if "stream_options" in options:
            assert got.usage.completion_tokens == expected.usage.completion_tokens
        return
    got = gateway.completions.create(**options)
    if name in PROMPT_BLIND:
        assert got.choices[0].finish_reason in ("stop", "length")
        return
    expected = vllm.completions.create(**options)
    assert_same_completion(got, expected)
    if name == "return_tokens_as_token_ids":
        assert all(t.startswith("token_id:") for t in got.choices[0].logprobs.tokens)
    if name == "logit_bias":
        assert set(got.choices[0].text) == {"e"}
    if name == "allowed_token_ids":
        assert set(got.choices[0].text) <= set("ab ")


def test_chat_spellings_are_honoured_as_in_vllms_chat(gateway: openai.OpenAI,
                                                     vllm: openai.OpenAI) -> None:
    options: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_completion_tokens": 6,
                               "logprobs": True, "top_logprobs": 3,
                               "messages": [{"role": "user", "content": PROMPT}]}
    got = gateway.chat.completions.create(**options)
    assert got.usage.completion_tokens == 6
    assert_same_chat(got, vllm.chat.completions.create(**options))


def test_stop_forwarded_by_choice_is_vllms_stop(start_gateway: Callable[..., Gateway],
                                                vllm: openai.OpenAI) -> None:
    """`privacy.forward_stop: true`: vLLM applies the strings itself."""
    forwarding = start_gateway(privacy=PrivacyConfig(forward_stop=True)).client()
    options = {**BASE, "max_tokens": 24, "stop": ["e", "zz"], "logprobs": 1}
    assert_same_completion(forwarding.completions.create(**options),
                           vllm.completions.create(**options))


@pytest.fixture(scope="module")
def structured(start_gateway: Callable[..., Gateway]) -> openai.OpenAI:
    return start_gateway(privacy=PrivacyConfig(forward_structured_outputs=True)).client()


@pytest.mark.parametrize("constraint", [
    {"structured_outputs": {"choice": ["Paris", "Rome"]}},
    {"response_format": {"type": "json_schema", "json_schema": {
        "name": "city", "schema": {"type": "string", "enum": ["Paris", "Rome"]}}}},
], ids=["structured_outputs", "response_format"])
def test_structured_outputs_constrain_the_answer(constraint: dict[str, Any],
                                                 structured: openai.OpenAI,
                                                 vllm: openai.OpenAI) -> None:
    options = {**BASE, "max_tokens": 12, "extra_body": constraint}
    got = structured.completions.create(**options)
    assert got.choices[0].text.strip('"') in ("Paris", "Rome")
    assert_same_completion(got, vllm.completions.create(**options))


@pytest.mark.parametrize("field", ["guided_choice", "guided_regex"])
def test_guided_fields_are_no_longer_read_by_vllm(field: str, structured: openai.OpenAI,
                                                  vllm: openai.OpenAI) -> None:
    """A difference from the fakes: this vLLM has no `guided_*` fields (its
    `structured_outputs` replaced them) and drops unknown fields, so a guided constraint
    the gateway forwards constrains nothing."""
    value: Any = ["zzzz"] if field == "guided_choice" else "zzzz"
    free = vllm.completions.create(**BASE).choices[0].text
    assert free != "zzzz"
    for client in (structured, vllm):
        answer = client.completions.create(**BASE, extra_body={field: value})
        assert answer.choices[0].text == free


# --------------------------------------------------------------------- vLLM's refusals


def test_context_too_long_in_vllm_is_a_400(start_gateway: Callable[..., Gateway]) -> None:
    """A gateway that believes in a longer context than vLLM serves passes the prompt on;
    vLLM's refusal reaches the client as a 400 with vLLM's words."""
    believer = start_gateway(max_model_len=2 * MAX_MODEL_LEN).client()
    prompt = "a" * (MAX_MODEL_LEN + 50)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            believer.completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                        stream=stream)
        assert refused.value.status_code == 400
        assert "maximum context length" in str(refused.value)
        assert f"{MAX_MODEL_LEN}" in str(refused.value)


def test_context_too_long_for_the_gateway_is_refused_there(gateway: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.completions.create(model=MODEL, prompt="a" * (MAX_MODEL_LEN + 50),
                                   max_tokens=4)
    assert refused.value.code == "context_length_exceeded"


def test_logprobs_above_vllms_limit_is_a_400(gateway: openai.OpenAI) -> None:
    """`logprobs` within the gateway's limit but above vLLM's `--max-logprobs`: whole,
    vLLM's refusal is a 400; streamed, vLLM checks it once its stream has begun, so the
    client's stream ends with vLLM's error (or is a 400, were it checked before)."""
    options: dict[str, Any] = {**BASE, "logprobs": MAX_LOGPROBS + 5}
    assert LimitsConfig().max_logprobs >= options["logprobs"]
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.completions.create(**options)
    assert "max allowed" in str(refused.value)
    with pytest.raises(openai.APIError) as failed:
        join_completion(gateway.completions.create(stream=True, **options))
    assert "max allowed" in str(failed.value)


def test_stream_options_without_stream_is_vllms_400(gateway: openai.OpenAI,
                                                    vllm: openai.OpenAI) -> None:
    """vLLM refuses `stream_options` on a request that does not stream (as OpenAI does),
    and so does the gateway, before the request leaves it."""
    for client in (vllm, gateway):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(**BASE, stream_options={"include_usage": True})
        assert "stream" in str(refused.value).lower()


def test_more_prompts_than_vllm_takes_is_vllms_400(gateway: openai.OpenAI) -> None:
    """A difference from the fakes: vLLM takes at most 1,024 prompts a request
    (VLLM_MAX_COMPLETION_PROMPTS), fewer than the gateway's `limits.max_items`, and the
    gateway sends every prompt as one list of embeddings."""
    prompts = [f"q{i}" for i in range(1025)]
    assert LimitsConfig().max_items >= len(prompts)
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.completions.create(model=MODEL, prompt=prompts, max_tokens=1)
    assert "1024" in str(refused.value)
