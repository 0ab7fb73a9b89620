"""The guard in front of Serve's own request handling (`serve_app.proxy_guard`), run the way
Serve 2.60 runs it: wrapped by Ray's own `_apply_middlewares` around Ray's request-id
middleware, and read back with Ray's own header parsers. Also the HAProxy wrapper's rules
in a config rendered from Ray's own template, checked by the HAProxy binary Serve runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from ray.serve._private import constants, http_util
from ray.serve.config import HTTPOptions
from starlette.types import Receive, Scope, Send

from serve_app import proxy_guard
from serve_app.observability import request_id
from serve_app.proxy_guard import haproxy, rules
from serve_app.proxy_guard.asgi import ProxyGuardMiddleware, proxy_middlewares

HEX_ID = re.compile(r"[0-9a-f]{32}")
CONTROL = {  # every control header, each as a client could spell it
    "x-request-timeout-seconds": "0.001",
    "X-Request-Disconnect-Disabled": "?1",
    "x-session-id": "sticky",
    "X_Session_Id": "sticky",
    "serve_multiplexed_model_id": "other-model",
    "Serve-Multiplexed-Model-Id": "other-model",
}


class ServeSide:
    """What Serve's request handling would see: the app inside Ray's middleware stack."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.headers = list(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def ids(self) -> list[bytes]:
        return request_id.sent(self.headers)


@pytest.fixture
def serve_side() -> ServeSide:
    return ServeSide()


@pytest.fixture
def proxy(serve_side: ServeSide) -> httpx.AsyncClient:
    """Serve's HTTP server app as `start_asgi_http_server` builds it, with the callback."""
    app = http_util._apply_middlewares(serve_side, proxy_middlewares())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve")


def test_the_names_are_rays() -> None:
    assert request_id.HEADER == constants.SERVE_HTTP_REQUEST_ID_HEADER
    assert rules.REQUEST_TIMEOUT == constants.SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER
    assert rules.DISCONNECT_DISABLED == constants.SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER
    assert rules.MULTIPLEXED_MODEL_ID == constants.SERVE_MULTIPLEXED_MODEL_ID
    assert rules.SESSION_ID == constants.SERVE_SESSION_ID


def test_serve_takes_the_callback_its_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_util, "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH",
                        proxy_guard.CALLBACK)
    [middleware] = http_util.configure_http_middlewares(HTTPOptions()).middlewares
    assert middleware.cls is ProxyGuardMiddleware
    assert proxy_guard.CALLBACK_ENV == "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


async def test_serve_reads_none_of_its_control_headers(
    proxy: httpx.AsyncClient, serve_side: ServeSide,
) -> None:
    answer = await proxy.get("/v1/models", headers={**CONTROL, "x-canary": "kept"})
    assert answer.status_code == 200
    seen = dict(serve_side.headers)
    assert seen[b"x-canary"] == b"kept"
    assert not any(rules.is_control(name) for name in seen)
    # What Serve's proxy and direct-ingress replicas make of the headers they get:
    assert http_util.parse_request_timeout_header(seen, 30.0) == 30.0
    assert http_util.parse_disconnect_disabled_header(seen) is False
    assert http_util.parse_session_id_header(seen) == ""
    assert not any(name.replace(b"-", b"_") == b"serve_multiplexed_model_id" for name in seen)


async def test_a_well_formed_id_goes_through_and_back(
    proxy: httpx.AsyncClient, serve_side: ServeSide,
) -> None:
    answer = await proxy.get("/v1/models", headers={"x-request-id": "ticket-1"})
    assert serve_side.ids() == [b"ticket-1"]
    assert answer.headers.get_list("x-request-id") == ["ticket-1"]


@pytest.mark.parametrize("sent", [
    [b"x fake 200 OK user=root"],  # fields forged into a log line
    [b"a" * (8 * 1024 * 1024)],  # megabytes into every log line and the echo
    [b"\xff\xfe"],  # not UTF-8: Serve's decode would fail the request
    [b"first", b"second"],  # Serve's proxy keeps the last, Starlette the first
    [b"x" * 129],
], ids=["forged", "8MB", "undecodable", "two", "129 characters"])
async def test_any_other_id_is_replaced_before_serve_reads_it(
    proxy: httpx.AsyncClient, serve_side: ServeSide, sent: list[bytes],
) -> None:
    answer = await proxy.get("/v1/models", headers=[(b"x-request-id", value) for value in sent])
    [made] = serve_side.ids()
    assert HEX_ID.fullmatch(made.decode())
    assert answer.headers.get_list("x-request-id") == [made.decode()]


