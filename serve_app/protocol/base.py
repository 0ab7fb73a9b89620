"""The request models' common ground: strict parsing, refusals by name, shared field types.

Every request field is declared, typed and bounded; a field a model does not declare is
refused as OpenAI's API refuses it, and one it lists in `refused` gets a 400 saying why. A
null value counts as unset. Validators raise `ValueError`s (`errors.InvalidField` to name a
field), never HTTP errors, so every refusal names the field's whole path in the request.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from serve_app.errors import InvalidField

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

TokenId = Annotated[int, Field(ge=0)]
TokenIds = list[TokenId]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]

TEXT_UPSTREAM = "it would carry client text to the upstream"


class RequestModel(BaseModel):
    """Strict types (no `"7"` for 7, no `true` for 1); unknown fields refused by name."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    refused: ClassVar[dict[str, str]] = {}
    """Fields this API knows and does not accept, with the reason the 400 gives."""

    @model_validator(mode="before")
    @classmethod
    def _declared_fields_only(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = cls._respelled({key: value for key, value in data.items() if value is not None})
        known = _declared(cls)
        for key in data:
            if key in known:
                continue
            reason = _refusals(cls).get(key)
            if reason:
                raise InvalidField(key, f"{{param}} is not accepted: {reason}.",
                                   code="unsupported_parameter")
            raise InvalidField(key, "Unrecognized request argument supplied: {param}",
                               code="unrecognized_argument")
        return data

    @classmethod
    def _respelled(cls, data: dict[str, Any]) -> dict[str, Any]:
        """`data` with other spellings of a field under its own name (none by default)."""
        return data


@functools.cache
def _declared(model: type[RequestModel]) -> frozenset[str]:
    """A request model's field names and aliases (worked out once per model, not per
    request: every message and content part of a chat is validated by one)."""
    fields = model.model_fields.values()
    return frozenset(model.model_fields) | {f.alias for f in fields if f.alias}


@functools.cache
def _refusals(model: type[RequestModel]) -> dict[str, str]:
    """`refused` of a model and its bases, the nearest class's reason first."""
    return {key: reason for klass in reversed(model.__mro__)
            for key, reason in getattr(klass, "refused", {}).items()}


def token_id_shape(value: Any, what: str) -> Any:
    """`value` if it is a string, a list of strings, a list of token ids or a list of
    token-id lists; token ids are JSON integers (not strings, floats or booleans)."""

    def token_ids(item: Any) -> bool:
        return isinstance(item, list) and all(type(i) is int and i >= 0 for i in item)

    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and (all(isinstance(v, str) for v in value) or token_ids(value)
                                    or all(token_ids(v) for v in value)):
        return value
    raise PydanticCustomError(
        "prompt_shape", f"{what} must be a string, a list of strings, a list of token ids "
        "(non-negative integers) or a list of token-id lists")
