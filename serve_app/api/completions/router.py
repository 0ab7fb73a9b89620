"""The `/v1/completions` route, over the app's `CompletionsService`."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from serve_app.api.completions.serving import CompletionsService
from serve_app.api.middleware import key_tenant
from serve_app.api.openapi import route_answers
from serve_app.protocol import CompletionResponse

router = APIRouter()


def attach(app: FastAPI, service: CompletionsService) -> None:
    app.state.completions = service
    app.include_router(router)


def _service(request: Request) -> CompletionsService:
    service: CompletionsService = request.app.state.completions
    return service


@router.post("/v1/completions", responses=route_answers(CompletionResponse))
async def completions(request: Request) -> Response:
    return await _service(request).create_completion(await request.body(),
                                                     key_tenant(request.scope))
