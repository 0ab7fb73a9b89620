"""The gateway's FastAPI app: guards, error handlers and routes, each a line or two over
the completions, chat and sentence-embeddings services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response

from serve_app.api import chat, cohere, completions, embeddings
from serve_app.api.middleware import BearerKeyMiddleware, RequestGuardMiddleware
from serve_app.api.openapi import document_request_bodies, route_answers
from serve_app.api.readiness import Readiness, starting
from serve_app.api.request_log import RequestLogMiddleware
from serve_app.api.served_model import ServedModel
from serve_app.endpoint import add_error_handlers
from serve_app.errors import model_not_found
from serve_app.prompts.transforms import describe as describe_transform
from serve_app.protocol import (
    ChatCompletionRequest,
    CohereEmbedRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
)
from serve_app.sentence.service import InProcessEncoderClient, SentenceService


def create_gateway_app(service: ServedModel,
                       sentence: SentenceService | None = None,
                       api_keys: Sequence[str] = (), echo_request_id: bool = True) -> FastAPI:
    """The ingress app; with `api_keys`, the API routes need one of them as a Bearer key.

    `echo_request_id=False` where a proxy in front already returns the request's id
    (Serve's does), so the response does not carry it twice."""
    sentence = sentence or SentenceService({}, InProcessEncoderClient({}),
                                           [service.served_name])
    cohere_service = cohere.CohereEmbedService(sentence)
    calibrate = cohere_service.calibrate

    @asynccontextmanager
    async def start(_: FastAPI) -> AsyncIterator[None]:
        calibrate()  # int8 / uint8 ranges, in the background: the replica is ready at once
        yield

    app = FastAPI(title="serve_app gateway",
                  description="OpenAI-compatible completions and chat over prompt embeddings, "
                              "and sentence embeddings (OpenAI and Cohere APIs).",
                  redoc_url=None, swagger_ui_oauth2_redirect_url=None, lifespan=start)
    # The last added is outermost: the request gets its id, then the key is checked, then
    # the body is read (under its cap and deadline), then the request takes a slot.
    app.add_middleware(RequestGuardMiddleware, limits=service.limits)
    if api_keys:
        app.add_middleware(BearerKeyMiddleware, keys=api_keys)
    # Outermost of all: the refusals above get an id, a log line and their metrics too.
    app.add_middleware(RequestLogMiddleware, echo_request_id=echo_request_id)

    add_error_handlers(app)

    privacy = {"transform": describe_transform(service.privacy.transform),
               "tenant": "api_key" if api_keys and service.tenants_by_key else "shared"}

    readiness = Readiness(service.pipeline)

    @app.get("/health", response_model=None, responses={
        503: {"description": "Starting: no upstream backend has answered yet."}})
    async def health() -> dict[str, Any] | Response:
        """Readiness: 503 until an upstream backend has answered. Open to all, so it says
        nothing of the transform (`/health/privacy`)."""
        if not await readiness.check():
            return starting()
        return {"status": "ok"}

    @app.get("/health/privacy")
    async def privacy_health() -> dict[str, Any]:
        """The prompt transform the embeddings get and who shares keyed rows (`tenant`):
        behind the key like every route that is not open; never the key itself."""
        return privacy

    # A load balancer's HEAD check: the same status, no body.
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False,
                      response_model=None)

    @app.get("/health/upstreams")
    async def upstreams() -> dict[str, Any]:
        """Each upstream backend's state as the answering Dispatcher replica sees it."""
        return {"object": "list", "data": await service.pipeline.upstream_status()}

    def model_cards() -> list[ModelCard]:
        return [service.model_card(), *sentence.model_cards()]

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=model_cards())

    @app.get("/v1/models/{model_id:path}", responses=route_answers(ModelCard))
    async def model(model_id: str) -> ModelCard:
        """One model, as OpenAI's `models.retrieve` asks for it."""
        for card in model_cards():
            if card.id == model_id:
                return card
        raise model_not_found(model_id)

    completions.attach(app, completions.CompletionsService(service))
    chat.attach(app, chat.ChatService(service))
    embeddings.attach(app, embeddings.EmbeddingsService(sentence))
    cohere.attach(app, cohere_service)

    document_request_bodies(app, {
        "/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
        "/v1/embeddings": EmbeddingRequest, "/v2/embed": CohereEmbedRequest,
    })
    return app
