"""Ray Serve shells over the plain cores, and the application builders.

`build_app(AppConfig)` is the gateway's entry point in `serve_config.yaml`;
`build_reference_app(ReferenceConfig)` is the embedded default upstream's. Serve
validates each YAML `args` block against the builder's annotated pydantic type.
"""

# No `from __future__ import annotations` here: Serve validates YAML args only when the
# builder's annotation is a real pydantic class, not a string.
import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import envs
from serve_app.allocator import PAYLOAD_ENV_VARS, keep_payload_memory
from serve_app.api.app import create_gateway_app
from serve_app.api.served_model import ServedModel
from serve_app.config import (
    AdapterConfig,
    AdaptersUserConfig,
    AppConfig,
    EmbedderUserConfig,
    EmbeddingModelConfig,
    EncoderBatchingConfig,
    ReferenceConfig,
    UpstreamConfig,
)
from serve_app.errors import GatewayError
from serve_app.handles import ServeEmbedder, ServeEncoderClient, ServePipeline
from serve_app.observability import metrics
from serve_app.observability.access import ACCESS_LOGGER
from serve_app.prompts.checkpoint import resolve_model_dir
from serve_app.prompts.codec import EncodedPromptEmbeds
from serve_app.prompts.embedder import BatchStats, EmbedderCore, EmbedRequest, PromptInput
from serve_app.prompts.transforms import log_transform
from serve_app.reference.app import create_reference_app
from serve_app.reference.server import ReferenceServer
from serve_app.sentence.encoder import EncoderCore, chunks, resolve_encoder_dir
from serve_app.sentence.service import SentenceService
from serve_app.upstream.call import StreamItem, UpstreamCall, UpstreamReply
from serve_app.upstream.dispatcher import DispatcherCore
from serve_app.upstream.payloads import PromptDispatcher

logger = logging.getLogger(__name__)

# Fractional CPUs so the whole graph (and the reference upstream) fits on a 2-core machine;
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
# Requests a batched replica holds: this many batches' worth, so the next batch is queued
# while one runs. Encoders batch by tokens; their requests are counted, not their tokens.
_QUEUED_BATCHES = 4
_ENCODER_ONGOING = 64
# Dispatcher requests per upstream slot: those in flight, and those waiting up to
# `upstream.max_queue_wait_s` for a slot to free.
_DISPATCH_PER_SLOT = 4

# Each deployment's batching, autoscaling and ongoing-request caps come from the config in
# `deployment_options`; a `deployments:` entry in the Serve config overrides them.


