"""The `/health` routes, over the app's `HealthService`: `/health` open to all (GET, and
HEAD for load balancers), `/health/privacy` and `/health/upstreams` behind the key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from serve_app.api.health.serving import HealthService

router = APIRouter()


def attach(app: FastAPI, service: HealthService) -> None:
    app.state.health = service
    app.include_router(router)


def _service(request: Request) -> HealthService:
    service: HealthService = request.app.state.health
    return service


@router.get("/health", response_model=None, responses={
    503: {"description": "Starting: no upstream backend has answered yet."}})
async def health(request: Request) -> dict[str, Any] | Response:
    """Readiness: 503 until an upstream backend has answered. Open to all, so it says
    nothing of the transform (`/health/privacy`)."""
    return await _service(request).health()


@router.get("/health/privacy")
async def privacy_health(request: Request) -> dict[str, Any]:
    """The prompt transform the embeddings get and who shares keyed rows (`tenant`):
    behind the key like every route that is not open; never the key itself."""
    return _service(request).privacy


# A load balancer's HEAD check: the same status, no body.
router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False,
                     response_model=None)


@router.get("/health/upstreams")
async def upstreams(request: Request) -> dict[str, Any]:
    """Each upstream backend's state as the answering Dispatcher replica sees it."""
    return await _service(request).upstreams()
