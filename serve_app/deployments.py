"""Ray Serve shells over the plain cores, and the application builders.

`build_app(AppConfig)` is the gateway's entry point in `serve_config.yaml`;
`build_reference_app(ReferenceBackendConfig)` is the embedded default upstream's. Serve
validates each YAML `args` block against the builder's annotated pydantic type.
"""

# No `from __future__ import annotations` here: Serve validates YAML args only when the
# builder's annotation is a real pydantic class, not a string.
import asyncio
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import envs
from serve_app.allocator import PAYLOAD_ENV_VARS, keep_payload_memory
from serve_app.api.completions import CompletionsService, UpstreamPrompt, create_gateway_app
from serve_app.config import (
    AppConfig,
    BatchingConfig,
    EmbeddingModelConfig,
    EncoderBatchingConfig,
    ReferenceBackendConfig,
    UpstreamConfig,
)
from serve_app.prompts.checkpoint import resolve_model_dir
from serve_app.prompts.codec import EncodedPromptEmbeds
from serve_app.prompts.embedder import EmbedderCore, PromptInput
from serve_app.reference.server import ReferenceBackend, create_reference_app
from serve_app.sentence.encoder import EncoderCore, resolve_encoder_dir
from serve_app.sentence.service import EmbeddingsService
from serve_app.upstream.dispatcher import DispatcherCore, UpstreamCall, UpstreamReply

logger = logging.getLogger(__name__)

# Fractional CPUs so the whole graph (and the reference backend) fits on a 2-core machine;
# serve_config.yaml may override any of these per deployment.
_SMALL: dict[str, Any] = {"num_cpus": 0.25}
# Replicas that handle payloads also get one malloc arena (allocator.py says why). A config
# that sets `ray_actor_options` replaces these, so serve_config.yaml repeats the variable
# in the gateway's application-level `runtime_env`, which Serve merges into every replica.
_PAYLOAD = {**_SMALL, "runtime_env": {"env_vars": PAYLOAD_ENV_VARS}}
# Bounded queues: a full one rejects at once instead of letting latency grow without end.
# Inner deployments' rejections reach the ingress as BackPressureError, answered as an
# OpenAI-shaped 429 with Retry-After; the ingress's own queue overflows at the proxy as a
# 429 with Retry-After too (Serve's backpressure_config), which the OpenAI SDK retries.
_INNER_QUEUE = 1024
_INGRESS_BACKPRESSURE = {"status_code": 429, "retry_after_s": 1}
# Replicas replaced by a redeploy finish their streams first, up to this long.
_STREAM_DRAIN_S = 300.0
_EMBEDDER_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 8,
}


@serve.deployment(ray_actor_options=_PAYLOAD, max_ongoing_requests=64,
                  max_queued_requests=_INNER_QUEUE, autoscaling_config=_EMBEDDER_AUTOSCALING)
class Embedder:
    def __init__(self, config: dict[str, Any]) -> None:
        keep_payload_memory()
        model = AppConfig.model_validate(config).model
        self.core = EmbedderCore.from_checkpoint(resolve_model_dir(model), model)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batching from `user_config`: `serve deploy` changes it without a restart."""
        batching = BatchingConfig.model_validate(user_config)
        self.embed.set_max_batch_size(batching.max_batch_size)
        self.embed.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def embed(self, batch: list[PromptInput]) -> list[EncodedPromptEmbeds]:
        # Lookup, torch.save and base64 run off the event loop so queued requests keep flowing.
        return await asyncio.to_thread(self.core.embed_batch, batch)


def _batch_tokens(requests: list[list[list[int]]]) -> int:
    """`@serve.batch` size of queued encoder requests: their tokens, not their count."""
    return sum(len(ids) for request in requests for ids in request)


@serve.deployment(ray_actor_options=_SMALL, max_ongoing_requests=64,
                  max_queued_requests=_INNER_QUEUE, autoscaling_config=_EMBEDDER_AUTOSCALING)
class Encoder:
    """One sentence-embedding model; bound once per `embedding_models` entry."""

    def __init__(self, config: dict[str, Any]) -> None:
        model = EmbeddingModelConfig.model_validate(config)
        self.core = EncoderCore.from_checkpoint(resolve_encoder_dir(model), model)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Token budget from `user_config`: `serve deploy` changes it without a restart."""
        batching = EncoderBatchingConfig.model_validate(user_config)
        if batching.max_batch_tokens < self.core.spec.max_seq_length:
            raise ValueError(f"max_batch_tokens must be at least the model's max sequence "
                             f"length, {self.core.spec.max_seq_length}")
        self.core.max_batch_tokens = batching.max_batch_tokens
        self.encode.set_max_batch_size(batching.max_batch_tokens)
        self.encode.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.005, batch_size_fn=_batch_tokens)
    async def encode(self, batch: list[list[list[int]]]) -> list[torch.Tensor]:
        return await asyncio.to_thread(self.core.encode, batch)


