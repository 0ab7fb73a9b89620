"""A real Prometheus scraping the session's local Ray every second, beside the integration
tier's Serve graph (deployed from serve_config.yaml, its upstream behind a recording proxy).

The server is Debian's `prometheus` package (`apt-get install prometheus`; `.ci/run`
installs it). Without the binary the tier is skipped, unless SERVE_APP_REQUIRE_PROMETHEUS=1
(as in CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

# The integration tier's session fixtures, shared: one Ray and one Serve graph per session.
from tests.integration.conftest import serve_graph  # noqa: F401
from tests.upstream_servers import free_port

REQUIRE_ENV = "SERVE_APP_REQUIRE_PROMETHEUS"
SCRAPE_INTERVAL = "1s"
START_TIMEOUT_S = 60.0


@dataclass
class Prometheus:
    url: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (a failed query raises)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=30)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (promql, body)
        assert body["data"]["resultType"] == "vector", (promql, body["data"]["resultType"])
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        response = httpx.get(f"{self.url}/api/v1/label/{label}/values",
                             params={"match[]": match}, timeout=30)
        values: list[str] = response.json()["data"]
        return values


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        reason = ("no `prometheus` binary on PATH: install Debian's package "
                  "(`apt-get install --no-install-recommends prometheus`; docs/observability.md)")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="session")
def prometheus(serve_graph, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:  # type: ignore[no-untyped-def]  # noqa: F811
    import ray._private.worker as worker

    binary = prometheus_binary()
    home = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [{"job_name": "ray", "static_configs": [
            {"targets": [f"127.0.0.1:{worker._global_node.metrics_export_port}"]}]}],
    }
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (home / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={home / 'prometheus.yml'}",
         f"--storage.tsdb.path={home / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, home / "prometheus.log")
        yield Prometheus(url)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"prometheus not ready in {START_TIMEOUT_S:g} s: {log.read_text()[-2000:]}")
