"""The guard as ASGI middleware in Serve's own HTTP servers: Serve's Python proxy, and under
HAProxy each ingress replica's server (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names
`proxy_middlewares`). Serve wraps its own request-id middleware inside it, so Serve reads
a request only after the guard: one well-formed id, no control header, no route listing.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.errors import GatewayError
from serve_app.observability import request_id
from serve_app.proxy_guard import rules

_REQUEST_ID = request_id.HEADER.encode()


def guarded_headers(headers: Sequence[tuple[bytes, bytes]],
                    rid: str) -> list[tuple[bytes, bytes]]:
    """`headers` without Serve's control headers, with `rid` as the one request id."""
    kept = [(name, value) for name, value in headers
            if name.lower() != _REQUEST_ID and not rules.is_control(name)]
    return [*kept, (_REQUEST_ID, rid.encode())]


def _serve_path(scope: Scope) -> str:
    """The path as Serve's proxy matches it (`ASGIProxyRequest.route_path`)."""
    path: str = scope.get("path", "")
    return path[len(scope.get("root_path", "")):]


class ProxyGuardMiddleware:
    """Serve's control headers removed, the request id made one and well-formed, and
    `/-/routes` answered with a 404 in the OpenAI shape, before Serve reads the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        # The client's one well-formed id, or a fresh one in place of a malformed,
        # oversize, undecodable or doubled id.
        rid = request_id.of_sent(request_id.sent(headers))
        scope = {**scope, "headers": guarded_headers(headers, rid)}
        if _serve_path(scope).lower() == rules.ROUTES_PATH:
            await self._not_found(scope, receive, send, rid)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _not_found(scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        request_id.bind(rid)
        error = GatewayError(rules.NOT_FOUND, 404, headers={request_id.HEADER: rid})
        await error.to_response()(scope, receive, send)


def proxy_middlewares() -> list[Middleware]:
    """The callback `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names."""
    return [Middleware(ProxyGuardMiddleware)]
