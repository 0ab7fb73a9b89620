"""The gateway in this process, in front of the real vLLM: the FastAPI app over the plain
cores (`InProcessPipeline`, no Ray), served by uvicorn on a loopback port of its own thread,
so the official OpenAI client reaches it over HTTP as it reaches vLLM.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import uvicorn

from serve_app.api.app import create_gateway_app
from serve_app.api.pipeline import InProcessPipeline
from serve_app.api.served_model import ServedModel
from serve_app.config import AppConfig, BackendConfig, ModelConfig, UpstreamConfig
from serve_app.prompts.embedder import EmbedderCore
from serve_app.upstream.dispatcher import DispatcherCore
from tests.upstream_servers import free_port
from tests.vllm.server import SERVED_NAME

START_TIMEOUT_S = 60.0


def gateway_config(model_dir: Path, vllm_url: str, max_model_len: int | None = None,
                   **sections: Any) -> AppConfig:
    """The gateway on the checkpoint vLLM serves, sending bf16 rows (vLLM's dtype) to it."""
    model = ModelConfig(source=str(model_dir), served_name=SERVED_NAME, dtype="bfloat16",
                        max_model_len=max_model_len)
    upstream = UpstreamConfig(backends=[BackendConfig(url=f"{vllm_url}/v1")])
    return AppConfig(model=model, upstream=upstream, **sections)


@dataclass
class Gateway:
    """One gateway on a loopback port; `stop` ends its server and closes its upstream pool."""

    config: AppConfig
    port: int = 0
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="EMPTY", max_retries=0,
                             timeout=120, **options)

    def start(self) -> Gateway:
        self.port = free_port()
        self.thread = threading.Thread(target=self._run, name=f"gateway-{self.port}",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.server and self.server.started):
            if self.error is not None:
                raise RuntimeError("the gateway did not start") from self.error
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not start")
            time.sleep(0.05)
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self.error = exc

    async def _serve(self) -> None:
        # Built in the server's own loop: the dispatcher's connection pool belongs to it.
        config = self.config
        embedder = EmbedderCore.from_checkpoint(Path(config.model.source), config.model,
                                                config.privacy.transform)
        dispatcher = DispatcherCore.from_config(config.upstream)
        served = ServedModel.from_config(config, InProcessPipeline(embedder, dispatcher))
        self.server = uvicorn.Server(uvicorn.Config(create_gateway_app(served),
                                                    host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        try:
            await self.server.serve()
        finally:
            await dispatcher.aclose()

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=15)