@serve.deployment(ray_actor_options=_PAYLOAD, max_queued_requests=_INNER_QUEUE)
class Embedder:
    def __init__(self, config: dict[str, Any]) -> None:
        keep_payload_memory()
        route_app_logs()
        app_config = AppConfig.model_validate(config)
        model, transform = app_config.model, app_config.privacy.transform
        # Serve's logger: the line lands in the replica's log and on `serve run`'s console.
        log_transform(transform, logging.getLogger("ray.serve"))
        self.core = EmbedderCore.from_checkpoint(resolve_model_dir(model), model, transform)
        self.max_prompts = app_config.batching.max_batch_size
        self.args_adapters = model.adapters
        self.configured = False

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batching and adapters from `user_config`: `serve deploy` changes them without a
        restart (`apply_adapters` says what a refused adapter does)."""
        settings = EmbedderUserConfig.model_validate(user_config)
        self.max_prompts = settings.max_batch_size
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        wanted = self.args_adapters if settings.adapters is None else settings.adapters
        # Reading the folders and copying the rows to the device block: off the event loop.
        await asyncio.to_thread(apply_adapters, self.core.set_adapters, wanted, self.configured)
        self.configured = True

    async def embed(self, request: EmbedRequest) -> list[EncodedPromptEmbeds]:
        """One request's prompts, encoded, or its own error: a request naming an adapter
        this replica does not hold fails alone, not its batch."""
        answer = await self._batched(request)
        if isinstance(answer, GatewayError):
            raise answer
        return answer

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batched(
        self, requests: list[EmbedRequest]
    ) -> list[list[EncodedPromptEmbeds] | GatewayError]:
        """Each call is one request's prompts and its tenant (`prompts.tenants`): a batch
        mixes requests and tenants, and a keyed transform reads each prompt's. The
        prompts are looked up `max_batch_size` at a time."""
        # Lookup, torch.save and base64 run off the event loop so queued requests keep flowing.
        encoded, costs = await asyncio.to_thread(self.core.embed_requests, requests,
                                                 self.max_prompts)
        for stats in costs:
            _record_batch(stats)
        return encoded


def apply_adapters(change: Callable[[list[AdapterConfig]], None],
                   wanted: list[AdapterConfig], started: bool) -> None:
    """Serve the `wanted` adapters through `change`. At a replica's start a refused adapter
    fails the start, and Serve reports the message, which names the adapter and the
    reason. On a running replica it is logged, and the replica keeps the set it serves:
    Serve stops a replica whose `reconfigure` raises, so raising would take the old set
    out of service with it."""
    try:
        change(wanted)
    except ValueError as exc:  # an AdapterError, or names given twice
        if not started:
            raise
        logging.getLogger("ray.serve").error(
            "%s. The new adapter list is not applied: this replica serves the adapters it "
            "had. A replica that starts refuses the list until it is corrected.", exc)


def _record_batch(stats: BatchStats) -> None:
    metrics.record_embedder_batch(stats.prompts, stats.rows, stats.stage_seconds,
                                  stats.payload_bytes)


def _batch_tokens(requests: list[list[list[int]]]) -> int:
    """`@serve.batch` size of queued encoder requests: their tokens, not their count."""
    return sum(len(ids) for request in requests for ids in request)


@serve.deployment(ray_actor_options=_SMALL, max_queued_requests=_INNER_QUEUE)
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
        self._batched.set_max_batch_size(batching.max_batch_tokens)
        self._batched.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    async def encode(self, chunk: list[list[int]]) -> torch.Tensor:
        """One chunk's pooled vectors. The gateway sizes chunks by the config's token
        budget; a `deployments:` override may give this replica a smaller one, and a batch
        refuses any item over it, so a larger chunk is queued in pieces."""
        pieces = chunks(chunk, self.core.max_batch_tokens)
        if len(pieces) == 1:
            return await self._batched(chunk)
        return torch.cat(await asyncio.gather(*(self._batched(piece) for piece in pieces)))

    @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.005, batch_size_fn=_batch_tokens)
    async def _batched(self, batch: list[list[list[int]]]) -> list[torch.Tensor]:
        return await asyncio.to_thread(self.core.encode, batch)


def encoder_deployment_name(served_name: str) -> str:
    """`Encoder_<served name>`: the name to use for per-deployment overrides in the YAML."""
    return "Encoder_" + re.sub(r"[^A-Za-z0-9_-]", "_", served_name)


@serve.deployment(ray_actor_options=_PAYLOAD, max_queued_requests=_INNER_QUEUE,
                  graceful_shutdown_timeout_s=_STREAM_DRAIN_S)
class Dispatcher:
    """The upstream fleet; its `user_config` is `AppConfig.upstream`. It asks the Embedder
    for each request's payload itself (`upstream.payloads`)."""

    def __init__(self, embedder: DeploymentHandle) -> None:
        keep_payload_memory()
        route_app_logs()
        self.embed = ServeEmbedder(embedder)
        self.prompts: PromptDispatcher | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A changed fleet applies in place: streams in flight keep their backends."""
        config = UpstreamConfig.model_validate(user_config)
        if self.prompts is None:
            self.prompts = PromptDispatcher(DispatcherCore.from_config(config), self.embed)
        await self.prompts.core.reconfigure(config)

    def _ready(self) -> PromptDispatcher:
        if self.prompts is None:
            raise RuntimeError("the Dispatcher needs its user_config (the upstream fleet)")
        return self.prompts

    async def complete(self, call: UpstreamCall, prompts: list[PromptInput],
                       tenant: str) -> UpstreamReply:
        return await self._ready().complete(call, prompts, tenant)

    async def stream(
        self, call: UpstreamCall, prompts: list[PromptInput], tenant: str
    ) -> AsyncIterator[StreamItem]:
        """The stream's head, then its events: one generator, as Serve streams it."""
        async for item in self._ready().stream(call, prompts, tenant):
            yield item

    def upstream_status(self) -> list[dict[str, Any]]:
        return self._ready().core.status()

    async def upstream_ready(self) -> bool:
        """False until the fleet is configured, then `DispatcherCore.ready`."""
        return self.prompts is not None and await self.prompts.core.ready()


@serve.deployment(ray_actor_options=_PAYLOAD, max_queued_requests=512,
                  backpressure_config=_INGRESS_BACKPRESSURE,
                  graceful_shutdown_timeout_s=_STREAM_DRAIN_S)
