"""The `/v1/chat/completions` route, over the app's `ChatService`."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from serve_app.api.chat.serving import ChatService
from serve_app.api.middleware import key_tenant
from serve_app.api.openapi import route_answers
from serve_app.protocol import ChatCompletionResponse

router = APIRouter()


def attach(app: FastAPI, service: ChatService) -> None:
    app.state.chat = service
    app.include_router(router)


def _service(request: Request) -> ChatService:
    service: ChatService = request.app.state.chat
    return service


@router.post("/v1/chat/completions", responses=route_answers(ChatCompletionResponse))
async def chat_completions(request: Request) -> Response:
    return await _service(request).create_chat_completion(await request.body(),
                                                          key_tenant(request.scope))
