"""One request's record, filled as it is served, and what becomes of it at the end: one
JSON access-log line and the gateway's request metrics.

The record lives in a context variable that the ingress middleware sets, so the services
add what only they know (the served model, prompt tokens by source, completion tokens,
the backend that answered) without passing it along. It holds counts, names and timings
only: never text, embeddings or keys.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import orjson

from serve_app.observability import metrics

ACCESS_LOGGER = "serve_app.access"
UNKNOWN_MODEL = "unknown"
# Error codes that mean a configured limit refused the request.
_LIMIT_CODES = frozenset({"context_length_exceeded", "too_many_tokens", "request_too_large",
                          "body_timeout"})

access_log = logging.getLogger(ACCESS_LOGGER)


@dataclass
class RequestRecord:
    """What the access log and the metrics say about one request."""

    request_id: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    model: str = UNKNOWN_MODEL
    prompt_tokens_text: int = 0
    prompt_tokens_client_embeds: int = 0
    completion_tokens: int | None = None
    backend: str | None = None
    status: int = 0
    error_code: str | None = None
    first_byte: float | None = None

    def as_log(self, duration_s: float) -> dict[str, Any]:
        return {"request_id": self.request_id, "route": self.route, "status": self.status,
                "model": self.model,
                "prompt_tokens": self.prompt_tokens_text + self.prompt_tokens_client_embeds,
                "prompt_tokens_client_embeds": self.prompt_tokens_client_embeds,
                "completion_tokens": self.completion_tokens,
                "latency_ms": round(duration_s * 1e3, 3), "backend": self.backend,
                "error_code": self.error_code}


_current: ContextVar[RequestRecord | None] = ContextVar("serve_app_request", default=None)


def start(request_id: str, route: str) -> RequestRecord:
    record = RequestRecord(request_id, route)
    _current.set(record)
    return record


def current() -> RequestRecord | None:
    """The record of the request being served here (None outside a request)."""
    return _current.get()


def rejection_reason(status: int, code: str | None) -> str | None:
    """Why the gateway refused a request, as a metric label; None for answers and for
    failures that are not refusals (5xx)."""
    if status == 401 or code == "invalid_api_key":
        return "auth"
    if status == 429 or code == "overloaded":
        return "overload"
    if status in (408, 413) or code in _LIMIT_CODES:
        return "limits"
    if 400 <= status < 500:
        return "bad_input"
    return None


def finish(record: RequestRecord) -> None:
    """The access-log line and the request's metrics."""
    now = time.perf_counter()
    duration = now - record.started
    ttft = None if record.first_byte is None else record.first_byte - record.started
    access_log.info(orjson.dumps(record.as_log(duration)).decode())
    metrics.record_request(record.route, record.model, record.status, duration, ttft)
    metrics.record_tokens(record.prompt_tokens_text, record.prompt_tokens_client_embeds,
                          record.completion_tokens or 0, record.model)
    reason = rejection_reason(record.status, record.error_code)
    if reason is not None:
        metrics.record_rejection(reason)
