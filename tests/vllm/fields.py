"""A request for each sampling field the gateway forwards, as the vllm tier sends it to the
gateway and to vLLM (tests/unit/test_vllm_tier.py checks that none is missing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.vllm.server import MAX_LOGPROBS


def field_cases(token_id: Callable[[str], int]) -> dict[str, dict[str, Any]]:
    """For each forwarded sampling field, a request setting it (with what it needs beside)."""
    sampled = {"temperature": 0.8, "seed": 3}
    return {
        "max_tokens": {"max_tokens": 5},
        "temperature": sampled,
        "top_p": {**sampled, "top_p": 0.5},
        "n": {**sampled, "n": 2},
        "seed": {"temperature": 1.0, "seed": 99},
        "presence_penalty": {"presence_penalty": 1.5},
        "frequency_penalty": {"frequency_penalty": 1.5},
        "logit_bias": {"logit_bias": {str(token_id("e")): 100}},
        "logprobs": {"logprobs": MAX_LOGPROBS},
        "stop": {"stop": ["e"]},
        "stream": {"stream": True},
        "stream_options": {"stream": True,
                           "stream_options": {"include_usage": True,
                                              "continuous_usage_stats": True}},
        "top_k": {"temperature": 1.0, "seed": 5, "top_k": 1},
        "min_p": {**sampled, "min_p": 0.2},
        "repetition_penalty": {"repetition_penalty": 1.3},
        "min_tokens": {"min_tokens": 6},
        "stop_token_ids": {"stop_token_ids": [token_id("a")], "max_tokens": 24},
        "allowed_token_ids": {"allowed_token_ids": [token_id(c) for c in "ab "]},
        "ignore_eos": {"ignore_eos": True, "max_tokens": 40},
        "include_stop_str_in_output": {"stop": ["e"], "include_stop_str_in_output": True},
        "skip_special_tokens": {"skip_special_tokens": False},
        "spaces_between_special_tokens": {"spaces_between_special_tokens": False},
        "return_tokens_as_token_ids": {"return_tokens_as_token_ids": True, "logprobs": 1},
        "priority": {"priority": 1},
        "cache_salt": {"cache_salt": "dmxsbS10aWVyLXNhbHQ="},
    }


PROMPT_BLIND = {"repetition_penalty"}
"""vLLM's repetition penalty also counts the prompt's tokens, which prompt embeddings do
not name: accepted, but its answer may differ from the text's."""
