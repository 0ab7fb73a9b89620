"""The dispatcher's fleet against real servers on loopback ports (no Ray): failover, health,
routing by load, timeouts, cancellation, saturation, dialects, in-place reconfiguration and
vLLM's own refusals.

Fake vLLM servers run in their own processes and are slowed, failed, killed and restarted
for real; their logs say which server saw which request, finished it, or saw it cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch

from serve_app.config import (
    BackendConfig,
    HealthConfig,
    ModelConfig,
    RetryConfig,
    UpstreamConfig,
    UpstreamTimeouts,
)
from serve_app.prompts.codec import encode_prompt_embeds
from serve_app.prompts.embedder import EmbedderCore
from serve_app.protocol import SamplingFields
from serve_app.upstream.call import UpstreamCall, UpstreamReply
from serve_app.upstream.dispatcher import DispatcherCore
from tests.upstream_servers import MAX_LOGPROBS, MAX_PROMPTS, ServerProcess

DONE = b"data: [DONE]\n\n"
FAST_HEALTH = HealthConfig(probe_interval_s=0.2, probe_timeout_s=0.5, failure_threshold=2,
                           cooldown_s=0.5, max_cooldown_s=1.0)
EMBEDS = [encode_prompt_embeds(torch.randn(3, 8))]
_tags = itertools.count()

pytestmark = pytest.mark.loopback


@pytest.fixture
async def make_core() -> AsyncIterator[Callable[..., DispatcherCore]]:
    cores: list[DispatcherCore] = []

    def factory(*backends: BackendConfig | ServerProcess, **settings: Any) -> DispatcherCore:
        configs = [b if isinstance(b, BackendConfig) else BackendConfig(url=b.url)
                   for b in backends]
        settings.setdefault("health", FAST_HEALTH)
        core = DispatcherCore.from_config(UpstreamConfig(backends=configs, **settings))
        cores.append(core)
        return core

    yield factory
    for core in cores:
        await core.aclose()


def new_tag(prefix: str) -> str:
    return f"{prefix}-{next(_tags)}"


def call(tag: str, stream: bool = False) -> UpstreamCall:
    return UpstreamCall("serve-app-demo",
                        SamplingFields(max_tokens=4, cache_salt=tag, stream=stream),
                        stream=stream)


async def complete(core: DispatcherCore, tag: str) -> UpstreamReply:
    return await core.complete(call(tag), EMBEDS)


async def stream(core: DispatcherCore, tag: str) -> tuple[UpstreamReply, list[bytes]]:
    items = [item async for item in core.stream(call(tag, stream=True), EMBEDS)]
    head, events = items[0], items[1:]
    assert isinstance(head, UpstreamReply)
    assert all(isinstance(event, bytes) for event in events)
    return head, events  # type: ignore[return-value]


def payloads(events: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(event[len(b"data: "):]) for event in events if event != DONE]


def served_by(reply: UpstreamReply) -> str:
    return str(orjson.loads(reply.body)["choices"][0]["text"])


def assert_clean_error(status: int, body: bytes) -> None:
    assert status in (502, 503, 504), status
    assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}


def backend_status(core: DispatcherCore, server: ServerProcess) -> dict[str, Any]:
    [status] = [row for row in core.status() if row["url"] == server.url]
    return status


async def wait_for_state(core: DispatcherCore, server: ServerProcess, state: str,
                         timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while backend_status(core, server)["state"] != state:
        assert time.monotonic() - start < timeout_s, backend_status(core, server)
        await asyncio.sleep(0.02)
    return time.monotonic() - start


# --------------------------------------------------------------------- failover


async def test_killed_backend_under_load_fails_over_and_answers_once(fakes, make_core) -> None:
    for server in fakes.values():
        server.set_mode(delay_s=0.3, events=10, gap_s=0.05)
    core = make_core(*fakes.values())

    async def one(index: int) -> tuple[str, str]:
        tag = new_tag("kill")
        if index % 2:
            reply = await core.complete(call(tag), EMBEDS)
            if reply.status == 200:
                return tag, "ok"
            assert_clean_error(reply.status, reply.body)
            return tag, "error"
        head, events = await stream(core, tag)
        if head.status != 200:
            assert_clean_error(head.status, head.body)
            return tag, "error"
        assert events[-1] == DONE and events.count(DONE) == 1
        errors = [p for p in payloads(events) if "error" in p]
        if errors:
            assert len(errors) == 1 and "error" in payloads(events)[-1]
            return tag, "error"
        assert payloads(events)[-1]["choices"][0]["finish_reason"] == "length"
        return tag, "ok"

    async def wave(count: int) -> list[tuple[str, str]]:
        tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
        return await asyncio.wait_for(asyncio.gather(*tasks), 30)  # none hangs

    during = asyncio.ensure_future(wave(30))
    await asyncio.sleep(0.5)  # every request has arrived; a's streams are mid-way
    fakes["a"].kill()
    first = await during
    second = await wave(30)

    assert all(outcome == "ok" for _, outcome in second), second
    # Only requests that a had taken on when it died failed; every other one was served.
    on_a = {row["tag"] for row in fakes["a"].events("request", "kill")}
    assert {tag for tag, outcome in first if outcome == "error"} <= on_a
    assert any(outcome == "ok" for _, outcome in first)
    done = Counter(row["tag"] for server in fakes.values()
                   for row in server.events("done", "kill"))
    assert max(done.values()) == 1  # no generation ran to completion twice
    for tag, outcome in first + second:
        assert done[tag] == (1 if outcome == "ok" else 0)
    assert backend_status(core, fakes["a"])["state"] in ("ejected", "half_open")
    assert not any(row["tag"] in dict(second) for row in fakes["a"].events("request"))


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_5xx_before_the_answer_is_retried_elsewhere(fakes, make_core, status) -> None:
    """a is drawn first while it is in the fleet (its weight), so it sees exactly the
    failures that eject it; its cooldown outlasts the test, so it stays out."""
    fakes["a"].set_mode(status=status)
    core = make_core(BackendConfig(url=fakes["a"].url, weight=1000.0), fakes["b"],
                     retry=RetryConfig(max_attempts=2),
                     health=FAST_HEALTH.model_copy(update={"cooldown_s": 60.0,
                                                           "max_cooldown_s": 60.0}))
    tags = [new_tag(f"r{status}") for _ in range(6)]
    replies = [await complete(core, tag) for tag in tags]
    assert [reply.status for reply in replies] == [200] * 6
    assert {served_by(reply) for reply in replies} == {"b"}
    assert len(fakes["b"].events("done", f"r{status}")) == 6
    # a answered its error failure_threshold times, then it was ejected: every retry, and
    # every request after, went to b.
    assert len(fakes["a"].events("request", f"r{status}")) == FAST_HEALTH.failure_threshold


async def test_429_sets_the_backend_aside_for_its_retry_after(fakes, make_core) -> None:
    fakes["a"].set_mode(status=429, retry_after=30)
    core = make_core(fakes["a"], fakes["b"])
    replies = [await complete(core, new_tag("throttle")) for _ in range(8)]
    assert {served_by(reply) for reply in replies} == {"b"}
    assert len(fakes["a"].events("request", "throttle")) == 1
    status = backend_status(core, fakes["a"])
    assert status["state"] == "healthy" and 28 < status["throttled_remaining_s"] <= 30

    alone = make_core(fakes["a"])
    reply = await complete(alone, new_tag("throttle-alone"))
    assert reply.status == 429 and reply.headers["Retry-After"] == "30"
    assert orjson.loads(reply.body)["error"]["code"] == "upstream_rate_limited"


async def test_retries_are_bounded_by_max_attempts(fakes, make_core) -> None:
    for server in fakes.values():
        server.set_mode(status=503)
    core = make_core(*fakes.values(), retry=RetryConfig(max_attempts=2))
    tag = new_tag("bounded")
    reply = await complete(core, tag)
    assert reply.status == 503
    assert sum(len(s.events("request", tag)) for s in fakes.values()) == 2


async def test_no_retry_after_the_first_byte(fakes, make_core) -> None:
    """a dies after one event: the client gets that event, an error event and [DONE];
    b, healthy and idle, never sees the request."""
    fakes["a"].set_mode(events=5, exit_after_events=1)
    core = make_core(BackendConfig(url=fakes["a"].url),
                     BackendConfig(url=fakes["b"].url, weight=1e-6))
    tag = new_tag("midstream")
    head, events = await asyncio.wait_for(stream(core, tag), 10)
    assert head.status == 200
    sent = payloads(events)
    assert sent[0]["choices"][0]["text"] == "a0 "
    assert sent[-1]["error"]["code"] == "upstream_error"
    assert "mid-stream" in sent[-1]["error"]["message"]
    assert events[-1] == DONE and len(events) == 3
    assert fakes["b"].events("request", tag) == []


async def test_connection_lost_before_the_first_token_is_not_retried(fakes, make_core) -> None:
    fakes["a"].set_mode(events=5, exit_after_events=0)
    core = make_core(BackendConfig(url=fakes["a"].url),
                     BackendConfig(url=fakes["b"].url, weight=1e-6))
    tag = new_tag("early-death")
    head, events = await asyncio.wait_for(stream(core, tag), 10)
    assert events == []
    assert_clean_error(head.status, head.body)
    assert fakes["b"].events("request", tag) == []


# --------------------------------------------------------------------- health and routing


async def test_slow_backend_gets_less_traffic(fakes, make_core) -> None:
    fakes["a"].set_mode(delay_s=0.3)
    core = make_core(fakes["a"], fakes["b"])
    queue = [new_tag("slow") for _ in range(120)]

    async def worker() -> None:
        while queue:
            assert (await complete(core, queue.pop())).status == 200

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(8))), 60)
    slow = len(fakes["a"].events("done", "slow"))
    fast = len(fakes["b"].events("done", "slow"))
    assert slow + fast == 120
    assert slow < 0.25 * 120, (slow, fast)


async def test_recovered_backend_is_ejected_then_readmitted(fakes, make_core) -> None:
    core = make_core(fakes["a"], fakes["b"])
    fakes["a"].kill()
    # Idle: the active probes alone find it down (failure_threshold 2, interval 0.2 s).
    await wait_for_state(core, fakes["a"], "ejected")
    assert backend_status(core, fakes["a"])["last_error"].startswith("probe failed")
    replies = [await complete(core, new_tag("down")) for _ in range(5)]
    assert {served_by(reply) for reply in replies} == {"b"}

    fakes["a"].start()
    waited = await wait_for_state(core, fakes["a"], "healthy")
    assert waited < 3.0  # cooldown 0.5 s (at most 1 s after failed half-open probes)
    tags = [new_tag("back") for _ in range(30)]
    for tag in tags:
        await complete(core, tag)
    assert len(fakes["a"].events("done", "back")) >= 5


async def test_failed_half_open_probe_doubles_the_cooldown(fakes, make_core) -> None:
    """Once the backend has answered: before that it is starting, and its cooldown stays."""
    core = make_core(fakes["a"], fakes["b"])
    [backend] = [b for b in core.fleet.backends if b.config.url == fakes["a"].url]
    start = time.monotonic()
    while not backend.answered:  # its first probe passes
        assert time.monotonic() - start < 3
        await asyncio.sleep(0.01)
    fakes["a"].set_mode(health_status=503)
    await wait_for_state(core, fakes["a"], "ejected")
    assert backend_status(core, fakes["a"])["last_error"] == "probe answered HTTP 503"
    # The half-open probe after the 0.5 s cooldown fails: ejected again for 1 s.
    start = time.monotonic()
    while backend_status(core, fakes["a"])["ejections"] < 2:
        assert time.monotonic() - start < 3
        await asyncio.sleep(0.01)
    status = backend_status(core, fakes["a"])
    assert status["state"] == "ejected" and 0.8 < status["cooldown_remaining_s"] <= 1.0


async def test_no_healthy_backend_is_a_503_with_retry_after(fakes, make_core) -> None:
    core = make_core(fakes["a"])
    fakes["a"].kill()
    await wait_for_state(core, fakes["a"], "ejected")
    reply = await complete(core, new_tag("none"))
    assert reply.status == 503 and reply.headers["Retry-After"] == "1"
    assert orjson.loads(reply.body)["error"]["code"] == "no_healthy_upstream"


# --------------------------------------------------------------------- timeouts


async def test_first_token_timeout_is_a_504_and_not_retried(fakes, make_core) -> None:
    fakes["a"].set_mode(delay_s=5)
    core = make_core(BackendConfig(url=fakes["a"].url),
                     BackendConfig(url=fakes["b"].url, weight=1e-6),
                     timeouts=UpstreamTimeouts(first_token_s=0.5))
    tag = new_tag("ttft")
    start = time.monotonic()
    head, events = await stream(core, tag)
    assert time.monotonic() - start < 2
    assert head.status == 504 and events == []
    assert "first_token_s" in orjson.loads(head.body)["error"]["message"]
    assert fakes["b"].events("request", tag) == []


async def test_idle_gap_ends_the_stream_with_a_504_event(fakes, make_core) -> None:
    fakes["a"].set_mode(events=5, stall_after_events=2)
    core = make_core(fakes["a"], timeouts=UpstreamTimeouts(idle_s=0.5))
    head, events = await asyncio.wait_for(stream(core, new_tag("idle")), 5)
    assert head.status == 200
    error = payloads(events)[-1]["error"]
    assert error["type"] == "GatewayTimeoutError" and "idle_s" in error["message"]
    assert events[-1] == DONE and len(events) == 4


async def test_total_deadline_bounds_a_long_stream(fakes, make_core) -> None:
    fakes["a"].set_mode(events=50, gap_s=0.1)
    core = make_core(fakes["a"], timeouts=UpstreamTimeouts(total_s=1.0))
    start = time.monotonic()
    head, events = await stream(core, new_tag("total"))
    assert 0.9 < time.monotonic() - start < 2
    assert "total_s" in payloads(events)[-1]["error"]["message"]
    assert events[-1] == DONE


async def test_total_deadline_bounds_a_whole_answer(fakes, make_core) -> None:
    fakes["a"].set_mode(delay_s=5)
    core = make_core(fakes["a"], timeouts=UpstreamTimeouts(total_s=0.5))
    reply = await complete(core, new_tag("total-whole"))
    assert reply.status == 504
    assert "total_s" in orjson.loads(reply.body)["error"]["message"]


# --------------------------------------------------------------------- cancellation, saturation


async def test_client_disconnect_closes_the_upstream_request(fakes, make_core) -> None:
    fakes["a"].set_mode(events=200, gap_s=0.05)
    core = make_core(fakes["a"])
    tag = new_tag("cancel")
    events = core.stream(call(tag, stream=True), EMBEDS)
    assert isinstance(await anext(events), UpstreamReply)
    for _ in range(3):
        await anext(events)
    closed = time.time()
    await events.aclose()  # what Serve does to the generator when the client goes away
    await asyncio.sleep(1.0)
    [disconnect] = fakes["a"].events("disconnect", tag)
    assert disconnect["t"] - closed < 1.0
    assert fakes["a"].events("done", tag) == []
    assert backend_status(core, fakes["a"])["in_flight"] == 0


async def test_saturated_fleet_waits_then_answers_429(fakes, make_core) -> None:
    fakes["a"].set_mode(delay_s=1.0)
    backend = BackendConfig(url=fakes["a"].url, max_in_flight=1)
    core = make_core(backend, max_queue_wait_s=0.3)
    first = asyncio.ensure_future(complete(core, new_tag("sat")))
    await asyncio.sleep(0.1)
    start = time.monotonic()
    refused = await complete(core, new_tag("sat"))
    assert 0.25 < time.monotonic() - start < 0.8
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
    assert orjson.loads(refused.body)["error"]["code"] == "upstream_saturated"
    assert (await first).status == 200

    patient = make_core(backend, max_queue_wait_s=5)
    replies = await asyncio.gather(*(complete(patient, new_tag("sat")) for _ in range(3)))
    assert [reply.status for reply in replies] == [200, 200, 200]


# --------------------------------------------------------------------- dialects, config


async def test_each_backend_gets_its_own_dialect_and_model_name(fakes, make_core) -> None:
    core = make_core(
        BackendConfig(url=fakes["a"].url, dialect="nim", model="meta/llama-3.1-8b-instruct"),
        BackendConfig(url=fakes["b"].url, dialect="vllm"),
    )
    for _ in range(20):
        await complete(core, new_tag("dialect"))
        await stream(core, new_tag("dialect"))
    nim, vllm = fakes["a"].events("request", "dialect"), fakes["b"].events("request", "dialect")
    assert nim and vllm
    for row in nim:
        assert "prompt-embeds" in row["keys"] and "prompt_embeds" not in row["keys"]
        assert row["prompt"] == "" and row["model"] == "meta/llama-3.1-8b-instruct"
    for row in vllm:
        assert "prompt_embeds" in row["keys"] and "prompt" not in row["keys"]
        assert row["model"] == "serve-app-demo"


async def test_reconfigure_in_place_keeps_streams_in_flight(fakes, make_core) -> None:
    fakes["a"].set_mode(events=10, gap_s=0.1)
    core = make_core(fakes["a"])
    tag = new_tag("reconf")
    running = asyncio.ensure_future(stream(core, tag))
    await asyncio.sleep(0.3)
    await core.reconfigure(UpstreamConfig(backends=[BackendConfig(url=fakes["b"].url)],
                                          health=FAST_HEALTH))
    retired = backend_status(core, fakes["a"])
    assert retired["state"] == "retired" and retired["in_flight"] == 1
    assert served_by(await complete(core, new_tag("reconf-new"))) == "b"
    head, events = await running
    assert head.status == 200 and events[-1] == DONE
    assert [p["choices"][0]["text"] for p in payloads(events)][-1] == "a9 "
    assert [row["url"] for row in core.status()] == [fakes["b"].url]


# --------------------------------------------------------------------- vLLM's refusals


async def test_more_prompts_than_vllm_takes_is_its_400_not_retried(fakes, make_core) -> None:
    """vLLM 0.26.0 takes at most 1,024 prompt embeddings a request: its refusal reaches the
    client with vLLM's words, and no other backend is asked."""
    core = make_core(*fakes.values())
    tag = new_tag("prompts")
    reply = await core.complete(call(tag), EMBEDS * (MAX_PROMPTS + 1))
    assert reply.status == 400
    error = orjson.loads(reply.body)["error"]
    assert f"maximum allowed count of {MAX_PROMPTS}" in error["message"]
    assert sum(len(s.events("request", tag)) for s in fakes.values()) == 1


