"""Request ids and Serve's control headers through Serve, in the proxy mode the session runs
(Serve's Python proxy, or HAProxy with `RAY_SERVE_ENABLE_HA_PROXY=1`), with the proxy
settings the cluster manifests ship (`serve_app.proxy_guard`, set by the conftest):

- one `X-Request-Id` on every answer, the same id in error bodies, upstream, Serve's
  replica logs and the gateway's JSON access log;
- a client id that is malformed, oversize, undecodable or sent twice is replaced before
  Serve reads it: it reaches no log line and no answer;
- Serve's control headers sent by a client change nothing, and Serve's route listing is
  closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest

from serve_app.observability.request_id import well_formed
from tests.integration.conftest import FleetApp, ServeGraph
from tests.integration.test_fleet_serve import body
from tests.upstream_servers import ServerProcess

pytestmark = pytest.mark.integration

HAPROXY = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def session_logs() -> Path:
    import ray._private.worker as worker

    return Path(worker._global_node.get_session_dir_path()) / "logs"


def access_lines(logs: Path) -> list[dict[str, object]]:
    return [json.loads(line) for path in (logs / "serve").glob("serve_app_access_*.jsonl")
            for line in path.read_text().splitlines() if line]


def serve_log_bytes(logs: Path) -> bytes:
    """Serve's own log files: the proxy's and every replica's lines."""
    return b"".join(p.read_bytes() for p in (logs / "serve").glob("*.log"))


def wait_for_serve_line(logs: Path, rid: str) -> None:
    """Until a line of Serve's own logs names `rid` (its logs are written asynchronously)."""
    deadline = time.monotonic() + 20
    while rid.encode() not in serve_log_bytes(logs):
        assert time.monotonic() < deadline, f"no Serve log line names {rid}"
        time.sleep(0.5)


def files_holding(logs: Path, needle: bytes) -> list[str]:
    return [str(p.relative_to(logs)) for p in logs.rglob("*")
            if p.is_file() and needle in p.read_bytes()]


def logs_size(logs: Path) -> int:
    return sum(p.stat().st_size for p in logs.rglob("*") if p.is_file())


def the_id(answer: httpx.Response) -> str:
    """The answer's one request id, well-formed."""
    [rid] = answer.headers.get_list("x-request-id")
    assert well_formed(rid), rid
    return rid


def completion(serve_graph: ServeGraph) -> dict[str, object]:
    return {"model": serve_graph.model, "prompt": "France", "max_tokens": 2}


def test_one_id_from_client_to_upstream_and_back(serve_graph: ServeGraph) -> None:
    before = len(serve_graph.proxy.request_ids)
    answer = httpx.post(f"{serve_graph.base_url}/v1/completions", timeout=60,
                        headers={"x-request-id": "ticket-serve-1"},
                        json=completion(serve_graph))
    assert answer.status_code == 200
    assert answer.headers.get_list("x-request-id") == ["ticket-serve-1"]
    assert serve_graph.proxy.request_ids[before:] == ["ticket-serve-1"]

    made = httpx.post(f"{serve_graph.base_url}/v1/completions", timeout=60,
                      json={"model": serve_graph.model, "prompt": "x", "max_tokens": -1})
    made_id = the_id(made)
    assert made.status_code == 400 and made.json()["error"]["request_id"] == made_id

    logs = session_logs()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = {line["request_id"]: line for line in access_lines(logs)}
        if {"ticket-serve-1", made_id} <= set(lines):
            break
        time.sleep(0.5)
    line = lines["ticket-serve-1"]
    assert line["route"] == "/v1/completions" and line["status"] == 200
    assert line["model"] == serve_graph.model and line["completion_tokens"] == 2
    assert str(line["backend"]).startswith(serve_graph.proxy.url)
    assert lines[made_id]["status"] == 400
    wait_for_serve_line(logs, "ticket-serve-1")  # Serve's own lines for the request


def test_a_forged_id_reaches_no_log_line_and_one_id_serves_the_request(
    serve_graph: ServeGraph,
) -> None:
    marker = f"forged-{uuid.uuid4().hex[:12]}"
    before = len(serve_graph.proxy.request_ids)
    answer = httpx.post(f"{serve_graph.base_url}/v1/completions", timeout=60,
                        headers={"x-request-id": f"{marker} 200 OK user=root"},
                        json=completion(serve_graph))
    assert answer.status_code == 200
    rid = the_id(answer)
    assert marker not in rid
    assert serve_graph.proxy.request_ids[before:] == [rid]
    logs = session_logs()
    wait_for_serve_line(logs, rid)
    assert files_holding(logs, marker.encode()) == []