def via_object_store(handle: DeploymentHandle) -> DeploymentHandle:
    """Calls whose arguments and results travel through Ray's object store, whatever the
    cluster's default transport (`RAY_SERVE_THROUGHPUT_OPTIMIZED` makes it gRPC)."""
    return handle.options(_by_reference=True)


class ServeEncoders:
    """Encoder deployments by served model name (by reference: a chunk's vectors can pass
    gRPC's 4 MiB default message limit)."""

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self.handles = {model: via_object_store(handle) for model, handle in handles.items()}

    async def encode(self, model: str, chunk: list[list[int]]) -> torch.Tensor:
        vectors: torch.Tensor = await self.handles[model].encode.remote(chunk)
        return vectors


def encoder_deployment_name(served_name: str) -> str:
    """`Encoder_<served name>`: the name to use for per-deployment overrides in the YAML."""
    return "Encoder_" + re.sub(r"[^A-Za-z0-9_-]", "_", served_name)


@serve.deployment(ray_actor_options=_PAYLOAD, max_ongoing_requests=256,
                  max_queued_requests=_INNER_QUEUE,
                  graceful_shutdown_timeout_s=_STREAM_DRAIN_S)
class Dispatcher:
    """The upstream fleet; its `user_config` is `AppConfig.upstream`."""

    def __init__(self) -> None:
        keep_payload_memory()
        self.core: DispatcherCore | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A changed fleet applies in place: streams in flight keep their backends."""
        config = UpstreamConfig.model_validate(user_config)
        if self.core is None:
            self.core = DispatcherCore.from_config(config)
        await self.core.reconfigure(config)

    def _ready(self) -> DispatcherCore:
        if self.core is None:
            raise RuntimeError("the Dispatcher needs its user_config (the upstream fleet)")
        return self.core

    async def complete(self, call: UpstreamCall, *embeds: EncodedPromptEmbeds) -> UpstreamReply:
        return await self._ready().complete(call, embeds)

    async def stream(
        self, call: UpstreamCall, *embeds: EncodedPromptEmbeds
    ) -> AsyncIterator[UpstreamReply | bytes]:
        async for item in self._ready().stream(call, embeds):
            yield item

    def upstream_status(self) -> list[dict[str, Any]]:
        return self._ready().status()


@dataclass(frozen=True)
class _Route:
    """The embedder and dispatcher handles of one transport."""

    embedder: DeploymentHandle
    dispatcher: DeploymentHandle
    streaming_dispatcher: DeploymentHandle

    @classmethod
    def of(cls, embedder: DeploymentHandle, dispatcher: DeploymentHandle,
           by_reference: bool) -> "_Route":
        embedder = embedder.options(_by_reference=by_reference)
        dispatcher = dispatcher.options(_by_reference=by_reference)
        return cls(embedder, dispatcher, dispatcher.options(stream=True))

    def embeds(self, prompts: Sequence[UpstreamPrompt]) -> list[Any]:
        """The dispatcher call's arguments: embedder responses, unawaited, and the client
        embeddings already encoded here."""
        return [prompt if isinstance(prompt, EncodedPromptEmbeds)
                else self.embedder.embed.remote(prompt) for prompt in prompts]


class ServeBackend:
    """Embedder and dispatcher reached through Serve handles, by one of two transports.

    The embedder's DeploymentResponses go into the dispatcher call as top-level arguments.
    - By reference (Ray's object store), Serve hands the embeddings from replica to replica
      without this process reading them. Large requests go this way.
    - By value (Serve's gRPC channel), they pass through this process, but each call skips
      the object store's per-object bookkeeping, which costs more than copying a megabyte
      or so twice. Requests up to `TransportConfig.by_value_max_bytes` go this way.
    Both are pinned here, so `RAY_SERVE_THROUGHPUT_OPTIMIZED` (gRPC for every call by
    default) cannot send a large payload through gRPC, whose 4 MiB message limit would
    refuse it.
    """

    def __init__(self, embedder: DeploymentHandle, dispatcher: DeploymentHandle,
                 by_value_max_bytes: int) -> None:
        self.by_value = _Route.of(embedder, dispatcher, by_reference=False)
        self.by_reference = _Route.of(embedder, dispatcher, by_reference=True)
        self.by_value_max_bytes = by_value_max_bytes

    def route(self, call: UpstreamCall) -> _Route:
        small = call.payload_bytes <= self.by_value_max_bytes
        return self.by_value if small else self.by_reference

    async def complete(
        self, call: UpstreamCall, prompts: Sequence[UpstreamPrompt]
    ) -> UpstreamReply:
        route = self.route(call)
        reply: UpstreamReply = await route.dispatcher.complete.remote(call,
                                                                      *route.embeds(prompts))
        return reply

    async def stream(
        self, call: UpstreamCall, prompts: Sequence[UpstreamPrompt]
    ) -> AsyncIterator[UpstreamReply | bytes]:
        route = self.route(call)
        events = route.streaming_dispatcher.stream.remote(call, *route.embeds(prompts))
        try:
            async for item in events:
                yield item
        finally:
            events.cancel()

    async def upstream_status(self) -> list[dict[str, Any]]:
        status: list[dict[str, Any]] = await self.by_reference.dispatcher.upstream_status.remote()
        return status


# max_ongoing_requests is set from the limits in `build_app`: requests still sending
# their bodies beside the ones being served, so overload is answered by the ingress itself
# in the OpenAI shape before Serve's queue fills.
@serve.deployment(ray_actor_options=_PAYLOAD, max_queued_requests=512,
                  backpressure_config=_INGRESS_BACKPRESSURE,
                  graceful_shutdown_timeout_s=_STREAM_DRAIN_S)
@serve.ingress()
class Gateway:
    def __init__(self, config: dict[str, Any], embedder: DeploymentHandle,
                 dispatcher: DeploymentHandle, encoders: dict[str, DeploymentHandle]) -> None:
        keep_payload_memory()  # client embeddings are decoded and re-encoded here
        app_config = AppConfig.model_validate(config)
        backend = ServeBackend(embedder, dispatcher, app_config.transport.by_value_max_bytes)
        self.service = CompletionsService.from_config(app_config, backend)
        self.embeddings = EmbeddingsService.from_config(app_config, ServeEncoders(encoders))
        self.api_keys = envs.api_keys(app_config.auth.api_keys_env,
                                      app_config.auth.api_keys_file)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_gateway_app(self.service, self.embeddings, self.api_keys)


@serve.deployment(ray_actor_options=_SMALL, max_ongoing_requests=32)
@serve.ingress()
class Reference:
    def __init__(self, config: dict[str, Any]) -> None:
        self.backend = ReferenceBackend.from_config(ReferenceBackendConfig.model_validate(config))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_reference_app(self.backend)


def build_app(config: AppConfig) -> serve.Application:
    """The gateway graph: Gateway (ingress) -> Embedder (batched) -> Dispatcher -> upstream,
    and one Encoder per embedding model."""
    # Deployments receive the validated config as plain data and re-validate it on start.
    plain = config.model_dump(mode="json")
    embedder = Embedder.options(user_config=plain["batching"]).bind(plain)
    # The fleet is the Dispatcher's user_config: a `deployments:` override of it in the
    # Serve config changes backends in place, without restarting a replica.
    dispatcher = Dispatcher.options(user_config=plain["upstream"]).bind()
    encoders = {
        model.name: Encoder.options(name=encoder_deployment_name(model.name),
                                    user_config=model.batching.model_dump(mode="json"))
        .bind(model.model_dump(mode="json"))
        for model in config.embedding_models
    }
    limits = config.limits
    gateway = Gateway.options(
        max_ongoing_requests=limits.max_concurrent_requests + limits.max_receiving_requests)
    return gateway.bind(plain, embedder, dispatcher, encoders)


def build_reference_app(config: ReferenceBackendConfig) -> serve.Application:
    return Reference.bind(config.model_dump(mode="json"))
