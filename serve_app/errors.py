"""OpenAI-shaped errors: one exception type, one body builder, one exception mapper.

Every error the gateway answers has the body `{"error": {"message", "type", "param",
"code", "request_id"}}` and an HTTP status the OpenAI SDK maps to its exception classes.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from serve_app.observability import request_id

try:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    _OVERLOADED: tuple[type[BaseException], ...] = (BackPressureError,)
    # A replica that died (ActorDiedError is a RayActorError) is unavailable, not a bug here:
    # Serve starts another, and the SDK retries a 503.
    _UNAVAILABLE: tuple[type[BaseException], ...] = (DeploymentUnavailableError,
                                                     RayActorError)
except ImportError:  # the plain cores also run where Ray is not installed (GPU checks)
    _OVERLOADED = _UNAVAILABLE = ()

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def shown(name: str) -> str:
    """A client's field name as an error quotes it: bounded, never a whole payload."""
    return name if len(name) <= 64 else name[:61] + "..."



def item_param(param: str, index: int, listed: bool) -> str:
    """An item's path in the request, which its refusal names: the field `param` itself,
    or its item (`prompt.1`, `input.2`, `texts.2`) where the field is a `listed` one."""
    return f"{param}.{index}" if listed else param

class GatewayError(Exception):
    """A request failure with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status in _TYPE_BY_STATUS:
            return _TYPE_BY_STATUS[self.status]
        return HTTPStatus(self.status).phrase.replace(" ", "") + "Error"

    def to_dict(self) -> dict[str, Any]:
        error = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code if self.code is not None else self.status,
        }
        rid = request_id.current()
        if rid is not None:  # the id to quote in a ticket, wherever the body is read
            error["request_id"] = rid
        return {"error": error}

    def to_body(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def to_response(self) -> Response:
        return Response(
            self.to_body(),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )

    def to_sse_event(self) -> bytes:
        return b"data: " + self.to_body() + b"\n\n"


def model_not_found(name: str) -> GatewayError:
    """The 404 for a model this server does not serve, as OpenAI answers it."""
    return GatewayError(f"The model `{name}` does not exist.", 404, param="model",
                        code="model_not_found")


def model_on_other_api(name: str, serves: str, routes: str) -> GatewayError:
    """The 400 for a served model asked for on an API it does not serve: it exists, so
    this is not `model_not_found`'s 404."""
    return GatewayError(f"The model `{name}` serves {serves} only; send it to {routes}.", 400,
                        param="model", code="model_not_supported")


class InvalidField(ValueError):
    """A request validator's refusal of one field of the model it validates.

    Validators raise it, never a `GatewayError`: it is a `ValueError`, so pydantic records
    it at the model's location in the request, and `from_validation_error` adds the field,
    so the error names the field's whole path (`messages.0.foo`, not `foo`). `message`
    writes that path as `{param}` where it quotes it.
    """

    def __init__(self, field: str, message: str, *, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _field_parts(loc: tuple[int | str, ...]) -> list[str]:
    """`stop, 0`, not `stop, list[constrained-str], 0`: pydantic names each member of a
    union it tried in the location (tagged unions' tags are bracketed as those names are:
    `protocol.chat.ContentPart`); the client's field path is the rest."""
    return [str(part) if isinstance(part, int) else shown(part) for part in loc
            if isinstance(part, int) or not (part in _TYPE_TAGS or set(part) & set("[]-"))]


def from_validation_error(exc: ValidationError) -> GatewayError:
    """Pydantic's error as a 400 whose `param` is the field's dotted path (never its value).

    Of several errors, the deepest: a union reports one per member it tried, and the
    deepest is in the member the client meant (`messages.0.content.1.text`, not
    `messages.0.content` for not being a string).
    """
    errors = exc.errors(include_url=False, include_input=False)
    deepest = max(errors, key=lambda error: len(_field_parts(error["loc"])))
    refusal = deepest.get("ctx", {}).get("error")
    if isinstance(refusal, InvalidField):
        path = ".".join([*_field_parts(deepest["loc"]), shown(refusal.field)])
        return GatewayError(refusal.message.replace("{param}", path), 400, param=path,
                            code=refusal.code)
    location = ".".join(_field_parts(deepest["loc"])) or None
    # A validator's own ValueError in its words, without pydantic's "Value error, ".
    message = str(refusal) if isinstance(refusal, ValueError) else deepest["msg"]
    if location:
        message = f"{location}: {message}"
    return GatewayError(message, 400, param=location, code="invalid_request")


def to_gateway_error(exc: BaseException) -> GatewayError:
    """Map any exception raised while serving a request to an OpenAI error.

    Ray wraps replica exceptions; `RayTaskError` subclasses the original type, so these
    isinstance checks see through it.
    """
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, orjson.JSONDecodeError):
        return GatewayError("The request body is not valid JSON.", 400, code="invalid_json")
    if isinstance(exc, _OVERLOADED):
        return GatewayError(
            "The gateway is overloaded; retry shortly.",
            429,
            code="overloaded",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, _UNAVAILABLE):
        return GatewayError("A gateway component is unavailable.", 503, code="unavailable")
    if isinstance(exc, ClientDisconnect):
        # The client left before its body arrived: nobody reads the answer, nothing failed.
        logger.debug("client disconnected before sending its whole request")
        return GatewayError("The client closed the request.", 400, code="client_disconnected")
    # Messages of unexpected exceptions may quote request data: log the type only.
    logger.error("internal error while serving a request: %s", type(exc).__name__)
    return GatewayError("Internal server error.", 500, code="internal_error")
