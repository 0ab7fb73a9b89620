"""The `/v2/embed` route, over the app's `CohereEmbedService`."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from serve_app.api.cohere.serving import CohereEmbedService
from serve_app.api.openapi import route_answers
from serve_app.protocol import CohereEmbedResponse

router = APIRouter()


def attach(app: FastAPI, service: CohereEmbedService) -> None:
    app.state.cohere = service
    app.include_router(router)


def _service(request: Request) -> CohereEmbedService:
    service: CohereEmbedService = request.app.state.cohere
    return service


@router.post("/v2/embed", responses=route_answers(CohereEmbedResponse))
async def cohere_embed(request: Request) -> Response:
    return await _service(request).embed(await request.body())
