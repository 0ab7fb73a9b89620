"""The gateway's metrics without Ray: names, fixed label sets, and what the embedder, the
dispatcher and the fleet record (the Ray metric classes swapped for recording fakes)."""

from __future__ import annotations

import ast
import asyncio
import functools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from serve_app.config import BackendConfig, HealthConfig, UpstreamConfig
from serve_app.observability import metrics
from serve_app.prompts.codec import encode_prompt_embeds
from serve_app.prompts.embedder import EmbedderCore, SplicedPrompt
from serve_app.protocol import SamplingFields
from serve_app.upstream import fleet
from serve_app.upstream.call import UpstreamCall
from serve_app.upstream.dispatcher import DispatcherCore
from serve_app.upstream.failures import failure_kind
from tests.exported_metrics import defined_metrics

EMBEDS = [encode_prompt_embeds(torch.randn(2, 4))]
DISPATCHER = Path(metrics.__file__).parents[1] / "upstream" / "dispatcher.py"
FLEET = Path(metrics.__file__).parents[1] / "upstream" / "fleet.py"


@dataclass
class FakeMetric:
    """Keeps every recorded value by its tags; `kind` is counter, histogram or gauge."""

    kind: str
    name: str
    tag_keys: tuple[str, ...]
    values: dict[tuple[tuple[str, str], ...], list[float]] = field(default_factory=dict)

    def _record(self, value: float, tags: dict[str, str] | None = None) -> None:
        tags = tags or {}
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        assert all(isinstance(v, str) for v in tags.values())
        self.values.setdefault(tuple(sorted(tags.items())), []).append(value)

    inc = observe = set = _record

    def total(self, **tags: str) -> float:
        """The sum of values (counters), of observations' count (histograms), or the
        last value (gauges) of every series matching `tags`."""
        found = [v for key, v in self.values.items() if set(tags.items()) <= set(key)]
        if self.kind == "gauge":
            return sum(values[-1] for values in found)
        if self.kind == "histogram":
            return sum(len(values) for values in found)
        return sum(sum(values) for values in found)


class Recorded:
    def __init__(self) -> None:
        self.by_name: dict[str, FakeMetric] = {}

    def factory(self, kind: str) -> Any:
        def make(name: str, description: str = "", boundaries: list[float] | None = None,
                 tag_keys: tuple[str, ...] | None = None) -> FakeMetric:
            assert name.startswith("serve_app_") and description
            if kind == "histogram":
                assert boundaries and boundaries == sorted(boundaries) and boundaries[0] > 0
            made = FakeMetric(kind, name, tuple(tag_keys or ()))
            self.by_name[name] = made
            return made
        return make

    def __getitem__(self, name: str) -> FakeMetric:
        """The metric, or an empty one when nothing created it (nothing was recorded)."""
        return self.by_name.get(name) or FakeMetric("counter", name, ())


def _getters() -> list[Any]:
    return [value for value in vars(metrics).values()
            if isinstance(value, functools._lru_cache_wrapper)]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorded]:
    recording = Recorded()
    for kind, cls in [("counter", "Counter"), ("histogram", "Histogram"), ("gauge", "Gauge")]:
        monkeypatch.setattr(metrics, cls, recording.factory(kind))
    for getter in _getters():
        getter.cache_clear()
    yield recording
    for getter in _getters():
        getter.cache_clear()


# ----------------------------------------------------------------- the module itself


