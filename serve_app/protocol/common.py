"""What every API answers alike: errors, model cards, usage, and the end of a stream."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SSE_DONE = b"data: [DONE]\n\n"
"""The last event of every completion stream."""

LOGPROB_FLOOR = -9999.0
"""JSON has no -inf: a token the model rules out reports this logprob (vLLM's floor)."""


def sse_event(data: bytes) -> bytes:
    """One server-sent event carrying `data` (a JSON chunk)."""
    return b"data: " + data + b"\n\n"


class ResponseModel(BaseModel):
    """An answer the gateway builds: its own fields only, so a typo cannot add one."""

    model_config = ConfigDict(extra="forbid")


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None
    request_id: str | None = Field(None, description="The request's id, as in its "
                                   "`X-Request-Id` header: quote it when reporting a failure.")


class ErrorResponse(ResponseModel):
    error: ErrorInfo


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "serve_app"
    max_model_len: int | None = None
    parent: str | None = Field(None, description="The model a prompt adapter adapts, as "
                               "vLLM names a LoRA adapter's base; null for a base model.")


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int | None = 0
    total_tokens: int = 0
