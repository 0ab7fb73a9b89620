"""Fixtures for the whole gateway in one process, no Ray: ingress -> embedder core ->
dispatcher core -> reference upstream app, every hop through httpx.ASGITransport."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pybase64
import pytest
import torch

from serve_app.api.app import create_gateway_app
from serve_app.api.pipeline import InProcessPipeline
from serve_app.api.served_model import ServedModel
from serve_app.config import (
    AppConfig,
    BackendConfig,
    EmbeddingModelConfig,
    LimitsConfig,
    ModelConfig,
    ReferenceConfig,
    UpstreamConfig,
)
from serve_app.prompts.embedder import EmbedderCore
from serve_app.reference.app import create_reference_app
from serve_app.reference.server import ReferenceServer
from serve_app.sentence.encoder import EncoderCore
from serve_app.sentence.service import InProcessEncoderClient, SentenceService
from serve_app.upstream.dispatcher import DispatcherCore
from tests.unit.gateway_client import GatewayFactory, RecordingASGITransport

UPSTREAM = UpstreamConfig(backends=[BackendConfig(url="http://ref/v1")])


@pytest.fixture(scope="module")
def reference_app(cache_dir: Path) -> Any:
    return create_reference_app(ReferenceServer.from_config(ReferenceConfig()))


@pytest.fixture(scope="module")
def embedder(demo_model_dir: Path) -> EmbedderCore:
    return EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig())


@pytest.fixture(scope="module")
def embeddings_service(demo_encoder_dir: Path) -> SentenceService:
    """The demo encoder behind /v1/embeddings and /v2/embed, its core called in-process."""
    config = AppConfig(upstream=UPSTREAM, embedding_models=[EmbeddingModelConfig()])
    [model] = config.embedding_models
    core = EncoderCore.from_checkpoint(demo_encoder_dir, model)
    return SentenceService.from_config(config, InProcessEncoderClient({model.name: core}))


@pytest.fixture
async def make_gateway(
    embedder: EmbedderCore, embeddings_service: SentenceService, cache_dir: Path
) -> AsyncIterator[GatewayFactory]:
    """A gateway client whose dispatcher reaches the upstream through `transport`."""
    closers: list[Any] = []

    def factory(transport: httpx.AsyncBaseTransport, api_keys: tuple[str, ...] = (),
                limits: LimitsConfig | None = None, root_path: str = "",
                upstream: UpstreamConfig = UPSTREAM, core: EmbedderCore | None = None,
                **config: Any) -> httpx.AsyncClient:
        upstream_client = httpx.AsyncClient(transport=transport, base_url="http://ref")
        dispatcher = DispatcherCore(upstream, upstream_client)
        app_config = AppConfig(upstream=upstream, limits=limits or LimitsConfig(), **config)
        served = ServedModel.from_config(app_config,
                                         InProcessPipeline(core or embedder, dispatcher))
        embeddings = SentenceService(embeddings_service.models, embeddings_service.encoders,
                                     [served.served_name], app_config.limits)
        app = create_gateway_app(served, embeddings, api_keys)
        gateway = httpx.AsyncClient(
            # Serve keeps an app's route prefix in the path and sets root_path: so does this.
            transport=httpx.ASGITransport(app=app, root_path=root_path),
            base_url="http://gateway",
        )
        closers.extend([dispatcher.aclose, gateway.aclose])
        return gateway

    yield factory
    for close in closers:
        await close()


@pytest.fixture
def recorder(reference_app: Any) -> RecordingASGITransport:
    return RecordingASGITransport(reference_app)


@pytest.fixture
def gateway(make_gateway: GatewayFactory, recorder: RecordingASGITransport) -> httpx.AsyncClient:
    return make_gateway(recorder)


@pytest.fixture
async def reference(reference_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=reference_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ref") as client:
        yield client


@pytest.fixture(scope="module")
def embed(demo_tokenizer: Any, demo_causal_lm: Any) -> Callable[[str], str]:
    """What a client computes itself: base64 of torch.save of the prompt's embeddings."""

    def compute(text: str) -> str:
        ids = torch.tensor(demo_tokenizer(text).input_ids)
        with torch.no_grad():
            tensor = demo_causal_lm.get_input_embeddings()(ids)
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        return pybase64.b64encode(buffer.getvalue()).decode("ascii")

    return compute