def test_importing_creates_no_metric() -> None:
    code = ("import functools, serve_app.observability.metrics as m\n"
            "print(sum(v.cache_info().currsize for v in vars(m).values()\n"
            "          if isinstance(v, functools._lru_cache_wrapper)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "0"


def test_every_getter_makes_one_named_metric(recorded: Recorded) -> None:
    for getter in _getters():
        assert getter() is getter()
    assert {name: made.kind for name, made in recorded.by_name.items()} == defined_metrics()
    assert len(recorded.by_name) == 17


def test_metrics_work_as_no_ops_outside_ray() -> None:
    metrics.record_request("/v1/completions", "m", 200, 0.1, 0.05)
    metrics.record_tokens(3, 2, 4, "m")
    metrics.record_rejection("auth")
    metrics.record_embedder_batch(2, 10, {"lookup": 0.001, "encode": 0.002}, 100)
    metrics.record_upstream_attempt("http://a/v1", 200)
    metrics.set_upstream_state("http://a/v1", "healthy", ["healthy", "ejected"])


@pytest.mark.parametrize(("path", "label"), [
    ("/v1/completions", "/v1/completions"), ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/models/serve-app-demo", "/v1/models/{model_id}"), ("/health", "/health"),
    ("/v1/private-words", "other"), ("/", "other"), ("/v1/completions/x", "other"),
])
def test_routes_are_templates_or_other(path: str, label: str) -> None:
    assert metrics.route_label(path) == label


def test_gateway_recording(recorded: Recorded) -> None:
    metrics.record_request("/v1/completions", "serve-app-demo", 200, 0.5, 0.1)
    metrics.record_request("/v1/secret-path", "unknown", 404, 0.01, None)
    metrics.record_tokens(prompt_text=5, prompt_client_embeds=0, completion=3,
                          model="serve-app-demo")
    metrics.record_rejection("overload")
    metrics.record_rejection("a reason from nowhere")
    assert recorded["serve_app_requests"].total(route="/v1/completions", status="200") == 1
    assert recorded["serve_app_requests"].total(route="other", status="404") == 1
    assert recorded["serve_app_request_duration_seconds"].total() == 2
    assert recorded["serve_app_time_to_first_token_seconds"].total() == 1
    assert recorded["serve_app_prompt_tokens"].total(source="text") == 5
    assert recorded["serve_app_prompt_tokens"].total(source="client_embeds") == 0
    assert recorded["serve_app_completion_tokens"].total(model="serve-app-demo") == 3
    assert recorded["serve_app_rejections"].total(reason="overload") == 1
    assert recorded["serve_app_rejections"].total(reason="other") == 1


# ----------------------------------------------------------------- embedder


def test_embedder_measures_each_stage(recorded: Recorded) -> None:
    core = EmbedderCore(torch.randn(50, 8))
    batch = [[1, 2, 3], SplicedPrompt(([4], torch.randn(2, 8)))]
    encoded, stats = core.embed_measured(batch)
    assert [item.rows for item in encoded] == [3, 3]
    assert (stats.prompts, stats.rows) == (2, 6)
    assert stats.payload_bytes == sum(item.nbytes for item in encoded) > 0
    assert set(stats.stage_seconds) == {"lookup", "encode"}  # no transform configured
    assert all(seconds >= 0 for seconds in stats.stage_seconds.values())


def test_embedder_times_the_transform_when_one_runs() -> None:
    core = EmbedderCore(torch.randn(50, 8), transform=lambda rows, ids, lengths, tenants: rows * 2)
    _, stats = core.embed_measured([[1, 2], [3]])
    assert set(stats.stage_seconds) == {"lookup", "transform", "encode"}


def test_embedder_batch_recording(recorded: Recorded) -> None:
    metrics.record_embedder_batch(2, 6, {"lookup": 0.001, "encode": 0.002}, 1000)
    assert recorded["serve_app_embedder_batch_size"].values == {(): [2]}
    assert recorded["serve_app_embedder_batch_tokens"].values == {(): [6]}
    assert recorded["serve_app_embedder_stage_seconds"].total(stage="lookup") == 1
    assert recorded["serve_app_embedder_stage_seconds"].total(stage="transform") == 0
    assert recorded["serve_app_embedder_payload_bytes"].total() == 1000


# ----------------------------------------------------------------- upstream


def fleet_core(*urls: str, respond: Any, threshold: int = 3) -> DispatcherCore:
    config = UpstreamConfig(backends=[BackendConfig(url=url) for url in urls],
                            health=HealthConfig(failure_threshold=threshold))
    return DispatcherCore(config, httpx.AsyncClient(transport=httpx.MockTransport(respond)))


def answer(request: httpx.Request) -> httpx.Response:
    if request.url.host == "down":
        return httpx.Response(503, json={"error": {"message": "busy"}})
    if request.method == "GET":
        return httpx.Response(200, json={"data": []})
    return httpx.Response(200, json={"choices": [{"index": 0, "text": "x",
                                                  "finish_reason": "length"}]})


async def test_attempts_and_retries_by_backend(recorded: Recorded) -> None:
    core = fleet_core("http://down/v1", "http://up/v1", respond=answer, threshold=100)
    for _ in range(20):
        reply = await core.complete(UpstreamCall("m"), EMBEDS)
        assert reply.status == 200
    await core.aclose()
    requests, retries = recorded["serve_app_upstream_requests"], recorded[
        "serve_app_upstream_retries"]
    assert requests.total(backend="http://up/v1", status="200") == 20
    failed = requests.total(backend="http://down/v1", status="503")
    assert failed > 0 and requests.total() == 20 + failed
    assert retries.total(backend="http://down/v1", reason="503") == failed
    assert retries.total(backend="http://up/v1") == 0


async def test_no_retry_is_counted_when_no_backend_is_left(recorded: Recorded) -> None:
    core = fleet_core("http://down/v1", respond=answer, threshold=100)
    reply = await core.complete(UpstreamCall("m"), EMBEDS)
    await core.aclose()
    assert reply.status == 503
    assert recorded["serve_app_upstream_requests"].total(status="503") == 1
    assert recorded["serve_app_upstream_retries"].total() == 0


async def test_unreachable_backend_is_ejected_with_its_reason(recorded: Recorded) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    core = fleet_core("http://gone/v1", respond=refuse, threshold=2)
    for _ in range(2):
        await core.complete(UpstreamCall("m"), EMBEDS)
    # At once after the ejection, in this task: its prober must still stop (Python 3.11's
    # `wait_for` dropped the cancellation that arrived as the ejection woke it: close hung).
    this = asyncio.current_task()
    assert this is not None
    watchdog = asyncio.get_running_loop().call_later(10, this.cancel)
    await core.aclose()
    watchdog.cancel()
    state = recorded["serve_app_upstream_state"]
    assert recorded["serve_app_upstream_requests"].total(status="unreachable") == 2
    assert recorded["serve_app_upstream_ejections"].values == {
        (("backend", "http://gone/v1"), ("reason", "unreachable")): [1]}
    assert state.total(backend="http://gone/v1", state="ejected") == 1
    assert state.total(backend="http://gone/v1", state="healthy") == 0
    assert state.total(backend="http://gone/v1") == 1  # one current state


async def test_in_flight_and_first_token(recorded: Recorded) -> None:
    def stream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=b'data: {"choices": []}\n\ndata: [DONE]\n\n')

    core = fleet_core("http://up/v1", respond=stream)
    call = UpstreamCall("m", SamplingFields(stream=True), stream=True)
    items = core.stream(call, EMBEDS)
    await anext(items)  # the head: the backend is held
    in_flight = recorded["serve_app_upstream_in_flight"]
    assert in_flight.total(backend="http://up/v1") == 1
    async for _ in items:
        pass
    await core.aclose()
    assert in_flight.total(backend="http://up/v1") == 0
    assert recorded["serve_app_upstream_time_to_first_token_seconds"].total(
        backend="http://up/v1") == 1
    assert recorded["serve_app_upstream_requests"].total(status="200") == 1


