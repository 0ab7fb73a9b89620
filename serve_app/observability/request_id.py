"""The request id: one per request, taken from a well-formed `X-Request-Id` or made here,
and known to everything that serves the request through a context variable.

Serve's proxy already sets `x-request-id` on every request it forwards (the client's value,
or a fresh one) and echoes it on the response; Serve's replica logs carry it too. With
`serve_app.proxy_guard` in the proxy, Serve gets an id that passed `of_sent` already;
the gateway applies the same rule again, so the client, Serve's logs, the gateway's own
logs, error bodies and the upstream all see one well-formed id.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Iterable, Sequence
from contextvars import ContextVar

HEADER = "x-request-id"
MAX_LENGTH = 128
_HEADER_BYTES = HEADER.encode()
_WELL_FORMED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=+/-]{0,127}")  # MAX_LENGTH at most

try:
    from ray.serve import context as serve_context
except ImportError:  # the plain cores also run where Ray is not installed (GPU checks)
    serve_context = None  # type: ignore[assignment]

_current: ContextVar[str | None] = ContextVar("serve_app_request_id", default=None)


def well_formed(value: str | None) -> bool:
    """1 to 128 characters: letters, digits and `._:=+/-`, starting with a letter or digit
    (UUIDs, ULIDs, trace ids); nothing that could carry text into a log."""
    return value is not None and _WELL_FORMED.fullmatch(value) is not None


def accept_or_make(value: str | None) -> str:
    """The client's id when well-formed, else a fresh one."""
    return value if value is not None and well_formed(value) else uuid.uuid4().hex


def sent(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """The `X-Request-Id` values among a request's (ASGI) headers, as sent."""
    return [value for name, value in headers if name.lower() == _HEADER_BYTES]


def of_sent(values: Sequence[bytes]) -> str:
    """The id of a request that sent these `X-Request-Id` values: the one value when it is
    well-formed, else a fresh id. Two values are ambiguous (Serve's proxy keeps the last,
    Starlette the first); a long or undecodable one is refused before it is decoded."""
    if len(values) == 1 and len(values[0]) <= MAX_LENGTH and values[0].isascii():
        return accept_or_make(values[0].decode("ascii"))
    return accept_or_make(None)


def current() -> str | None:
    """The id of the request being served here, if any."""
    return _current.get()


def bind(request_id: str | None) -> None:
    """Make `request_id` the current one for this task and the tasks it starts, for the
    gateway and, inside a Serve request, for Serve: Serve's log filter stamps each line
    with its request context's id, and calls through deployment handles carry it on."""
    _current.set(request_id)
    serve_request = serve_context._serve_request_context.get() if serve_context else None
    if request_id and serve_request is not None and serve_request.request_id not in (
            "", request_id):
        serve_context._serve_request_context.set(
            dataclasses.replace(serve_request, request_id=request_id))
