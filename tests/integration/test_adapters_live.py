"""A changed adapter list applied in place through Serve: the Embedder's and the Gateway's
`user_config` gain and lose an adapter while every replica of the app stays the same
one, and /v1/models and the answers follow the list."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.config import AdapterConfig, AppConfig
from tests.integration.conftest import ServeGraph, delete_app

pytestmark = pytest.mark.integration

APP, PREFIX, VERSION = "live-adapters", "/live-adapters", "live-adapters-test"
PROMPT_TUNED, P_TUNED = "demo-prompt-tuned", "demo-p-tuned"


class LiveApp:
    """A gateway app whose deployments keep one code version, as `serve deploy` gives
    them while `args` stay the same: a changed `user_config` is applied by `reconfigure`
    (tests/integration/conftest.py's `FleetApp` says why `_internal` pins it)."""

    def __init__(self, serve_graph: ServeGraph) -> None:
        self.url = f"{serve_graph.base_url}{PREFIX}"
        self.plain = AppConfig.model_validate({"upstream": {"backends": [
            {"url": f"{serve_graph.proxy.url}/v1"}]}}).model_dump(mode="json")

    def deploy(self, *adapters: AdapterConfig) -> None:
        from ray import serve

        from serve_app.deployments import Dispatcher, Embedder, Gateway

        listed = [adapter.model_dump(mode="json") for adapter in adapters]
        pinned: dict[str, Any] = {"version": VERSION, "_internal": True}
        embedder = Embedder.options(
            user_config={**self.plain["batching"], "adapters": listed}, **pinned)
        dispatcher = Dispatcher.options(user_config=self.plain["upstream"], **pinned)
        gateway = Gateway.options(user_config={"adapters": listed}, **pinned).bind(
            self.plain, dispatcher.bind(embedder.bind(self.plain)), {})
        serve.run(gateway, name=APP, route_prefix=PREFIX)

    def models(self) -> set[str]:
        listed = httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"]
        return {card["id"] for card in listed if card.get("parent")}

    def complete(self, model: str) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", timeout=60, json={
            "model": model, "prompt": "the quick", "max_tokens": 4, "temperature": 0})


def replicas() -> set[str]:
    """The app's replica actors by name: a restarted replica is a new name."""
    import ray

    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"SERVE_REPLICA::{APP}#")}


@pytest.fixture(scope="module")
def live(serve_graph: ServeGraph) -> Iterator[LiveApp]:
    app = LiveApp(serve_graph)
    try:
        yield app
    finally:
        delete_app(APP)


def test_a_changed_adapter_list_applies_without_a_restart(
        live: LiveApp, prompt_tuning_dir: Path, p_tuning_dir: Path) -> None:
    prompt_tuned = AdapterConfig(name=PROMPT_TUNED, path=str(prompt_tuning_dir))
    p_tuned = AdapterConfig(name=P_TUNED, path=str(p_tuning_dir))
    live.deploy(prompt_tuned)
    started = replicas()
    assert {name.split("#")[1] for name in started} == {"Gateway", "Dispatcher", "Embedder"}
    assert live.models() == {PROMPT_TUNED}
    assert live.complete(P_TUNED).status_code == 404
    first = live.complete(PROMPT_TUNED)
    assert first.status_code == 200, first.text

    live.deploy(p_tuned)
    assert replicas() == started  # the same replicas, reconfigured
    assert live.models() == {P_TUNED}
    answer = live.complete(P_TUNED)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] != first.json()["usage"]["prompt_tokens"]
    assert live.complete(PROMPT_TUNED).status_code == 404
