"""The real-upstream benchmark's arithmetic (benchmarks/streaming_load.py, vllm_upstream.py),
on recorded timings: where a stream's first token is, what a cell's quantiles and throughput
are, what the gateway adds, and which rows did not do the same work on both paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from streaming_load import Cell, StreamError, Timing, added_latency, timing_of  # noqa: E402
from vllm_upstream import mismatches, rows_of  # noqa: E402

USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}'


def choice(text: str) -> bytes:
    return b'data: {"choices": [{"index": 0, "text": "%s"}]}' % text.encode()


def test_the_first_token_is_the_first_event_with_a_choice_and_counts_come_from_usage() -> None:
    events = [(0.3, b": keep-alive"), (0.4, b""),
              (0.6, b'data: {"choices": [], "usage": null}'),  # no token yet
              (1.0, choice("a")), (1.5, choice("b")), (1.8, choice("c")),
              (2.0, USAGE), (2.1, b"data: [DONE]")]
    timing = timing_of(0.2, events)
    assert timing == Timing(sent=0.2, first=1.0, done=2.1, completion_tokens=3,
                            prompt_tokens=5)
    assert timing.ttft == pytest.approx(0.8)
    assert timing.tpot == pytest.approx((2.1 - 1.0) / 2)


def test_an_error_event_fails_the_request_even_after_tokens() -> None:
    events = [(1.0, choice("a")), (2.0, USAGE),
              (2.5, b'data: {"error": {"message": "upstream went away"}}'),
              (2.6, b"data: [DONE]")]
    with pytest.raises(StreamError, match="upstream went away"):
        timing_of(0.0, events)


def test_a_stream_cut_before_done_or_without_usage_fails() -> None:
    with pytest.raises(StreamError, match="before \\[DONE\\]"):
        timing_of(0.0, [(1.0, choice("a")), (2.0, USAGE)])
    with pytest.raises(StreamError, match="without usage"):
        timing_of(0.0, [(1.0, choice("a")), (2.0, b"data: [DONE]")])


def cell(target: str, ttfts_ms: list[float], tokens: int = 4, prompt: int = 512) -> Cell:
    """Requests sent one second apart, each answered 0.3 s after its first token."""
    timings = [Timing(sent=n, first=n + ms / 1e3, done=n + ms / 1e3 + 0.3,
                      completion_tokens=tokens, prompt_tokens=prompt)
               for n, ms in enumerate(ttfts_ms)]
    return Cell(target, concurrency=1, timings=timings)


def test_a_cells_quantiles_throughput_and_the_gateways_added_latency() -> None:
    direct = cell("direct", [10.0 * n for n in range(1, 11)]).summary()  # 10 ... 100 ms
    gateway = cell("gateway", [10.0 * n + 3 for n in range(1, 11)]).summary()
    assert direct["ttft_p50_ms"] == pytest.approx(55.0)
    assert direct["ttft_p90_ms"] == pytest.approx(91.0)  # interpolated between 90 and 100
    assert direct["tpot_p50_ms"] == pytest.approx(100.0)  # 0.3 s over 3 tokens after the first
    # 40 tokens from the first send (0 s) to the last end (9 + 0.1 + 0.3 s)
    assert direct["output_tokens_per_s"] == pytest.approx(40 / 9.4)
    assert added_latency(direct, gateway) == pytest.approx(
        {"added_p50_ms": 3.0, "added_p90_ms": 3.0})


def test_rows_pair_the_paths_and_name_where_they_did_different_work() -> None:
    context = {"machine": {"gpus": ["GPU 0: H100"], "nproc": 16}, "vllm_version": "0.26.0"}
    same = rows_of([cell("direct", [10.0, 20.0]), cell("gateway", [12.0, 22.0])], context)
    assert [row["concurrency"] for row in same] == [1]
    assert same[0]["machine"]["nproc"] == 16 and same[0]["vllm_version"] == "0.26.0"
    assert mismatches(same, max_tokens=4) == []
    assert mismatches(same, max_tokens=8) == [
        "concurrency 1: completion tokens [4] direct, [4] gateway, asked 8"]
    shorter = rows_of([cell("direct", [10.0]), cell("gateway", [12.0], prompt=511)], context)
    assert mismatches(shorter, max_tokens=4) == [
        "concurrency 1: prompt tokens [512] direct, [511] gateway"]
    assert rows_of([cell("direct", [10.0])], context) == []  # the gateway's cell not run yet
