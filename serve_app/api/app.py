"""The gateway's FastAPI app: its guards and error handlers, and each API's router over its
service (one package per API: `health`, `models`, `completions`, `chat`, `embeddings`,
`cohere`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serve_app.api import chat, cohere, completions, embeddings, health, models
from serve_app.api.middleware import BearerKeyMiddleware, RequestGuardMiddleware
from serve_app.api.openapi import document_request_bodies
from serve_app.api.request_log import RequestLogMiddleware
from serve_app.api.served_model import ServedModel
from serve_app.endpoint import add_error_handlers
from serve_app.protocol import (
    ChatCompletionRequest,
    CohereEmbedRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from serve_app.sentence.service import InProcessEncoderClient, SentenceService


def create_gateway_app(served: ServedModel,
                       sentence: SentenceService | None = None,
                       api_keys: Sequence[str] = (), echo_request_id: bool = True) -> FastAPI:
    """The ingress app; with `api_keys`, the API routes need one of them as a Bearer key.

    `echo_request_id=False` where a proxy in front already returns the request's id
    (Serve's does), so the response does not carry it twice."""
    sentence = sentence or SentenceService({}, InProcessEncoderClient({}),
                                           [served.served_name])
    cohere_service = cohere.CohereEmbedService(sentence)

    @asynccontextmanager
    async def start(_: FastAPI) -> AsyncIterator[None]:
        # int8 / uint8 ranges, in the background: the replica is ready at once
        cohere_service.calibrate()
        yield

    app = FastAPI(title="serve_app gateway",
                  description="OpenAI-compatible completions and chat over prompt embeddings, "
                              "and sentence embeddings (OpenAI and Cohere APIs).",
                  redoc_url=None, swagger_ui_oauth2_redirect_url=None, lifespan=start)
    # The last added is outermost: the request gets its id, then the key is checked, then
    # the body is read (under its cap and deadline), then the request takes a slot.
    app.add_middleware(RequestGuardMiddleware, limits=served.limits)
    if api_keys:
        app.add_middleware(BearerKeyMiddleware, keys=api_keys)
    # Outermost of all: the refusals above get an id, a log line and their metrics too.
    app.add_middleware(RequestLogMiddleware, echo_request_id=echo_request_id)

    add_error_handlers(app)

    # In the OpenAPI document's order.
    health.attach(app, health.HealthService(served.pipeline, served.privacy,
                                            bool(api_keys) and served.tenants_by_key))
    models.attach(app, models.ModelsService(served, sentence))
    completions.attach(app, completions.CompletionsService(served))
    chat.attach(app, chat.ChatService(served))
    embeddings.attach(app, embeddings.EmbeddingsService(sentence))
    cohere.attach(app, cohere_service)

    document_request_bodies(app, {
        "/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
        "/v1/embeddings": EmbeddingRequest, "/v2/embed": CohereEmbedRequest,
    })
    return app
