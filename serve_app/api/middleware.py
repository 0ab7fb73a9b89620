"""ASGI guards in front of every route of the gateway app: the key check (and the tenant it
names), the body read and the concurrency slots, wherever Serve mounts the app.

Serve keeps an application's route prefix in `scope["path"]` and sets `root_path`, so the
guards match the path relative to the mount, as Starlette's router does. Everything is
guarded except `OPEN_PATHS`. Streams pass through untouched.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

import anyio
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.config import LimitsConfig
from serve_app.errors import GatewayError, to_gateway_error
from serve_app.prompts.tenants import api_key_tenant

OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs"})
"""What answers without a key and outside the limits: the liveness check, the OpenAPI
document and its viewer."""

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_TENANT = "serve_app.tenant"
"""The scope key under which `BearerKeyMiddleware` leaves the accepted key's tenant: a key
of the request's own scope (Starlette's `state` dict may be shared lifespan state)."""


def app_path(scope: Scope) -> str:
    """The request path below the app's mount point (Serve's route prefix)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    return path or "/"


def is_open(scope: Scope) -> bool:
    return app_path(scope) in OPEN_PATHS


async def deny(error: GatewayError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer `error` in the OpenAI shape (or close a websocket with a policy violation)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await error.to_response()(scope, receive, send)


def key_tenant(scope: Scope) -> str | None:
    """The tenant of the API key the request was accepted with (`prompts.tenants`); None
    where no key is checked."""
    tenant: str | None = scope.get(_TENANT)
    return tenant


class BearerKeyMiddleware:
    """Like vLLM's `--api-key`, but deny by default: every route but the open ones needs
    `Authorization: Bearer <key>`, sent once. Keys are compared in constant time against
    every accepted key, so timing tells nothing about which key came close. The matched
    key's tenant (a digest, never the key) goes on in the scope (`key_tenant`)."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.tenants = [api_key_tenant(key) for key in self.keys]

    def _matched(self, scope: Scope) -> int | None:
        """The index of the accepted key the request sent, if any."""
        values = [v for k, v in scope.get("headers") or [] if k.lower() == b"authorization"]
        if len(values) != 1:  # two headers are ambiguous: which one would a proxy check?
            return None
        scheme, _, token = values[0].partition(b" ")
        matched = None
        for index, key in enumerate(self.keys):  # no early exit: the same work for every key
            if hmac.compare_digest(token.strip(), key):
                matched = index
        return matched if scheme.lower() == b"bearer" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        matched = self._matched(scope)
        if matched is not None:
            scope[_TENANT] = self.tenants[matched]
        elif not is_open(scope):
            await deny(GatewayError(
                "Missing or incorrect API key; send `Authorization: Bearer <key>`.", 401,
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}),
                scope, receive, send)
            return
        await self.app(scope, receive, send)


def _is_json(scope: Scope) -> bool:
    value = dict(scope.get("headers") or []).get(b"content-type", b"")
    return value.split(b";", 1)[0].strip().lower() == b"application/json"


class RequestGuardMiddleware:
    """Each guarded request is read whole before it takes a slot:
    - a body needs a JSON content type (415), so a browser cannot post one cross-origin
      without a CORS preflight, which this app never grants;
    - the body must arrive within `limits.body_timeout_s` (408) and stay under
      `limits.max_body_bytes` (413, refused unread when declared);
    - then one of `limits.max_concurrent_requests` slots, held until the answer (streams
      too) has gone; beyond, an OpenAI-shaped 429 with Retry-After, which the SDK retries.
    So clients that trickle their bodies hold no slot, and cannot lock out the ones that
    have sent theirs. The app gets the body as one message."""

    def __init__(self, app: ASGIApp, limits: LimitsConfig) -> None:
        self.app = app
        self.limits = limits
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
        except GatewayError as error:
            await deny(error, scope, receive, send)
            return
        if self.in_flight >= self.limits.max_concurrent_requests:
            await deny(GatewayError("The gateway is overloaded; retry shortly.", 429,
                                    code="overloaded", headers={"Retry-After": "1"}),
                       scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        if scope["method"] in _BODY_METHODS and not _is_json(scope):
            raise GatewayError("The request body must be JSON, sent with "
                               "`Content-Type: application/json`.", 415,
                               code="unsupported_media_type")
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        try:
            # One deadline for the whole body (no timer per message: a large body arrives
            # in hundreds of them).
            with anyio.fail_after(self.limits.body_timeout_s):
                return await _whole_body(receive, limit)
        except TimeoutError:
            raise GatewayError(
                f"The request body did not arrive within limits.body_timeout_s "
                f"({self.limits.body_timeout_s:g} s).", 408, code="body_timeout") from None


async def _whole_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise to_gateway_error(ClientDisconnect())
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(f"The request body is larger than {limit} bytes.", 413,
                        code="request_too_large")


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the whole body first, then the client's own messages (a
    stream's relay listens there for the client going away)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
