"""Request ids through Serve: one `X-Request-Id` on every answer (Serve's proxy echoes it, the
app does not add a second), the same id in error bodies, upstream, Serve's replica logs and
the gateway's JSON access log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ServeGraph

pytestmark = pytest.mark.integration


def access_lines(logs: Path) -> list[dict[str, object]]:
    return [json.loads(line) for path in (logs / "serve").glob("serve_app_access_*.jsonl")
            for line in path.read_text().splitlines() if line]


def test_one_id_from_client_to_upstream_and_back(serve_graph: ServeGraph) -> None:
    import ray._private.worker as worker

    before = len(serve_graph.proxy.request_ids)
    answer = httpx.post(f"{serve_graph.base_url}/v1/completions", timeout=60,
                        headers={"x-request-id": "ticket-serve-1"},
                        json={"model": serve_graph.model, "prompt": "France", "max_tokens": 2})
    assert answer.status_code == 200
    assert answer.headers.get_list("x-request-id") == ["ticket-serve-1"]
    assert serve_graph.proxy.request_ids[before:] == ["ticket-serve-1"]

    made = httpx.post(f"{serve_graph.base_url}/v1/completions", timeout=60,
                      json={"model": serve_graph.model, "prompt": "x", "max_tokens": -1})
    [made_id] = made.headers.get_list("x-request-id")
    assert made.status_code == 400 and made.json()["error"]["request_id"] == made_id

    malformed = httpx.get(f"{serve_graph.base_url}/v1/models", timeout=60,
                          headers={"x-request-id": "not well formed"})
    # Serve's proxy echoes what it was sent; the gateway adds the id it used instead.
    ids = malformed.headers.get_list("x-request-id")
    assert "not well formed" in ids and len(ids) == 2

    logs = Path(worker._global_node.get_session_dir_path()) / "logs"
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
    replica_logs = b"".join(p.read_bytes() for p in (logs / "serve").glob("replica_*.log"))
    assert b"ticket-serve-1" in replica_logs  # Serve's own lines for the request
