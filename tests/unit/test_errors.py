"""Exception -> OpenAI error mapping for failures that come out of Ray Serve."""

from __future__ import annotations

import logging

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.requests import ClientDisconnect

from serve_app.errors import to_gateway_error


def test_backpressure_is_429_with_retry_after() -> None:
    error = to_gateway_error(BackPressureError(num_queued_requests=9, max_queued_requests=8))
    assert error.status == 429
    assert error.headers["Retry-After"] == "1"
    assert error.to_dict()["error"]["type"] == "RateLimitError"


def test_unavailable_deployment_is_503() -> None:
    unavailable = DeploymentUnavailableError(DeploymentID("Embedder", "gateway"))
    assert to_gateway_error(unavailable).status == 503


def test_unexpected_exception_is_500_without_its_message() -> None:
    error = to_gateway_error(RuntimeError("secret prompt text"))
    assert error.status == 500
    assert "secret" not in error.message


def test_client_leaving_mid_body_is_not_logged_as_an_internal_error(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="serve_app.errors"):
        error = to_gateway_error(ClientDisconnect())
    assert error.code == "client_disconnected"
    assert error.status == 400
    assert error.to_dict()["error"]["type"]
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
