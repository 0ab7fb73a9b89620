"""The gateway's OpenAPI document: each POST route's request model and answers.

Routes read their bodies as bytes (see `endpoint`), so FastAPI cannot see their models; they
are added to `/openapi.json` here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from serve_app.protocol import ErrorResponse


def route_answers(model: type[BaseModel] | None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of a POST route: its answer model and the OpenAI error shape."""
    ok: dict[str, Any] = {"description": "The answer (JSON, or SSE when `stream` is set)."}
    if model is not None:
        ok["model"] = model
    return {200: ok, "4XX": {"model": ErrorResponse, "description": "OpenAI-shaped error."},
            "5XX": {"model": ErrorResponse, "description": "OpenAI-shaped error."}}


def document_request_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Routes read their JSON by hand (fast, and errors stay OpenAI-shaped), so FastAPI
    cannot see their bodies; add the protocol models to `/openapi.json` ourselves."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in bodies.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
