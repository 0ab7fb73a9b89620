"""Request limits from `LimitsConfig`, checked before any heavy work.

The body cap is ASGI middleware: a declared `content-length` over the cap is refused before
a byte is read, and a body that streams past it is cut off as it arrives.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.config import LimitsConfig
from serve_app.errors import GatewayError


class BodyTooLarge(GatewayError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than {limit} bytes.", 413,
                         code="request_too_large")


def check_items(count: int, limits: LimitsConfig, param: str) -> None:
    if count > limits.max_items:
        raise GatewayError(f"{param} has {count} items; at most {limits.max_items} are "
                           "accepted in one request.", 400, param=param)


def check_sampling(n: int, max_tokens: int | None, limits: LimitsConfig) -> None:
    if n > limits.max_n:
        raise GatewayError(f"n is {n}; at most {limits.max_n} samples per prompt are "
                           "accepted.", 400, param="n")
    if max_tokens is not None and limits.max_tokens is not None and (
            max_tokens > limits.max_tokens):
        raise GatewayError(f"max_tokens is {max_tokens}; at most {limits.max_tokens} is "
                           "accepted.", 400, param="max_tokens")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await BodyTooLarge(self.max_bytes).to_response()(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched_send)
        except BodyTooLarge as exc:
            if not started:  # bodies are read before answering, so this is the usual case
                await exc.to_response()(scope, receive, send)


class ConcurrencyLimitMiddleware:
    """At most `limit` API requests in flight per replica (streams count until they end);
    the next is answered at once with an OpenAI-shaped 429 and Retry-After, which the
    OpenAI SDK retries. Serve's own overflow answer has a plain-text body; this keeps
    overload inside the ingress, in the API's own shape."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(("/v1/", "/v2/")):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            error = GatewayError("The gateway is overloaded; retry shortly.", 429,
                                 code="overloaded", headers={"Retry-After": "1"})
            await error.to_response()(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
