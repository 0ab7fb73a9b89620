"""One local Ray + Serve for the whole integration session, deployed from serve_config.yaml
with the proxy settings the cluster manifests ship (`serve_app.proxy_guard`).

The gateway's upstream is pointed at a recording proxy in this process that forwards to
the reference upstream, so tests can inspect every byte the upstream received.
"""

from __future__ import annotations

import http.server
import io
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pybase64
import pytest
import torch
import yaml

from serve_app.config import AppConfig, BackendConfig, HealthConfig, UpstreamConfig
from tests.upstream_servers import ROOT, ServerProcess, free_port


@dataclass
class RecordingProxy:
    """Forwards requests to `target`, streaming the answer back; keeps each POST body.

    GETs pass too: the Dispatcher's health probes ask for `/v1/models`."""

    target: str
    bodies: list[bytes] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)
    """Each POST's `x-request-id` header."""
    port: int = 0
    server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # close-delimited bodies: streams pass straight through

            def do_POST(self) -> None:  # noqa: N802 - stdlib naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                proxy.bodies.append(body)
                proxy.request_ids.append(self.headers.get("x-request-id"))
                self._forward("POST", body)

            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                self._forward("GET", b"")

            def _forward(self, method: str, body: bytes) -> None:
                headers = {"content-type": self.headers.get("content-type", "application/json")}
                with httpx.stream(method, proxy.target + self.path, content=body,
                                  headers=headers, timeout=120) as upstream:
                    self.send_response(upstream.status_code)
                    self.send_header("content-type", upstream.headers.get("content-type", ""))
                    self.end_headers()
                    for chunk in upstream.iter_raw():
                        self.wfile.write(chunk)
                        self.wfile.flush()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class ServeGraph:
    base_url: str
    proxy: RecordingProxy
    model: str


# A keyed transform's key, in the environment Ray's workers inherit (as a Kubernetes secret
# mounted as a variable would be): tests deploy a keyed gateway and look for it in every log.
TRANSFORM_KEY_ENV = "SERVE_APP_TEST_TRANSFORM_KEY"
TRANSFORM_KEY = "integration-key-5d1c9e-never-logged"


def haproxy_wrapper(folder: Path) -> Path:
    """`serve-app-haproxy`, the console script the image installs, run from this tree."""
    script = folder / "serve-app-haproxy"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} "
                      '-m serve_app.proxy_guard.haproxy "$@"\n')
    script.chmod(0o755)
    return script


@pytest.fixture(scope="session")
def serve_graph(cache_dir: Path, demo_model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeGraph]:
    import ray
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    from serve_app import envs, proxy_guard

    port = free_port()
    os.environ[TRANSFORM_KEY_ENV] = TRANSFORM_KEY
    # Read by Serve's proxy, its replicas and its HAProxy manager when they start, as the
    # manifests set them in every container (docs/security.md).
    os.environ[proxy_guard.CALLBACK_ENV] = proxy_guard.CALLBACK
    os.environ[proxy_guard.HAPROXY_BINARY_ENV] = str(
        haproxy_wrapper(tmp_path_factory.mktemp("haproxy")))
    # Logical CPUs above the real two: replicas ask for fractions, the reference upstream more.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {envs.CACHE_DIR_ENV: str(cache_dir)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    proxy = RecordingProxy(target=f"http://127.0.0.1:{port}/reference")
    proxy.start()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    try:
        for app in config["applications"]:
            args = dict(app.get("args") or {})
            if app["name"] == "gateway":
                [backend] = args["upstream"]["backends"]
                args["upstream"] = {**args["upstream"],
                                    "backends": [{**backend, "url": f"{proxy.url}/v1"}]}
            built = call_user_app_builder_with_args_if_necessary(
                import_attr(app["import_path"]), args)
            serve.run(built, name=app["name"], route_prefix=app["route_prefix"])
        yield ServeGraph(f"http://127.0.0.1:{port}", proxy, "serve-app-demo")
    finally:
        proxy.stop()
        serve.shutdown()
        ray.shutdown()


def delete_app(name: str) -> None:
    """Deletes an application without waiting for its replicas to stop.

    With HAProxy as the proxy, an ingress replica drains for Serve's minimum of 30 s
    (`RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`, for load balancers to deregister it)
    before it stops, and no test waits on that: the session's `serve.shutdown` waits for
    every replica still draining at once."""
    from ray import serve

    serve.delete(name, _blocking=False)


# The fleet app: its Dispatcher's backends are the session's fake vLLM servers.
FLEET_PREFIX = "/fleet"
FLEET_VERSION = "fleet-test"
FLEET_HEALTH = HealthConfig(probe_interval_s=0.2, failure_threshold=2, cooldown_s=0.5)


