"""Answers of the gateway and of vLLM side by side: one completion or chat, whole or
joined from its stream, and the comparisons the tier makes between them."""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from openai.resources.completions import Completions

from tests.vllm.server import SERVED_NAME

MODEL = SERVED_NAME
_SDK_FIELDS = frozenset(inspect.signature(Completions.create).parameters)


def sdk_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` as `completions.create` takes them: the SDK refuses fields it does not
    know as keywords, so vLLM's own sampling fields travel in `extra_body`."""
    known = {name: value for name, value in options.items() if name in _SDK_FIELDS}
    extra = {name: value for name, value in options.items() if name not in _SDK_FIELDS}
    if extra:
        known["extra_body"] = {**known.get("extra_body", {}), **extra}
    return known


def close(got: float, expected: float) -> bool:
    """Equal within bf16 rounding (8 bits of mantissa), with a floor for values near 0."""
    return math.isclose(got, expected, rel_tol=2**-7, abs_tol=2e-2)


def stop_reason(choice: Any) -> Any:
    """vLLM's `stop_reason`, which the OpenAI SDK keeps as an extra field."""
    return getattr(choice, "stop_reason", None)


@dataclass
class Joined:
    """A streamed answer put back together: each choice's text and finish, and the usage."""

    texts: dict[int, str] = field(default_factory=lambda: defaultdict(str))
    finish: dict[int, str | None] = field(default_factory=dict)
    usage: Any = None
    chunks: int = 0


def join_completion(stream: Iterable[Any]) -> Joined:
    joined = Joined()
    for chunk in stream:
        joined.chunks += 1
        joined.usage = chunk.usage or joined.usage
        for choice in chunk.choices:
            joined.texts[choice.index] += choice.text
            if choice.finish_reason:
                joined.finish[choice.index] = choice.finish_reason
    return joined


def join_chat(stream: Iterable[Any]) -> Joined:
    joined = Joined()
    for chunk in stream:
        joined.chunks += 1
        joined.usage = chunk.usage or joined.usage
        for choice in chunk.choices:
            joined.texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                joined.finish[choice.index] = choice.finish_reason
    return joined


def assert_same_completion(got: Any, expected: Any) -> None:
    """Choice for choice: text, finish and stop reasons, tokens, logprobs within bf16
    rounding, the same top alternatives; and the same usage."""
    assert [c.index for c in got.choices] == [c.index for c in expected.choices]
    for mine, theirs in zip(got.choices, expected.choices, strict=True):
        assert mine.text == theirs.text, (mine.index, mine.text, theirs.text)
        assert mine.finish_reason == theirs.finish_reason
        assert stop_reason(mine) == stop_reason(theirs)
        assert (mine.logprobs is None) == (theirs.logprobs is None)
        if theirs.logprobs is not None:
            assert_same_logprobs(mine.logprobs, theirs.logprobs)
    assert got.usage.prompt_tokens == expected.usage.prompt_tokens
    assert got.usage.completion_tokens == expected.usage.completion_tokens


def assert_same_logprobs(got: Any, expected: Any) -> None:
    assert got.tokens == expected.tokens
    assert got.text_offset == expected.text_offset
    assert all(close(a, b) for a, b in zip(got.token_logprobs, expected.token_logprobs,
                                           strict=True)), (got.token_logprobs,
                                                           expected.token_logprobs)
    for mine, theirs in zip(got.top_logprobs, expected.top_logprobs, strict=True):
        assert set(mine) == set(theirs)
        assert all(close(mine[token], theirs[token]) for token in theirs)


def assert_same_chat(got: Any, expected: Any) -> None:
    assert [c.index for c in got.choices] == [c.index for c in expected.choices]
    for mine, theirs in zip(got.choices, expected.choices, strict=True):
        assert mine.message.content == theirs.message.content
        assert mine.finish_reason == theirs.finish_reason
        assert (mine.logprobs is None) == (theirs.logprobs is None)
        if theirs.logprobs is not None:
            ours, vllms = mine.logprobs.content, theirs.logprobs.content
            assert [t.token for t in ours] == [t.token for t in vllms]
            assert all(close(a.logprob, b.logprob) for a, b in zip(ours, vllms, strict=True))
            for a, b in zip(ours, vllms, strict=True):
                assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
    assert got.usage.prompt_tokens == expected.usage.prompt_tokens
    assert got.usage.completion_tokens == expected.usage.completion_tokens