def test_every_failure_reason_has_a_kind() -> None:
    """Each reason the dispatcher and the fleet give `failed` maps to a named kind."""
    reasons = []
    for path in (DISPATCHER, FLEET):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "failed" and len(node.args) == 2
                    and isinstance(node.args[1], ast.Constant)):
                reasons.append(node.args[1].value)
    assert len(reasons) >= 6
    for reason in reasons:
        assert failure_kind(reason) in metrics.FAILURE_KINDS - {"transport_error"}, reason
    assert failure_kind("RemoteProtocolError") == "transport_error"
    assert failure_kind("HTTP 500") == "http_5xx"
    assert failure_kind("probe answered HTTP 500") == "probe_failed"


async def test_an_attempt_the_client_leaves_is_cancelled(recorded: Recorded) -> None:
    started = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("never answered")

    core = fleet_core("http://slow/v1", respond=hang)
    task = asyncio.create_task(core.complete(UpstreamCall("m"), EMBEDS))
    await started.wait()
    assert recorded["serve_app_upstream_in_flight"].total(backend="http://slow/v1") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await core.aclose()
    assert recorded["serve_app_upstream_requests"].values == {
        (("backend", "http://slow/v1"), ("status", "cancelled")): [1]}
    assert recorded["serve_app_upstream_in_flight"].total(backend="http://slow/v1") == 0


async def test_fleet_gauges_are_set_again_while_nothing_changes(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray forgets a gauge not set again within about 20 s: a quiet fleet still shows."""
    monkeypatch.setattr(fleet, "GAUGE_REFRESH_S", 0.01)
    core = fleet_core("http://up/v1", respond=answer)
    await asyncio.sleep(0.1)
    await core.aclose()
    state = recorded["serve_app_upstream_state"].values[
        (("backend", "http://up/v1"), ("state", "healthy"))]
    in_flight = recorded["serve_app_upstream_in_flight"].values[(("backend", "http://up/v1"),)]
    assert len(state) > 3 and set(state) == {1}
    assert len(in_flight) > 3 and set(in_flight) == {0}
