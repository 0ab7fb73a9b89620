"""The outermost middleware: every request gets its id and record first, and leaves one
access-log line and its metrics at the end, whatever answered it (a guard, a route, the
error handlers).

The id is the client's one well-formed `X-Request-Id` or a fresh one, and goes back on the
response. Under Serve, the proxy already echoes the id it forwarded; the app then adds the
header only when it had to replace what the proxy forwarded, which `serve_app.proxy_guard`
in the proxy prevents (docs/observability.md).
"""

from __future__ import annotations

import time

import orjson
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api.middleware import app_path
from serve_app.observability import access, metrics, request_id

_MAX_ERROR_BODY = 64 * 1024


def _error_code(body: bytes) -> str | None:
    """`error.code` of an OpenAI-shaped error body, when it is a string."""
    try:
        code = orjson.loads(body).get("error", {}).get("code")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return code if isinstance(code, str) else None


class RequestLogMiddleware:
    """Binds the request id and record for everything below it, and finishes the record
    when the answer has gone."""

    def __init__(self, app: ASGIApp, echo_request_id: bool = True) -> None:
        self.app = app
        self.echo_request_id = echo_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = request_id.sent(scope.get("headers") or [])
        rid = request_id.of_sent(sent)
        request_id.bind(rid)
        # Route templates only (`metrics.route_label`): no label value comes from a request.
        record = access.start(rid, metrics.route_label(app_path(scope)))
        echo = self.echo_request_id or sent != [rid.encode()]
        error_body = bytearray()

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                if echo:
                    MutableHeaders(scope=message)[request_id.HEADER] = rid
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body and record.first_byte is None:
                    record.first_byte = time.perf_counter()
                if record.status >= 400 and len(error_body) < _MAX_ERROR_BODY:
                    error_body.extend(body)
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if error_body:
                record.error_code = _error_code(bytes(error_body))
            access.finish(record)
