"""Bearer-key check for the ingress, as ASGI middleware (streams pass through untouched).

Like vLLM's `--api-key`, it guards the API routes (`/v1/...`, `/v2/...`), and also
`/health/upstreams`, which names the backends; `/health` and the OpenAPI document stay
open. Keys are compared in constant time, against every accepted key, so timing tells
nothing about which key came close.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.errors import GatewayError

_GUARDED_PREFIXES = ("/v1/", "/v2/", "/health/upstreams")


class BearerKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]

    def _accepted(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        matched = False
        for key in self.keys:  # no early exit: the same work for every key
            matched |= hmac.compare_digest(token.strip(), key)
        return scheme.lower() == b"bearer" and matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["path"].startswith(_GUARDED_PREFIXES)
        if guarded and not self._accepted(scope):
            error = GatewayError(
                "Missing or incorrect API key; send `Authorization: Bearer <key>`.", 401,
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error.to_response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
