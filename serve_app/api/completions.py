"""The gateway's HTTP surface: OpenAI `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

`CompletionsService` turns a request into prompts for the upstream (token ids, or client
embeddings already checked and re-encoded) and hands them to a `GatewayBackend`: in Serve,
the embedder and dispatcher deployment handles (`deployments.ServeBackend`); in tests, the
plain cores in this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse

from serve_app.api.middleware import BearerKeyMiddleware, RequestGuardMiddleware
from serve_app.config import AppConfig
from serve_app.errors import GatewayError, model_not_found, to_gateway_error
from serve_app.limits import check_forwarding, check_items, check_sampling
from serve_app.prompts.chat_template import ChatTemplate, RenderedChat, load_chat_template
from serve_app.prompts.checkpoint import (
    ModelSpec,
    load_tokenizer,
    read_model_spec,
    resolve_model_dir,
    tokenize_off_loop_if_large,
)
from serve_app.prompts.codec import (
    EncodedPromptEmbeds,
    base64_length,
    decode_prompt_embeds,
    encode_prompt_embeds,
)
from serve_app.prompts.embedder import EmbedderCore, PromptInput, SplicedPrompt, prompt_rows
from serve_app.prompts.text_budget import TextBudget, too_long
from serve_app.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CohereEmbedRequest,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from serve_app.sentence.service import EmbeddingsService, InProcessEncoders
from serve_app.upstream.answers import ChatShape
from serve_app.upstream.dispatcher import DispatcherCore, UpstreamCall, UpstreamReply

UpstreamPrompt = PromptInput | EncodedPromptEmbeds
"""One prompt of an upstream call, in vLLM's order: to be embedded, or a client's
embeddings, already checked and re-encoded."""


class GatewayBackend(Protocol):
    """Where embedding and dispatch happen."""

    async def complete(
        self, call: UpstreamCall, prompts: Sequence[UpstreamPrompt]
    ) -> UpstreamReply: ...

    def stream(
        self, call: UpstreamCall, prompts: Sequence[UpstreamPrompt]
    ) -> AsyncIterator[UpstreamReply | bytes]: ...

    async def upstream_status(self) -> list[dict[str, Any]]: ...


class InProcessBackend:
    """The embedder and dispatcher cores called directly, for running without Ray."""

    def __init__(self, embedder: EmbedderCore, dispatcher: DispatcherCore) -> None:
        self.embedder = embedder
        self.dispatcher = dispatcher

    async def _embed(self, prompts: Sequence[UpstreamPrompt]) -> list[EncodedPromptEmbeds]:
        """The request's token prompts as one batch, the client's embeddings as they are."""
        batch = [p for p in prompts if not isinstance(p, EncodedPromptEmbeds)]
        embedded = iter(await asyncio.to_thread(self.embedder.embed_batch, batch) if batch
                        else [])
        return [p if isinstance(p, EncodedPromptEmbeds) else next(embedded) for p in prompts]

    async def complete(
        self, call: UpstreamCall, prompts: Sequence[UpstreamPrompt]
    ) -> UpstreamReply:
        return await self.dispatcher.complete(call, await self._embed(prompts))

    async def stream(
        self, call: UpstreamCall, prompts: Sequence[UpstreamPrompt]
    ) -> AsyncIterator[UpstreamReply | bytes]:
        async for item in self.dispatcher.stream(call, await self._embed(prompts)):
            yield item

    async def upstream_status(self) -> list[dict[str, Any]]:
        return self.dispatcher.status()


class CompletionsService:
    def __init__(
        self, config: AppConfig, tokenizer: Any, model: ModelSpec, backend: GatewayBackend,
        chat_template: str | None = None,
    ) -> None:
        self.served_name = config.model.name
        self.tokenizer = tokenizer
        self.model = model
        self.embeds_spec = model.embeds_spec(config.limits.max_embeds_bytes)
        self.backend = backend
        self.limits = config.limits
        self.privacy = config.privacy
        chat_parses = config.tokenization.chat_special_tokens == "parse"
        self.chat = ChatTemplate(tokenizer, chat_template, special_tokens_as_text=not chat_parses)
        self.split_special_tokens = config.tokenization.completion_special_tokens == "text"
        self.completion_budget = TextBudget.of(tokenizer, not self.split_special_tokens)
        self.chat_budget = TextBudget.of(tokenizer, chat_parses)
        self.max_prompt_tokens = self.limits.prompt_tokens_cap(model.max_model_len)

    @classmethod
    def from_config(cls, config: AppConfig, backend: GatewayBackend) -> CompletionsService:
        model_dir = resolve_model_dir(config.model, weights=False)
        spec = read_model_spec(model_dir, config.model)
        return cls(config, load_tokenizer(model_dir), spec, backend,
                   load_chat_template(config.model.chat_template))

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.served_name, max_model_len=self.model.max_model_len)

    def _room(self, max_tokens: int | None) -> int:
        """Prompt tokens that fit beside `max_tokens` in the context."""
        return max(0, self.model.max_model_len - (max_tokens or 0))

    def _check_text_length(self, budget: TextBudget, texts: Sequence[str],
                           max_tokens: int | None, param: str) -> None:
        """Length before work: refuse text that cannot fit before tokenizing any of it."""
        room = self._room(max_tokens)
        if budget.exceeds(texts, room):
            raise too_long(sum(map(len, texts)), room, self.model.max_model_len, max_tokens,
                           param)

    async def _token_ids(self, prompts: list[str] | list[list[int]], add_special_tokens: bool,
                         max_tokens: int | None) -> list[list[int]]:
        if not prompts or not isinstance(prompts[0], str):
            return prompts  # type: ignore[return-value]
        texts: list[str] = prompts
        # Long text is counted and tokenized off the event loop, its checks included.
        return await tokenize_off_loop_if_large(sum(map(len, texts)), self._tokenize,
                                                texts, add_special_tokens, max_tokens)

    def _tokenize(self, texts: list[str], add_special_tokens: bool,
                  max_tokens: int | None) -> list[list[int]]:
        """Text prompts to token ids, refused first if they cannot fit."""
        for text in texts:
            self._check_text_length(self.completion_budget, [text], max_tokens, "prompt")
        if self.completion_budget.exceeds(texts, self.max_prompt_tokens):
            raise self._over_request_budget(sum(map(len, texts)), "characters")
        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens,
                                 split_special_tokens=self.split_special_tokens)
        return list(encoded.input_ids)

    def _over_request_budget(self, amount: int, unit: str) -> GatewayError:
        return GatewayError(
            f"The request's prompts come to {amount} {unit}; at most "
            f"{self.max_prompt_tokens} prompt tokens are accepted in one request "
            "(limits.max_prompt_tokens).", 400, param="prompt", code="too_many_tokens")

    def _check_token_ids(self, prompts: list[list[int]], max_tokens: int | None) -> None:
        vocab = self.model.vocab_size
        for ids in prompts:
            if not ids:
                raise GatewayError("A prompt has no tokens.", 400, param="prompt")
            if any(not 0 <= i < vocab for i in ids):
                raise GatewayError(f"Token ids must lie in [0, {vocab}).", 400, param="prompt")
            self._check_length(len(ids), max_tokens)

    def _check_length(self, rows: int, max_tokens: int | None) -> None:
        limit = self.model.max_model_len
        if rows + (max_tokens or 0) > limit:
            raise GatewayError(
                f"This model's maximum context length is {limit} tokens; the request has "
                f"{rows} prompt tokens and max_tokens {max_tokens or 0}.",
                400, param="max_tokens" if max_tokens else "prompt",
                code="context_length_exceeded")

    def _check_request_rows(self, prompts: Sequence[UpstreamPrompt]) -> None:
        rows = sum(p.rows if isinstance(p, EncodedPromptEmbeds) else prompt_rows(p)
                   for p in prompts)
        if rows > self.max_prompt_tokens:
            raise self._over_request_budget(rows, "tokens")

    def _reencode(self, texts: list[str], max_tokens: int | None) -> list[EncodedPromptEmbeds]:
        """Client embeddings: safe decode, then a fresh encode in the model's dtype."""
        encoded = []
        for index, text in enumerate(texts):
            param = "prompt_embeds" if len(texts) == 1 else f"prompt_embeds[{index}]"
            tensor = decode_prompt_embeds(text, self.embeds_spec, param)
            self._check_length(int(tensor.shape[0]), max_tokens)
            encoded.append(encode_prompt_embeds(tensor))
        return encoded

    def _payload_bytes(self, prompts: Sequence[UpstreamPrompt]) -> int:
        """The base64 the upstream call will carry, known before any lookup."""
        row_bytes = self.model.hidden_size * self.model.dtype.itemsize
        return sum(prompt.nbytes if isinstance(prompt, EncodedPromptEmbeds)
                   else base64_length(prompt_rows(prompt) * row_bytes) for prompt in prompts)

    def _check_model(self, model: str) -> None:
        if model != self.served_name:
            raise model_not_found(model)

    def _check_sampling(self, request: CompletionRequest | ChatCompletionRequest,
                        max_tokens: int | None, logprobs: int | None,
                        logprobs_param: str = "logprobs") -> None:
        check_sampling(request, max_tokens, logprobs, self.limits, self.model.vocab_size,
                       logprobs_param)
        check_forwarding(request, self.privacy)

    async def _prepare(
        self, request: CompletionRequest
    ) -> tuple[UpstreamCall, list[UpstreamPrompt]]:
        self._check_model(request.model)
        prompts, client_embeds = request.text_prompts(), request.embeds_list()
        check_items(len(prompts) + len(client_embeds), self.limits, "prompt")
        self._check_sampling(request, request.max_tokens, request.logprobs)
        # Every prompt goes upstream as embeddings, so vLLM's refusals apply to all of them;
        # answering here also keeps the suffix text from ever leaving the gateway.
        incompatible = request.incompatible_with_embeds()
        if incompatible:
            raise GatewayError(f"{incompatible} is not compatible with prompt embeds.", 400,
                               param=incompatible)
        token_ids = await self._token_ids(prompts, request.add_special_tokens,
                                          request.max_tokens)
        if not client_embeds and not token_ids:
            raise GatewayError("Either prompt or prompt_embeds must be given.", 400,
                               param="prompt")
        self._check_token_ids(token_ids, request.max_tokens)
        upstream: list[UpstreamPrompt] = []
        if client_embeds:
            upstream += await asyncio.to_thread(self._reencode, client_embeds,
                                                request.max_tokens)
        # vLLM's order: the embeddings' choices first, then the text prompts'.
        upstream += token_ids
        self._check_request_rows(upstream)
        call = UpstreamCall(self.served_name, request.upstream_fields(), bool(request.stream),
                            payload_bytes=self._payload_bytes(upstream))
        return call, upstream

    def _splice(self, rendered: RenderedChat, max_tokens: int | None) -> PromptInput:
        """The templated prompt: token ids, or ids with the client's tensors in place."""
        tensors = [decode_prompt_embeds(text, self.embeds_spec, "messages")
                   for text in rendered.embeds]
        rows = rendered.token_count + sum(int(t.shape[0]) for t in tensors)
        if rows == 0:
            raise GatewayError("The chat template produced an empty prompt.", 400,
                               param="messages")
        self._check_length(rows, max_tokens)
        if not tensors:
            return [i for piece in rendered.pieces if isinstance(piece, list) for i in piece]
        return SplicedPrompt(tuple(p if isinstance(p, list) else tensors[p]
                                   for p in rendered.pieces))

    def _render(self, request: ChatCompletionRequest, texts: list[str],
                max_tokens: int | None) -> RenderedChat:
        """The templated, tokenized chat, refused first if its text cannot fit."""
        self._check_text_length(self.chat_budget, texts, max_tokens, "messages")
        return self.chat.render(request)

    async def _prepare_chat(
        self, request: ChatCompletionRequest
    ) -> tuple[UpstreamCall, list[UpstreamPrompt]]:
        self._check_model(request.model)
        parts = sum(len(m.content) if isinstance(m.content, list) else 1
                    for m in request.messages)
        check_items(parts, self.limits, "messages")
        max_tokens = request.completion_max_tokens
        self._check_sampling(request, max_tokens, request.max_logprobs, "top_logprobs")
        texts = request.texts()
        rendered = await tokenize_off_loop_if_large(sum(map(len, texts)), self._render,
                                                    request, texts, max_tokens)
        if rendered.embeds:
            prompt = await asyncio.to_thread(self._splice, rendered, max_tokens)
        else:
            prompt = self._splice(rendered, max_tokens)
        shape = ChatShape(top_logprobs=request.max_logprobs)
        call = UpstreamCall(self.served_name, request.upstream_fields(),
                            bool(request.stream), chat=shape,
                            payload_bytes=self._payload_bytes([prompt]))
        return call, [prompt]

    async def completions(self, body: bytes) -> Response:
        try:
            request = CompletionRequest.model_validate(orjson.loads(body))
            return await self._respond(*await self._prepare(request))
        except Exception as exc:
            return to_gateway_error(exc).to_response()

    async def chat_completions(self, body: bytes) -> Response:
        try:
            request = ChatCompletionRequest.model_validate(orjson.loads(body))
            return await self._respond(*await self._prepare_chat(request))
        except Exception as exc:
            return to_gateway_error(exc).to_response()

    async def _respond(self, call: UpstreamCall, prompts: list[UpstreamPrompt]) -> Response:
        if not call.stream:
            reply = await self.backend.complete(call, prompts)
            return Response(reply.body, status_code=reply.status,
                            media_type="application/json", headers=reply.headers)
        events = self.backend.stream(call, prompts)
        head = await anext(events)
        assert isinstance(head, UpstreamReply)
        if head.status != 200:
            return Response(head.body, status_code=head.status, media_type="application/json",
                            headers=head.headers)
        return StreamingResponse(_relay(events), media_type="text/event-stream")


