"""How upstream failures become OpenAI errors, and whether another backend may be tried.

Before the first byte of an answer has gone to the client, a failed attempt is an
`AttemptFailed`: retried on another backend when nothing was taken on (connect errors, 429,
502, 503, 504), else answered as an error status. After it, a `StreamFailed` ends the
stream with an error event.

Each failure also has a kind, from a fixed set, for the metrics: an attempt's outcome
(`AttemptFailed.outcome`) and what set a backend aside (`failure_kind`).
"""

from __future__ import annotations

import email.utils
from datetime import datetime, timezone
from typing import Any

import httpx
import orjson

from serve_app.errors import GatewayError

RETRIED_STATUSES = frozenset({429, 502, 503, 504})
"""Statuses that mean the backend did not take the request on: safe to send elsewhere."""

# The reasons the dispatcher and the probes give `Fleet.failed`, by kind (the metrics'
# `FAILURE_KINDS`): "HTTP <status>" is "http_5xx", a probe's is "probe_failed", and an
# httpx exception's class name (the connection broke) is "transport_error".
_FAILURE_KINDS = {
    "timed out": "timeout", "no first token in time": "timeout", "stream stalled": "timeout",
    "connect error": "unreachable",
    "empty stream": "bad_stream", "stream ended before [DONE]": "bad_stream",
}
# An attempt's outcome when the backend gave no HTTP status, by the error's code.
_NO_STATUS_OUTCOMES = {"upstream_timeout": "timeout", "upstream_unreachable": "unreachable"}


def failure_kind(reason: str) -> str:
    """The kind of a failure reason given to `Fleet.failed` or found by a probe."""
    if reason.startswith("probe"):
        return "probe_failed"
    if reason.startswith("HTTP "):
        return "http_5xx"
    return _FAILURE_KINDS.get(reason, "transport_error")


class AttemptFailed(Exception):
    """One attempt's failure before any byte went to the client; `retry` if another may.
    `upstream_status`: the backend's own HTTP status, when it answered one."""

    def __init__(self, error: GatewayError, retry: bool,
                 upstream_status: int | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry = retry
        self.upstream_status = upstream_status

    @property
    def outcome(self) -> int | str:
        """The attempt's `status` in the metrics: the backend's HTTP status, else timeout,
        unreachable or error (the connection broke, or the answer was unusable)."""
        if self.upstream_status is not None:
            return self.upstream_status
        return _NO_STATUS_OUTCOMES.get(self.error.code or "", "error")


class StreamFailed(Exception):
    """A stream's failure after its first byte: answered as an error event, then `[DONE]`."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


def retry_after_seconds(value: str | None) -> float:
    """Retry-After as seconds (delta-seconds or an HTTP date); 1 when absent or unreadable."""
    if not value:
        return 1.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 1.0
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def upstream_error(status: int, body: bytes) -> GatewayError:
    """The upstream's own message for its 4xx; a 5xx is named and kept as 502, 503 or 504."""
    message = "upstream error"
    try:
        parsed = orjson.loads(body)
        detail = parsed.get("error", parsed) if isinstance(parsed, dict) else {}
        if isinstance(detail, dict) and isinstance(detail.get("message"), str):
            message = detail["message"]
        elif isinstance(detail, str):
            message = detail
    except orjson.JSONDecodeError:
        pass
    if status == 429:
        return GatewayError(message, 429, code="upstream_rate_limited")
    if 400 <= status < 500:
        return GatewayError(message, status, code="upstream_error")
    return GatewayError(f"upstream failed with HTTP {status}: {message}",
                        status if status in RETRIED_STATUSES else 502, code="upstream_error")


def transport_error(exc: httpx.HTTPError, when: str) -> GatewayError:
    if isinstance(exc, httpx.TimeoutException):
        return GatewayError(f"upstream timed out {when}", 504, code="upstream_timeout")
    return GatewayError(f"upstream connection lost {when} ({type(exc).__name__})", 502,
                        code="upstream_error")


def bad_upstream(message: str, status: int = 502, code: str = "upstream_error") -> GatewayError:
    return GatewayError(message, status, code=code)


def error_event(payload: dict[str, Any]) -> GatewayError:
    """An upstream stream's error event, as the error of a whole answer: its own status
    (the error's `code`) where that is one, else 502."""
    detail = payload.get("error")
    code = detail.get("code") if isinstance(detail, dict) else None
    status = code if isinstance(code, int) and 400 <= code < 600 else 502
    return upstream_error(status, orjson.dumps(payload))
