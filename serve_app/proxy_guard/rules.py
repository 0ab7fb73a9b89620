"""What the guard takes from a request before Serve reads it: Serve 2.60's control headers,
in every spelling Serve accepts, and its route listing.

The names are Ray's (`ray.serve._private.constants`), copied so that this module imports
no Ray (the HAProxy wrapper runs it at every HAProxy start); tests/unit/test_proxy_guard.py
checks that they still match.
"""

from __future__ import annotations

import json
import os

REQUEST_TIMEOUT = "x-request-timeout-seconds"
"""`SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER`: replaces `http_options.request_timeout_s` for the
request; `0` or less turns the timeout off."""
DISCONNECT_DISABLED = "x-request-disconnect-disabled"
"""`SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER`: `?1` makes Serve ignore the client's
going away, so the request (and its upstream generation) runs on without it."""
MULTIPLEXED_MODEL_ID = "serve_multiplexed_model_id"
"""`SERVE_MULTIPLEXED_MODEL_ID`: routes the request by model id (`-` or `_`, any case)."""
SESSION_ID = os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id")
"""`SERVE_SESSION_ID`: routes the request by session (`-` or `_`, any case)."""

CONTROL_HEADERS = (REQUEST_TIMEOUT, DISCONNECT_DISABLED, MULTIPLEXED_MODEL_ID, SESSION_ID)

ROUTES_PATH = "/-/routes"
"""Serve's route listing: every application's prefix and name, to anyone. `/-/healthz`
stays open: it says only whether the proxy is ready, and probes need it."""
NOT_FOUND = "Not Found"
"""The message of the 404 that answers it, as the gateway answers an unknown route."""


def not_found_body() -> bytes:
    """That 404's body, as `errors.GatewayError` shapes it (for HAProxy, which answers
    without the gateway's code)."""
    error = {"message": NOT_FOUND, "type": "NotFoundError", "param": None, "code": 404}
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def _folded(name: str | bytes) -> bytes:
    raw = name.encode("latin-1") if isinstance(name, str) else name
    return raw.lower().replace(b"-", b"_")


_FOLDED = frozenset(_folded(name) for name in CONTROL_HEADERS)


def is_control(name: bytes) -> bool:
    """Whether a header is one of Serve's control headers, in any case and with `-` or `_`
    (Serve folds both for two of them; the guard folds them for all)."""
    return _folded(name) in _FOLDED


def spellings() -> list[str]:
    """Each control header with `-` and with `_`: HAProxy matches names in any case but
    takes the separators as written."""
    names = {spelling for name in CONTROL_HEADERS
             for spelling in (name.replace("_", "-"), name.replace("-", "_"))}
    return sorted(names)
