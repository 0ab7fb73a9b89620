"""The gateway's health (`/health`, `/health/privacy`, `/health/upstreams`): the routes
(`router`), what they report (`serving`) and the readiness latch (`readiness`)."""

from serve_app.api.health.router import attach
from serve_app.api.health.serving import HealthService

__all__ = ["HealthService", "attach"]
