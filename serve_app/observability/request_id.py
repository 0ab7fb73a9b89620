"""The request id: one per request, taken from a well-formed `X-Request-Id` or made here,
and known to everything that serves the request through a context variable.

Serve's proxy already sets `x-request-id` on every request it forwards (the client's value,
or a fresh one) and echoes it on the response; Serve's replica logs carry it too. The
gateway uses that id when it is well-formed, so the client, Serve's logs, the gateway's
own logs, error bodies and the upstream all see one id.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

HEADER = "x-request-id"
_WELL_FORMED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=+/-]{0,127}")

_current: ContextVar[str | None] = ContextVar("serve_app_request_id", default=None)


def well_formed(value: str | None) -> bool:
    """1 to 128 characters: letters, digits and `._:=+/-`, starting with a letter or digit
    (UUIDs, ULIDs, trace ids); nothing that could carry text into a log."""
    return value is not None and _WELL_FORMED.fullmatch(value) is not None


def accept_or_make(value: str | None) -> str:
    """The client's id when well-formed, else a fresh one."""
    return value if value is not None and well_formed(value) else uuid.uuid4().hex


def current() -> str | None:
    """The id of the request being served here, if any."""
    return _current.get()


def bind(request_id: str | None) -> None:
    """Make `request_id` the current one for this task and the tasks it starts."""
    _current.set(request_id)