async def test_without_an_id_serve_gets_one(proxy: httpx.AsyncClient,
                                            serve_side: ServeSide) -> None:
    answer = await proxy.get("/v1/models")
    [made] = serve_side.ids()
    assert answer.headers.get_list("x-request-id") == [made.decode()]


@pytest.mark.parametrize("root_path", ["", "/behind-a-proxy"])
async def test_the_route_listing_is_a_404_and_liveness_passes(
    serve_side: ServeSide, root_path: str,
) -> None:
    app = http_util._apply_middlewares(serve_side, proxy_middlewares())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path=root_path),
                               base_url="http://serve")
    for path in ("/-/routes", "/-/Routes"):
        answer = await client.get(f"{root_path}{path}", headers={"x-request-id": "ticket-2"})
        assert answer.status_code == 404
        assert answer.json() == {"error": {"message": "Not Found", "type": "NotFoundError",
                                           "param": None, "code": 404,
                                           "request_id": "ticket-2"}}
        assert answer.headers.get_list("x-request-id") == ["ticket-2"]
    assert serve_side.headers == []  # Serve never saw them
    assert (await client.get(f"{root_path}/-/healthz")).status_code == 200


# --------------------------------------------------------------------------------- HAProxy


@pytest.fixture(scope="module")
def serve_haproxy_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config as Serve 2.60 writes it, for one app at `/` with one ingress replica."""
    from ray.serve._private.haproxy import (
        BackendConfig,
        HAProxyApi,
        HAProxyConfig,
        ServerConfig,
    )

    folder = tmp_path_factory.mktemp("haproxy")
    config = HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=18000),
                           socket_path=str(folder / "admin.sock"),
                           metrics_socket_path=str(folder / "metrics.sock"),
                           has_received_routes=True, has_received_servers=True)
    backend = BackendConfig(name="gateway", path_prefix="/", app_name="gateway",
                            servers=[ServerConfig(name="r1", host="127.0.0.1", port=30001)])
    api = HAProxyApi(cfg=config, backend_configs={"gateway": backend},
                     config_file_path=str(folder / "haproxy.cfg"))
    api._generate_config_file_internal()
    return folder / "haproxy.cfg"


def _frontend(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(haproxy.FRONTEND)
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" "))
    return [line.strip() for line in lines[start + 1:end]]


def test_haproxy_gets_the_rules_first_in_its_frontend(serve_haproxy_config: Path) -> None:
    guarded = haproxy.guard_config(serve_haproxy_config.read_text())
    frontend = _frontend(guarded)
    assert frontend[0].startswith("bind ")
    refusal = frontend[2]
    assert refusal.startswith("http-request return status 404 content-type application/json")
    assert refusal.endswith("if { path -i /-/routes }")
    deleted = {line.split()[-1] for line in frontend if line.startswith("http-request del")}
    assert deleted == set(rules.spellings())
    assert {name.lower() for name in CONTROL} <= deleted
    # Serve's own answer to /-/routes comes later: HAProxy runs the first that matches.
    assert frontend.index(refusal) < next(
        i for i, line in enumerate(frontend) if line.startswith("acl routes "))
    assert haproxy.guard_config(guarded) == guarded  # once only


def test_haproxy_forwards_client_aborts_without_request_splicing(
    serve_haproxy_config: Path,
) -> None:
    """Serve's defaults splice requests, which loses client aborts (`guard_config`)."""
    original = serve_haproxy_config.read_text().splitlines()
    guarded = haproxy.guard_config(serve_haproxy_config.read_text()).splitlines()
    assert "    option splice-request" in original
    defaults = guarded[guarded.index("defaults"):]
    assert "option abortonclose" in [line.strip() for line in defaults]
    assert [line.split("#")[0].strip() for line in guarded if "splice" in line] == [
        "no option splice-request", "option splice-response"]


def test_the_wrapper_guards_the_file_and_runs_the_real_haproxy(
    serve_haproxy_config: Path, tmp_path: Path,
) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(serve_haproxy_config.read_text())
    checked = subprocess.run(  # `-c`: HAProxy parses the config and exits
        [sys.executable, "-m", "serve_app.proxy_guard.haproxy", "-c", "-f", str(config)],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                             proxy_guard.HAPROXY_BINARY_ENV: "/itself"},
        cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "Configuration file is valid" in checked.stdout
    assert haproxy.MARKER in config.read_text()


def test_a_config_without_the_frontend_stops_haproxy() -> None:
    with pytest.raises(haproxy.TemplateChanged):
        haproxy.guard_config("global\n    maxconn 10\nfrontend other\n    bind :80\n")


def test_the_refusal_body_is_the_gateways() -> None:
    from serve_app.errors import GatewayError

    body = GatewayError(rules.NOT_FOUND, 404).to_body()
    assert rules.not_found_body() == body
