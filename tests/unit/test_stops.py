"""The gateway's stop-string detector (`upstream.stops`), step by step, by vLLM's rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serve_app.upstream.stops import ChoiceText, StopRule, find_stop, one_token_id


def run(rule: StopRule, steps: list[str]) -> tuple[list[str], str | None, int]:
    """Feed one token's text per step until a stop: the pieces given out (the rest once the
    steps run out, as when the upstream finishes the choice), the stop string, the tokens
    counted."""
    text = ChoiceText(rule)
    pieces = []
    for step in steps:
        pieces.append(text.step(step, 1))
        if text.stop is not None:
            return pieces, text.stop, text.tokens
    pieces.append(text.rest())
    return pieces, None, text.tokens


def rule(*strings: str, include: bool = False, min_tokens: int = 0) -> StopRule:
    return StopRule(strings, include_in_output=include, min_tokens=min_tokens)


# --------------------------------------------------------------------------- hold-back


def test_a_stop_split_across_steps_is_never_given_out_in_part() -> None:
    pieces, stop, tokens = run(rule("END"), ["The ", "answer", " E", "N", "D and more"])
    assert stop == "END" and tokens == 5
    assert "".join(pieces) == "The answer "
    # Held back: the last len("END") - 1 characters until they cannot start the stop.
    assert pieces == ["Th", "e answ", "er", " ", ""]
    assert not any(part in piece for piece in pieces for part in ("E", "EN"))


def test_a_false_start_is_given_out_once_it_cannot_be_a_stop() -> None:
    pieces, stop, _ = run(rule("END"), ["ab", "E", "N", "x", "yz"])
    assert stop is None
    assert "".join(pieces) == "abENxyz"
    assert pieces[-1] == "yz"  # the held-back tail comes out when the choice ends


def test_the_text_after_a_stop_in_the_same_step_is_dropped() -> None:
    pieces, stop, tokens = run(rule("\n"), ["one", " two\nthree", "four"])
    assert (pieces, stop, tokens) == (["one", " two"], "\n", 2)


def test_a_stop_that_is_the_whole_first_step_leaves_no_text() -> None:
    assert run(rule("x"), ["x", "y"]) == ([""], "x", 1)


# --------------------------------------------------------------------------- several stops


def test_the_first_stop_in_the_request_order_wins_within_a_step() -> None:
    """vLLM's `check_stop_strings` tries the strings in order and takes the first found,
    not the earliest in the text."""
    assert run(rule("b", "a"), ["xab"]) == (["xa"], "b", 1)
    assert run(rule("a", "b"), ["xab"]) == (["x"], "a", 1)


def test_an_earlier_step_stops_before_a_later_listed_stop() -> None:
    assert run(rule("zz", "a"), ["a", "zz"]) == ([""], "a", 1)


def test_overlapping_stops() -> None:
    # "bcd" completes first, one step before "abcde" would.
    assert run(rule("abcde", "bcd"), ["a", "b", "c", "d", "e"]) == (
        ["", "", "", "a"], "bcd", 4)
    # A stop overlapping an earlier false start of itself.
    pieces, stop, _ = run(rule("aab"), ["a", "a", "a", "b"])
    assert (pieces, stop) == (["", "", "a", ""], "aab")


def test_only_matches_ending_in_the_new_text_count() -> None:
    """vLLM searches from `len(stop) - 1` characters before the new text, so a match that
    ended in text already checked is not found again."""
    text = "say stop then go"
    assert find_stop(text, 3, rule("stop")) is None
    assert find_stop(text, len(text) - 7, rule("stop")) == ("stop", 4)
    assert find_stop(text, 0, rule("stop")) is None


# --------------------------------------------------------------------------- characters


def test_multi_byte_characters_count_as_one_each() -> None:
    pieces, stop, tokens = run(rule("日本"), ["東京は", "日", "本の首都"])
    assert (pieces, stop, tokens) == (["東京", "は", ""], "日本", 3)
    pieces, stop, _ = run(rule("🙂!"), ["a🙂", "🙂", "!"])
    assert ("".join(pieces), stop) == ("a🙂", "🙂!")


# --------------------------------------------------------------------------- options


def test_include_stop_str_in_output_keeps_the_stop_and_holds_nothing_back() -> None:
    pieces, stop, tokens = run(rule("END", include=True), ["ab", "cE", "ND tail", "more"])
    assert (pieces, stop, tokens) == (["ab", "cE", "ND"], "END", 3)


def test_min_tokens_steps_are_not_searched() -> None:
    """vLLM checks stop strings only past `min_tokens` tokens, and only in the text of those
    tokens (with its `len(stop) - 1` characters before)."""
    assert run(rule("a", min_tokens=2), ["a", "b", "c"]) == (["a", "b", "c", ""], None, 3)
    # A match ending past min_tokens counts even when it starts in their text.
    assert run(rule("ab", min_tokens=1), ["a", "b", "c"]) == (["", ""], "ab", 2)
    assert run(rule("b", min_tokens=1), ["a", "b"]) == (["a", ""], "b", 2)


def test_tokens_per_step_are_counted() -> None:
    text = ChoiceText(rule("z"))
    text.step("ab", 2)
    text.step("cz", 3)
    assert (text.tokens, text.stop, text.text) == (5, "z", "abc")


def test_holdback() -> None:
    assert rule("a", "abcd").holdback == 3
    assert rule("a").holdback == 0
    assert rule("abcd", include=True).holdback == 0


# --------------------------------------------------------------------------- one token


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


def test_one_token_ids(tokenizer: Any) -> None:
    newline = tokenizer.convert_tokens_to_ids("Ċ")  # the byte-level token for "\n"
    assert one_token_id(tokenizer, "\n", skip_special_tokens=True) == newline
    assert one_token_id(tokenizer, ".", skip_special_tokens=True) == tokenizer.encode(
        ".", add_special_tokens=False)[0]
    assert one_token_id(tokenizer, "ab", skip_special_tokens=True) is None
    assert one_token_id(tokenizer, "é", skip_special_tokens=True) is None  # two bytes
    # A special token's text is not in the output vLLM matches stop strings against,
    # unless the request keeps special tokens.
    assert one_token_id(tokenizer, "</s>", skip_special_tokens=True) is None
    assert one_token_id(tokenizer, "</s>", skip_special_tokens=False) == (
        tokenizer.eos_token_id)
