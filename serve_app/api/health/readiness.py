"""The gateway's readiness, as `/health` reports it: ready once an upstream backend answers.

The gateway's replicas can be up while no backend has answered yet (a fleet starting with
the gateway, the embedded reference upstream still loading): completions would get 503s,
so `/health` answers 503 `{"status": "starting"}` until then. Readiness is latched: after
the first answer an upstream outage is each request's clear 503, not the gateway leaving a
load balancer, which would turn those errors into refused connections.

The check asks the pipeline for the fleet's state (`Pipeline.upstream_ready`), never the
upstream itself, and only until the latch closes. Concurrent checks share one call, and
`/health` waits for it at most `WAIT_S`.
"""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse

from serve_app.api.pipeline import Pipeline

WAIT_S = 1.0
"""How long `/health` waits for a check under way before it answers `starting`; within a
load balancer's usual probe timeout."""
CHECK_TIMEOUT_S = 10.0
"""A check that takes longer (the Dispatcher not up yet) is dropped, so the next one runs."""


class Readiness:
    def __init__(self, pipeline: Pipeline, wait_s: float = WAIT_S,
                 check_timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self.pipeline = pipeline
        self.wait_s = wait_s
        self.check_timeout_s = check_timeout_s
        self.ready = False
        self._check: asyncio.Task[bool] | None = None

    async def check(self) -> bool:
        """Whether the gateway is ready, asking the fleet while it is not yet."""
        if self.ready:
            return True
        if self._check is None:
            self._check = asyncio.get_running_loop().create_task(
                asyncio.wait_for(self.pipeline.upstream_ready(), self.check_timeout_s))
            self._check.add_done_callback(self._checked)
        # Not cancelled with this caller: the check goes on for the next one.
        await asyncio.wait({self._check}, timeout=self.wait_s)
        return self.ready

    def _checked(self, check: asyncio.Task[bool]) -> None:
        self._check = None
        # A failed check (the Dispatcher unavailable, a timeout) is "not yet".
        if not check.cancelled() and check.exception() is None and check.result():
            self.ready = True


def starting() -> JSONResponse:
    """`/health`'s answer until the gateway is ready."""
    return JSONResponse({"status": "starting",
                         "detail": "no upstream backend has answered yet"}, status_code=503)
