"""One way to answer a JSON route: parse the body, validate it into its request model, call
the handler, and map whatever fails to an OpenAI-shaped error; and the same mapping for
failures outside the routes.

Routes read their bodies as bytes (the guard middleware has already read them whole) and
parse them with orjson, refusing repeated keys (`json_body`): fast, and every parse or
validation failure stays OpenAI-shaped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import FastAPI, Request
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import Response

from serve_app import json_body
from serve_app.errors import GatewayError, to_gateway_error

RequestT = TypeVar("RequestT", bound=BaseModel)


def json_response(answer: BaseModel) -> Response:
    """A typed answer as JSON, every field included: the models' defaults are what the
    APIs send."""
    return Response(answer.model_dump_json(by_alias=True), media_type="application/json")


async def answer(body: bytes, model: type[RequestT],
                 handler: Callable[[RequestT], Awaitable[Response]]) -> Response:
    """`handler`'s response to the request in `body`, or the error it comes to."""
    try:
        return await handler(model.model_validate(json_body.loads(body)))
    except Exception as exc:
        return to_gateway_error(exc).to_response()


def add_error_handlers(app: FastAPI) -> None:
    """Every failure outside a route's own handling answered in the OpenAI shape: unknown
    routes and methods, `GatewayError`s raised by dependencies, anything unexpected."""

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> Response:
        return GatewayError(str(exc.detail), exc.status_code).to_response()

    @app.exception_handler(GatewayError)
    async def _refused(_: Request, exc: GatewayError) -> Response:
        return exc.to_response()

    @app.exception_handler(Exception)
    async def _error(_: Request, exc: Exception) -> Response:
        return to_gateway_error(exc).to_response()
