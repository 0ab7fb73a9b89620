"""The `/v1/embeddings` route, over the app's `EmbeddingsService`."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from serve_app.api.embeddings.serving import EmbeddingsService
from serve_app.api.openapi import route_answers
from serve_app.protocol import EmbeddingResponse

router = APIRouter()


def attach(app: FastAPI, service: EmbeddingsService) -> None:
    app.state.embeddings = service
    app.include_router(router)


def _service(request: Request) -> EmbeddingsService:
    service: EmbeddingsService = request.app.state.embeddings
    return service


@router.post("/v1/embeddings", responses=route_answers(EmbeddingResponse))
async def openai_embeddings(request: Request) -> Response:
    return await _service(request).create_embedding(await request.body())