async def test_logprobs_above_vllms_limit_end_the_stream_with_its_400(fakes,
                                                                       make_core) -> None:
    """vLLM checks `logprobs` against `--max-logprobs` once its stream has begun: the
    client's stream carries vLLM's refusal, with vLLM's status, then [DONE]."""
    core = make_core(fakes["a"])
    fields = SamplingFields(max_tokens=4, cache_salt=new_tag("logprobs"), stream=True,
                            logprobs=MAX_LOGPROBS + 1)
    items = [item async for item in core.stream(
        UpstreamCall("serve-app-demo", fields, stream=True), EMBEDS)]
    head, events = items[0], items[1:]
    assert isinstance(head, UpstreamReply) and head.status == 200
    [error] = payloads(events)  # type: ignore[arg-type]
    assert (error["error"]["code"], error["error"]["param"]) == (400, "logprobs")
    assert "greater than max allowed" in error["error"]["message"]
    assert events[-1] == DONE


# --------------------------------------------------------------------- real generation


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory,
               demo_model_dir: Path) -> Iterator[list[ServerProcess]]:
    """Two reference upstreams (the demo model, real generation) in their own processes."""
    logs = tmp_path_factory.mktemp("reference-logs")
    pair = [ServerProcess("reference", f"ref{i}", logs / f"ref{i}.jsonl") for i in range(2)]
    for server in pair:
        server.launch()
    try:
        for server in pair:
            server.wait_ready(timeout_s=180)
        yield pair
    finally:
        for server in pair:
            server.kill()


async def test_reference_upstreams_fail_over_to_the_same_greedy_answer(
        references, make_core, demo_model_dir: Path, demo_tokenizer: Any) -> None:
    embedder = EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig())
    embeds = embedder.embed_batch([demo_tokenizer("Tell me about France")["input_ids"]])
    greedy = UpstreamCall("serve-app-demo", SamplingFields(max_tokens=8, temperature=0))
    core = make_core(*references)
    expected = orjson.loads((await core.complete(greedy, embeds)).body)["choices"][0]["text"]
    assert expected

    references[0].kill()
    replies = await asyncio.wait_for(
        asyncio.gather(*(core.complete(greedy, embeds) for _ in range(6))), 120)
    assert [reply.status for reply in replies] == [200] * 6
    assert {orjson.loads(r.body)["choices"][0]["text"] for r in replies} == {expected}
    streamed = UpstreamCall("serve-app-demo", SamplingFields(max_tokens=8, temperature=0,
                                                            stream=True), stream=True)
    items = [item async for item in core.stream(streamed, embeds)]
    text = "".join(p["choices"][0]["text"] for p in payloads(items[1:]) if p["choices"])
    assert text == expected and items[-1] == DONE