def _answers(model: type[BaseModel] | None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of a POST route: its answer model and the OpenAI error shape."""
    ok: dict[str, Any] = {"description": "The answer (JSON, or SSE when `stream` is set)."}
    if model is not None:
        ok["model"] = model
    return {200: ok, "4XX": {"model": ErrorResponse, "description": "OpenAI-shaped error."},
            "5XX": {"model": ErrorResponse, "description": "OpenAI-shaped error."}}


def _document_request_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Routes read their JSON by hand (fast, and errors stay OpenAI-shaped), so FastAPI
    cannot see their bodies; add the protocol models to `/openapi.json` ourselves."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in bodies.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _relay(events: AsyncIterator[UpstreamReply | bytes]) -> AsyncIterator[bytes]:
    """Pass SSE events through; a failure after the first byte ends with an error + [DONE]."""
    try:
        async for event in events:
            assert isinstance(event, bytes)
            yield event
    except Exception as exc:
        yield to_gateway_error(exc).to_sse_event()
        yield SSE_DONE


def create_gateway_app(service: CompletionsService,
                       embeddings: EmbeddingsService | None = None,
                       api_keys: Sequence[str] = ()) -> FastAPI:
    """The ingress app; with `api_keys`, the API routes need one of them as a Bearer key."""
    app = FastAPI(title="serve_app gateway",
                  description="OpenAI-compatible completions and chat over prompt embeddings, "
                              "and sentence embeddings (OpenAI and Cohere APIs).",
                  redoc_url=None, swagger_ui_oauth2_redirect_url=None)
    embeddings = embeddings or EmbeddingsService({}, InProcessEncoders({}),
                                                 [service.served_name])
    # The last added is outermost: the key is checked first, then the body is read (under
    # its cap and deadline), then the request takes a concurrency slot.
    app.add_middleware(RequestGuardMiddleware, limits=service.limits)
    if api_keys:
        app.add_middleware(BearerKeyMiddleware, keys=api_keys)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> Response:
        return GatewayError(str(exc.detail), exc.status_code).to_response()

    @app.exception_handler(GatewayError)
    async def _refused(_: Request, exc: GatewayError) -> Response:
        return exc.to_response()

    @app.exception_handler(Exception)
    async def _error(_: Request, exc: Exception) -> Response:
        return to_gateway_error(exc).to_response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/upstreams")
    async def upstreams() -> dict[str, Any]:
        """Each upstream backend's state as the answering Dispatcher replica sees it."""
        return {"object": "list", "data": await service.backend.upstream_status()}

    def model_cards() -> list[ModelCard]:
        return [service.model_card(), *embeddings.model_cards()]

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=model_cards())

    @app.get("/v1/models/{model_id:path}", responses=_answers(ModelCard))
    async def model(model_id: str) -> ModelCard:
        """One model, as OpenAI's `models.retrieve` asks for it."""
        for card in model_cards():
            if card.id == model_id:
                return card
        raise model_not_found(model_id)

    @app.post("/v1/completions", responses=_answers(CompletionResponse))
    async def completions(request: Request) -> Response:
        return await service.completions(await request.body())

    @app.post("/v1/chat/completions", responses=_answers(ChatCompletionResponse))
    async def chat_completions(request: Request) -> Response:
        return await service.chat_completions(await request.body())

    @app.post("/v1/embeddings", responses=_answers(None))
    async def openai_embeddings(request: Request) -> Response:
        return await embeddings.openai(await request.body())

    @app.post("/v2/embed", responses=_answers(None))
    async def cohere_embed(request: Request) -> Response:
        return await embeddings.cohere(await request.body())

    _document_request_bodies(app, {
        "/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
        "/v1/embeddings": EmbeddingRequest, "/v2/embed": CohereEmbedRequest,
    })
    return app