@serve.ingress()
class Gateway:
    def __init__(self, config: dict[str, Any], dispatcher: DeploymentHandle,
                 encoders: dict[str, DeploymentHandle]) -> None:
        keep_payload_memory()  # client embeddings are decoded here
        route_app_logs()
        write_access_log()
        app_config = AppConfig.model_validate(config)
        self.service = ServedModel.from_config(app_config, ServePipeline(dispatcher))
        self.sentence = SentenceService.from_config(app_config, ServeEncoderClient(encoders))
        self.api_keys = envs.api_keys(app_config.auth.api_keys_env,
                                      app_config.auth.api_keys_file)
        self.args_adapters = app_config.model.adapters
        self.configured = False

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Adapters from `user_config`: `serve deploy` changes the names it accepts and
        lists without a restart (`apply_adapters` says what a refused adapter does)."""
        settings = AdaptersUserConfig.model_validate(user_config)
        wanted = self.args_adapters if settings.adapters is None else settings.adapters
        await asyncio.to_thread(apply_adapters, self.service.set_adapters, wanted,
                                self.configured)
        self.configured = True

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve's proxy returns the request id itself.
        return create_gateway_app(self.service, self.sentence, self.api_keys,
                                  echo_request_id=False)


@serve.deployment(ray_actor_options=_SMALL, max_ongoing_requests=32)
@serve.ingress()
class Reference:
    def __init__(self, config: dict[str, Any]) -> None:
        self.server = ReferenceServer.from_config(ReferenceConfig.model_validate(config))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_reference_app(self.server)


def route_app_logs() -> None:
    """The gateway's own log lines through Serve's handlers: into the replica's log file
    and console, in Serve's format (its `logging_config`, JSON included), each with the
    request id Serve keeps for the request being served."""
    app_logger = logging.getLogger("serve_app")
    if app_logger.handlers:
        return
    for handler in logging.getLogger("ray.serve").handlers:
        app_logger.addHandler(handler)
    app_logger.setLevel(logging.INFO)
    app_logger.propagate = False


def write_access_log() -> None:
    """The access log: one JSON object a line, in Serve's log directory, one file per
    Gateway replica (`serve_app_access_<pid>.jsonl`)."""
    from ray.serve._private.logging_utils import get_serve_logs_dir

    log = logging.getLogger(ACCESS_LOGGER)
    if log.handlers:
        return
    path = Path(get_serve_logs_dir()) / f"serve_app_access_{os.getpid()}.jsonl"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # its own file, not the replica log twice


def deployment_options(config: AppConfig) -> dict[str, dict[str, Any]]:
    """Each deployment's Serve options, by deployment name, derived from the config:
    - Gateway: `model.adapters` as `user_config` (changes in place); its ongoing-request
      cap holds the requests being served and those still sending their bodies (`limits`),
      so overload is answered by the ingress itself, in the OpenAI shape, before Serve's
      queue fills;
    - Embedder: batching and `model.adapters` as `user_config` (changes in place),
      autoscaling, and room for a few batches;
    - each Encoder: batching as `user_config` (changes without a restart), autoscaling,
      and room for a few batches;
    - Dispatcher: the fleet as `user_config` (changes in place), and room for every
      upstream slot and the requests waiting for one.
    """
    limits = config.limits
    slots = sum(backend.max_in_flight for backend in config.upstream.backends)
    adapters = [adapter.model_dump(mode="json") for adapter in config.model.adapters]
    options: dict[str, dict[str, Any]] = {
        "Gateway": {"user_config": {"adapters": adapters},
                    "max_ongoing_requests":
                    limits.max_concurrent_requests + limits.max_receiving_requests},
        "Embedder": {"user_config": {**config.batching.model_dump(mode="json"),
                                     "adapters": adapters},
                     "autoscaling_config": config.autoscaling.model_dump(mode="json"),
                     "max_ongoing_requests": _QUEUED_BATCHES * config.batching.max_batch_size},
        "Dispatcher": {"user_config": config.upstream.model_dump(mode="json"),
                       "max_ongoing_requests": _DISPATCH_PER_SLOT * slots},
    }
    for model in config.embedding_models:
        options[encoder_deployment_name(model.name)] = {
            "user_config": model.batching.model_dump(mode="json"),
            "autoscaling_config": model.autoscaling.model_dump(mode="json"),
            "max_ongoing_requests": _ENCODER_ONGOING,
        }
    return options


def build_app(config: AppConfig) -> serve.Application:
    """The gateway graph: Gateway (ingress) -> Dispatcher -> upstream, the Dispatcher
    calling the Embedder (batched) for each request's payload, and one Encoder per
    embedding model. Serve's app builder (`import_path`), so it takes
    the config alone."""
    return gateway_graph(config)


def gateway_graph(config: AppConfig,
                  overrides: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """`build_app`'s graph, with `overrides` replacing Serve options by deployment name as a
    Serve config's `deployments:` entries do (a fixed `num_replicas` replaces autoscaling)."""
    options = deployment_options(config)
    for name, changed in (overrides or {}).items():
        if "num_replicas" in changed:
            options[name].pop("autoscaling_config", None)
        options[name].update(changed)
    # Deployments receive the validated config as plain data and re-validate it on start.
    plain = config.model_dump(mode="json")
    embedder = Embedder.options(**options["Embedder"]).bind(plain)
    dispatcher = Dispatcher.options(**options["Dispatcher"]).bind(embedder)
    encoders = {
        model.name: Encoder.options(name=name, **options[name])
        .bind(model.model_dump(mode="json"))
        for model in config.embedding_models
        for name in [encoder_deployment_name(model.name)]
    }
    return Gateway.options(**options["Gateway"]).bind(plain, dispatcher, encoders)


def build_reference_app(config: ReferenceConfig) -> serve.Application:
    return Reference.bind(config.model_dump(mode="json"))