def test_two_ids_become_one(serve_graph: ServeGraph) -> None:
    before = len(serve_graph.proxy.request_ids)
    answer = httpx.post(f"{serve_graph.base_url}/v1/completions", timeout=60,
                        headers=[("x-request-id", "twice-a"), ("x-request-id", "twice-b")],
                        json=completion(serve_graph))
    assert answer.status_code == 200
    rid = the_id(answer)
    assert rid not in ("twice-a", "twice-b")
    assert serve_graph.proxy.request_ids[before:] == [rid]
    logs = session_logs()
    wait_for_serve_line(logs, rid)
    assert files_holding(logs, b"twice-a") == files_holding(logs, b"twice-b") == []


def test_an_oversize_id_is_neither_logged_nor_echoed(serve_graph: ServeGraph) -> None:
    logs = session_logs()
    before = logs_size(logs)
    answer = httpx.get(f"{serve_graph.base_url}/v1/models", timeout=60,
                       headers={"x-request-id": "a" * (8 * 1024 * 1024)})
    assert sum(len(k) + len(v) for k, v in answer.headers.raw) < 4096
    if HAPROXY:
        # HAProxy holds a request's headers in one buffer (Ray's default 16 KiB, of which
        # half may be headers) and refuses a longer head itself: Serve never sees it.
        assert answer.status_code == 400
    else:
        assert answer.status_code == 200
        wait_for_serve_line(logs, the_id(answer))
    assert logs_size(logs) - before < 1024 * 1024


def test_an_undecodable_id_is_replaced(serve_graph: ServeGraph) -> None:
    answer = httpx.get(f"{serve_graph.base_url}/v1/models", timeout=60,
                       headers={"x-request-id": b"\xff\xfe"})
    assert answer.status_code == 200
    assert answer.json()["object"] == "list"
    wait_for_serve_line(session_logs(), the_id(answer))


def test_a_client_cannot_set_serves_request_timeout(serve_graph: ServeGraph) -> None:
    answer = httpx.post(f"{serve_graph.base_url}/v1/completions", timeout=60,
                        headers={"x-request-timeout-seconds": "0.001"},
                        json={**completion(serve_graph), "max_tokens": 8})
    assert answer.status_code == 200
    assert answer.json()["usage"]["completion_tokens"] == 8


def test_serves_route_listing_is_closed_and_liveness_open(serve_graph: ServeGraph) -> None:
    routes = httpx.get(f"{serve_graph.base_url}/-/routes", timeout=10)
    assert routes.status_code == 404
    assert routes.json()["error"]["type"] == "NotFoundError"
    assert "reference" not in routes.text and "gateway" not in routes.text
    assert httpx.get(f"{serve_graph.base_url}/-/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_leaves_cancels_the_upstream_whatever_its_headers_ask(
        fleet_app: FleetApp, fakes: dict[str, ServerProcess], stream: bool) -> None:
    """`x-request-disconnect-disabled: ?1` asks Serve to ignore the client's going away:
    honoured, a request left before its first byte keeps its upstream call (and so a
    generation) running for nobody, to its end, or until its first token."""
    fleet_app.deploy(fakes["a"])
    fakes["a"].set_mode(delay_s=5)  # the upstream thinks for 5 s before its first byte
    tag = f"leave-stream-{stream}"
    async with httpx.AsyncClient(timeout=30) as client:
        sent = asyncio.create_task(client.post(
            f"{fleet_app.url}/v1/completions", json=body(tag, stream=stream),
            headers={"x-request-disconnect-disabled": "?1"}))
        deadline = time.monotonic() + 10
        while not fakes["a"].events("request", tag):
            assert time.monotonic() < deadline, "the request never reached the upstream"
            await asyncio.sleep(0.05)
        sent.cancel()  # the client hangs up, no answer yet
        with contextlib.suppress(asyncio.CancelledError):
            await sent
    hung_up = time.monotonic()
    while fleet_app.upstreams()[fakes["a"].url]["in_flight"]:
        assert time.monotonic() - hung_up < 2, "the upstream call outlived its client"
        await asyncio.sleep(0.1)
