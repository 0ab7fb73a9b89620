"""The reference upstream's HTTP app: vLLM's `/v1/completions`, `/v1/models` and `/health`
over a `ReferenceServer`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from serve_app.endpoint import add_error_handlers, answer, json_response
from serve_app.protocol import CompletionRequest, ModelCard, ModelList
from serve_app.reference.server import ReferenceServer


def create_reference_app(server: ReferenceServer) -> FastAPI:
    app = FastAPI(title="serve_app reference upstream", docs_url=None, redoc_url=None)

    add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=server.served_name,
                                         max_model_len=server.max_model_len)])

    async def respond(request: CompletionRequest) -> Response:
        if request.stream:
            return StreamingResponse(await server.stream(request),
                                     media_type="text/event-stream")
        return json_response(await server.complete(request))

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        return await answer(await raw.body(), CompletionRequest, respond)

    return app
