"""The `/v1/models` routes, over the app's `ModelsService`."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request

from serve_app.api.models.serving import ModelsService
from serve_app.api.openapi import route_answers
from serve_app.protocol import ModelCard, ModelList

router = APIRouter()


def attach(app: FastAPI, service: ModelsService) -> None:
    app.state.models = service
    app.include_router(router)


def _service(request: Request) -> ModelsService:
    service: ModelsService = request.app.state.models
    return service


@router.get("/v1/models")
async def models(request: Request) -> ModelList:
    return _service(request).list_models()


@router.get("/v1/models/{model_id:path}", responses=route_answers(ModelCard))
async def model(request: Request, model_id: str) -> ModelCard:
    """One model, as OpenAI's `models.retrieve` asks for it."""
    return _service(request).model(model_id)
