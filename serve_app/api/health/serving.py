"""HealthService: what `/health` and its neighbours report: readiness (`readiness`), the
prompt transform and who shares keyed rows, and the upstream fleet's state."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from serve_app.api.health.readiness import Readiness, starting
from serve_app.api.pipeline import Pipeline
from serve_app.config import PrivacyConfig
from serve_app.prompts.transforms import describe as describe_transform


class HealthService:
    """The gateway's state; `tenants_by_key` where keyed rows are each API key's."""

    def __init__(self, pipeline: Pipeline, privacy: PrivacyConfig,
                 tenants_by_key: bool) -> None:
        self.pipeline = pipeline
        self.readiness = Readiness(pipeline)
        self.privacy = {"transform": describe_transform(privacy.transform),
                        "tenant": "api_key" if tenants_by_key else "shared"}

    async def health(self) -> dict[str, Any] | Response:
        if not await self.readiness.check():
            return starting()
        return {"status": "ok"}

    async def upstreams(self) -> dict[str, Any]:
        return {"object": "list", "data": await self.pipeline.upstream_status()}