class FleetApp:
    """A gateway app whose Dispatcher's fleet is redeployed as `user_config` only.

    Every deployment keeps one code version, as `serve deploy` gives them while the app's
    import path and args stay the same, so Serve treats a changed `user_config` as the
    lightweight update it makes of a `deployments:` override: the running replica's
    `reconfigure` is called, nothing restarts. (`serve.run` would otherwise draw a new
    version per call; `_internal` is how Serve's own config path sets it.)
    """

    def __init__(self, base_url: str) -> None:
        self.url = f"{base_url}{FLEET_PREFIX}"
        self.plain = AppConfig().model_dump(mode="json")
        self.dispatcher_version = FLEET_VERSION

    def deploy(self, *servers: ServerProcess, dispatchers: int = 1) -> None:
        from ray import serve

        from serve_app.deployments import Dispatcher, Embedder, Gateway

        fleet = UpstreamConfig(backends=[BackendConfig(url=s.url) for s in servers],
                               health=FLEET_HEALTH)
        pinned: dict[str, Any] = {"version": FLEET_VERSION, "_internal": True}
        embedder = Embedder.options(user_config=self.plain["batching"], **pinned)
        dispatcher = Dispatcher.options(user_config=fleet.model_dump(mode="json"),
                                        num_replicas=dispatchers,
                                        **{**pinned, "version": self.dispatcher_version})
        gateway = Gateway.options(**pinned).bind(
            self.plain, dispatcher.bind(embedder.bind(self.plain)), {})
        serve.run(gateway, name="fleet", route_prefix=FLEET_PREFIX)

    def redeploy(self, *servers: ServerProcess, dispatchers: int = 1) -> None:
        """`deploy` on new Dispatcher replicas: no backend state carries over from earlier
        tests.

        A Dispatcher replica keeps a backend's state across `reconfigure` (a config change
        must not forget a Retry-After), so a replica that served an earlier test can hold a
        throttle or an ejection that a replica started for this one never saw. A new code
        version for the Dispatcher alone makes Serve replace its replicas (`serve.run`
        returns once only new ones run) while the Embedder and the Gateway keep theirs."""
        self.dispatcher_version = f"{FLEET_VERSION}-{uuid.uuid4().hex[:8]}"
        self.deploy(*servers, dispatchers=dispatchers)

    def upstreams(self) -> dict[str, dict[str, Any]]:
        rows = httpx.get(f"{self.url}/health/upstreams", timeout=10).json()["data"]
        return {row["url"]: row for row in rows}


@pytest.fixture(scope="session")
def fleet_app(serve_graph: ServeGraph,
              servers: dict[str, ServerProcess]) -> Iterator[FleetApp]:
    """One fleet app for every module that drives it: each test deploys the fleet it needs
    (a `user_config` update, in place), so the app's start-up is paid once a session."""
    app = FleetApp(serve_graph.base_url)
    app.deploy(servers["a"])
    try:
        yield app
    finally:
        delete_app("fleet")


@dataclass
class KeyedGateway:
    """A second gateway application, `keyed_gaussian` at sigma 2 behind two API keys."""

    url: str
    api_keys: tuple[str, str]
    sigma: float = 2.0


# A keyed gateway's accepted keys: each is a tenant of its own; tests look for them, and for
# their tenants' digests, in every file Ray writes.
KEYED_API_KEYS = ("sk-integration-tenant-one-3e7a", "sk-integration-tenant-two-91c4")


@pytest.fixture(scope="session")
def keyed_gateway(serve_graph: ServeGraph,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedGateway]:
    """The keyed gateway under /keyed, upstream through the recording proxy, its keys read
    from a file (as a mounted secret would be)."""
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    keys_file = tmp_path_factory.mktemp("keyed-auth") / "api_keys"
    keys_file.write_text("\n".join(KEYED_API_KEYS) + "\n")
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    [app] = [a for a in config["applications"] if a["name"] == "gateway"]
    args = dict(app["args"])
    [backend] = args["upstream"]["backends"]
    args["upstream"] = {**args["upstream"],
                        "backends": [{**backend, "url": f"{serve_graph.proxy.url}/v1"}]}
    args["privacy"] = {"transform": {"kind": "keyed_gaussian", "sigma": 2.0,
                                     "key_env": TRANSFORM_KEY_ENV}}
    args["auth"] = {"api_keys_file": str(keys_file)}
    built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), args)
    serve.run(built, name="keyed", route_prefix="/keyed")
    yield KeyedGateway(f"{serve_graph.base_url}/keyed", KEYED_API_KEYS)
    delete_app("keyed")


@pytest.fixture(scope="session")
def client(serve_graph) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{serve_graph.base_url}/v1", api_key="EMPTY", max_retries=0)


@pytest.fixture  # per test: an async client is bound to its event loop
def async_client(serve_graph) -> openai.AsyncOpenAI:  # type: ignore[no-untyped-def]
    return openai.AsyncOpenAI(base_url=f"{serve_graph.base_url}/v1", api_key="EMPTY",
                              max_retries=0)


def client_side_embeds(tokenizer, causal_lm, text: str | list[int]) -> str:  # type: ignore[no-untyped-def]
    """The seeds' pattern: tokenizer -> get_input_embeddings() -> torch.save -> base64."""
    ids = torch.tensor(text if isinstance(text, list) else tokenizer(text).input_ids)
    with torch.no_grad():
        embeds = causal_lm.get_input_embeddings()(ids)
    buffer = io.BytesIO()
    torch.save(embeds, buffer)
    return pybase64.b64encode(buffer.getvalue()).decode()
