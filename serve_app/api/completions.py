"""CompletionsService: OpenAI completions and chat requests turned into prompts for the
pipeline, and the pipeline's answers turned into HTTP responses.

A prompt is token ids, or token-id runs with client tensors spliced in (`SplicedPrompt`):
text is tokenized here, chat messages are templated here, client embeddings are decoded
and checked here. Every prompt then takes the same path: the Embedder looks up its token
ids, joins the tensors, and encodes the rows for the upstream.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import torch
from starlette.responses import Response, StreamingResponse

from serve_app.api.pipeline import Pipeline
from serve_app.config import AppConfig
from serve_app.endpoint import answer
from serve_app.errors import GatewayError, to_gateway_error
from serve_app.limits import (
    check_context,
    check_embeds_compatible,
    check_forwarding,
    check_items,
    check_model,
    check_sampling,
    check_text_chars,
)
from serve_app.observability import access, request_id
from serve_app.prompts.chat_template import ChatTemplate, RenderedChat, load_chat_template
from serve_app.prompts.checkpoint import (
    ModelSpec,
    load_tokenizer,
    read_model_spec,
    resolve_model_dir,
    tokenize_off_loop_if_large,
)
from serve_app.prompts.codec import base64_length
from serve_app.prompts.embedder import PromptInput, SplicedPrompt, prompt_rows
from serve_app.prompts.prefix import prefix_key
from serve_app.prompts.tenants import SHARED_TENANT
from serve_app.prompts.text_budget import TextBudget, too_long
from serve_app.prompts.untrusted import decode_prompt_embeds
from serve_app.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    SamplingFields,
)
from serve_app.upstream.call import ChatShape, EventStream, UpstreamCall
from serve_app.upstream.stops import StopRule, one_token_id


class CompletionsService:
    """`/v1/completions` and `/v1/chat/completions` for the served model."""

    def __init__(
        self, config: AppConfig, tokenizer: Any, model: ModelSpec, pipeline: Pipeline,
        chat_template: str | None = None,
    ) -> None:
        self.served_name = config.model.name
        self.embedding_models = {model.name for model in config.embedding_models}
        self.tokenizer = tokenizer
        self.model = model
        self.embeds_spec = model.embeds_spec(config.limits.max_embeds_bytes)
        self.pipeline = pipeline
        self.limits = config.limits
        self.privacy = config.privacy
        self.routing = config.upstream.routing
        # Keyed rows differ between tenants, so a prefix's cache is a tenant's: its routing
        # key names the tenant, and one tenant's hot prefix does not draw every tenant's
        # copy of it to one backend. Other kinds' rows are the same for every tenant.
        self.keyed = config.privacy.transform.kind == "keyed_gaussian"
        self.tenants_by_key = config.privacy.transform.tenant == "api_key"
        chat_parses = config.tokenization.chat_special_tokens == "parse"
        self.chat = ChatTemplate(tokenizer, chat_template, special_tokens_as_text=not chat_parses,
                                 turn_markers=config.tokenization.chat_turn_markers)
        self.split_special_tokens = config.tokenization.completion_special_tokens == "text"
        self.completion_budget = TextBudget.of(tokenizer, not self.split_special_tokens)
        self.chat_budget = TextBudget.of(tokenizer, chat_parses)
        self.max_prompt_tokens = self.limits.prompt_tokens_cap(model.max_model_len)

    @classmethod
    def from_config(cls, config: AppConfig, pipeline: Pipeline) -> CompletionsService:
        model_dir = resolve_model_dir(config.model, weights=False)
        spec = read_model_spec(model_dir, config.model)
        return cls(config, load_tokenizer(model_dir), spec, pipeline,
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
        check_text_chars(sum(map(len, texts)), self.limits, "prompt")
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
            check_context(len(ids), max_tokens, self.model.max_model_len)

    def _check_request_rows(self, prompts: Sequence[PromptInput]) -> None:
        rows = sum(map(prompt_rows, prompts))
        if rows > self.max_prompt_tokens:
            raise self._over_request_budget(rows, "tokens")

    def _decode(self, texts: list[str], max_tokens: int | None) -> list[PromptInput]:
        """Client embeddings, each checked and in the model's dtype, as prompts of one
        segment: the Embedder encodes them as it encodes everything it sends."""
        prompts: list[PromptInput] = []
        for index, text in enumerate(texts):
            param = "prompt_embeds" if len(texts) == 1 else f"prompt_embeds[{index}]"
            tensor = decode_prompt_embeds(text, self.embeds_spec, param)
            check_context(int(tensor.shape[0]), max_tokens, self.model.max_model_len)
            prompts.append(SplicedPrompt((tensor,)))
        return prompts

    def _payload_bytes(self, prompts: Sequence[PromptInput]) -> int:
        """The base64 the upstream call will carry, known before any lookup."""
        row_bytes = self.model.hidden_size * self.model.dtype.itemsize
        return sum(base64_length(prompt_rows(prompt) * row_bytes) for prompt in prompts)

    def tenant(self, key_tenant: str | None) -> str:
        """A request's tenant: its API key's (`key_tenant`, from the key check) under
        `privacy.transform.tenant: api_key`, else the shared one."""
        return key_tenant if key_tenant is not None and self.tenants_by_key else SHARED_TENANT

    async def _prefix_key(self, prompts: Sequence[PromptInput], tenant: str) -> int | None:
        """The request's routing key; client tensor rows are hashed off the event loop."""
        key_of = functools.partial(prefix_key, prompts, self.routing.block_size,
                                   self.routing.prefix_blocks, tenant if self.keyed else None)
        if prompts and isinstance(prompts[0], SplicedPrompt):
            return await asyncio.to_thread(key_of)
        return key_of()

    def _check_sampling(self, request: CompletionRequest | ChatCompletionRequest,
                        max_tokens: int | None, logprobs: int | None,
                        logprobs_param: str = "logprobs") -> None:
        check_sampling(request, max_tokens, logprobs, self.limits, self.model.vocab_size,
                       logprobs_param)
        check_forwarding(request, self.privacy)

    def _stops(self, request: CompletionRequest | ChatCompletionRequest
               ) -> tuple[SamplingFields, StopRule | None]:
        """The call's sampling fields, and the stop strings the gateway keeps: none go
        upstream unless `privacy.forward_stop`; the id of each that is one token may."""
        fields = request.upstream_fields()
        strings = request.stop_strings()
        if not strings or self.privacy.forward_stop:
            return fields, None
        rule = StopRule(tuple(strings), bool(request.include_stop_str_in_output),
                        request.min_tokens or 0, self._stop_token_ids(request, strings))
        update: dict[str, Any] = {"stop": None}
        if rule.token_ids:
            update["stop_token_ids"] = [*(request.stop_token_ids or []), *rule.token_ids]
        return fields.model_copy(update=update), rule

    def _stop_token_ids(self, request: CompletionRequest | ChatCompletionRequest,
                        strings: list[str]) -> dict[int, str]:
        """The stop strings that are one token each, by id (`privacy.stop_token_ids`).
        None under `min_tokens`: vLLM keeps stop tokens from being sampled there, while a
        stop string's tokens are only not matched. None the client names itself: vLLM
        reports those as ids."""
        if not self.privacy.stop_token_ids or request.min_tokens:
            return {}
        skip_special = request.skip_special_tokens is not False
        named = set(request.stop_token_ids or [])
        ids = {one_token_id(self.tokenizer, text, skip_special): text for text in strings}
        return {i: text for i, text in ids.items() if i is not None and i not in named}

    async def _prepare(
        self, request: CompletionRequest, tenant: str
    ) -> tuple[UpstreamCall, list[PromptInput]]:
        check_model(request.model, self.served_name, self.embedding_models)
        prompts, client_embeds = request.text_prompts(), request.embeds_list()
        check_items(len(prompts) + len(client_embeds), self.limits, "prompt")
        self._check_sampling(request, request.max_tokens, request.logprobs)
        # Every prompt goes upstream as embeddings, so vLLM's refusals apply to all of them;
        # answering here also keeps the suffix text from ever leaving the gateway.
        check_embeds_compatible(request)
        token_ids = await self._token_ids(prompts, request.add_special_tokens,
                                          request.max_tokens)
        if not client_embeds and not token_ids:
            raise GatewayError("Either prompt or prompt_embeds must be given.", 400,
                               param="prompt")
        self._check_token_ids(token_ids, request.max_tokens)
        upstream: list[PromptInput] = []
        if client_embeds:
            upstream += await asyncio.to_thread(self._decode, client_embeds, request.max_tokens)
        # vLLM's order: the embeddings' choices first, then the text prompts'.
        upstream += token_ids
        self._check_request_rows(upstream)
        fields, stops = self._stops(request)
        call = UpstreamCall(self.served_name, fields, bool(request.stream),
                            payload_bytes=self._payload_bytes(upstream),
                            request_id=request_id.current(),
                            prefix_key=await self._prefix_key(upstream, tenant),
                            stops=stops)
        return call, upstream

    def _splice(self, rendered: RenderedChat, max_tokens: int | None) -> PromptInput:
        """The templated prompt: token ids, or ids with the client's tensors in place."""
        tensors = [decode_prompt_embeds(text, self.embeds_spec, "messages")
                   for text in rendered.embeds]
        rows = rendered.token_count + sum(int(t.shape[0]) for t in tensors)
        if rows == 0:
            raise GatewayError("The chat template produced an empty prompt.", 400,
                               param="messages")
        check_context(rows, max_tokens, self.model.max_model_len)
        if not tensors:
            return [i for run in rendered.segments if isinstance(run, list) for i in run]
        return SplicedPrompt(tuple(p if isinstance(p, list) else tensors[p]
                                   for p in rendered.segments))

    def _render(self, request: ChatCompletionRequest, texts: list[str],
                max_tokens: int | None) -> RenderedChat:
        """The templated, tokenized chat, refused first if its text cannot fit."""
        self._check_text_length(self.chat_budget, texts, max_tokens, "messages")
        check_text_chars(sum(map(len, texts)), self.limits, "messages")
        return self.chat.render(request)

    async def _prepare_chat(
        self, request: ChatCompletionRequest, tenant: str
    ) -> tuple[UpstreamCall, list[PromptInput]]:
        check_model(request.model, self.served_name, self.embedding_models)
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
        fields, stops = self._stops(request)
        call = UpstreamCall(self.served_name, fields, bool(request.stream), chat=shape,
                            payload_bytes=self._payload_bytes([prompt]),
                            request_id=request_id.current(),
                            prefix_key=await self._prefix_key([prompt], tenant),
                            stops=stops)
        return call, [prompt]

    async def completions(self, body: bytes, key_tenant: str | None = None) -> Response:
        """`/v1/completions`; `key_tenant` is the tenant of the API key the request was
        accepted with, if any (`tenant`)."""
        tenant = self.tenant(key_tenant)
        return await answer(body, CompletionRequest,
                            lambda request: self._complete(request, tenant))

    async def chat_completions(self, body: bytes, key_tenant: str | None = None) -> Response:
        """`/v1/chat/completions`, as `completions` takes it."""
        tenant = self.tenant(key_tenant)
        return await answer(body, ChatCompletionRequest,
                            lambda request: self._chat(request, tenant))

    async def _complete(self, request: CompletionRequest, tenant: str) -> Response:
        return await self._respond(*await self._prepare(request, tenant), tenant)

    async def _chat(self, request: ChatCompletionRequest, tenant: str) -> Response:
        return await self._respond(*await self._prepare_chat(request, tenant), tenant)

    async def _respond(self, call: UpstreamCall, prompts: list[PromptInput],
                       tenant: str) -> Response:
        record = access.current()
        if record is not None:
            record.model = self.served_name
            record.prompt_tokens_text, record.prompt_tokens_client_embeds = _rows_by_source(
                prompts)
        if not call.stream:
            reply = await self.pipeline.complete(call, prompts, tenant)
            if record is not None:
                record.backend = reply.backend
                if reply.status == 200:
                    record.completion_tokens = _completion_tokens(reply.body)
            return Response(reply.body, status_code=reply.status,
                            media_type="application/json", headers=reply.headers)
        head, events = await self.pipeline.open_stream(call, prompts, tenant)
        if record is not None:
            record.backend = head.backend
        if head.status != 200:
            await events.aclose()
            return Response(head.body, status_code=head.status, media_type="application/json",
                            headers=head.headers)
        return StreamingResponse(relay(events, record), media_type="text/event-stream")


def _rows_by_source(prompts: Sequence[PromptInput]) -> tuple[int, int]:
    """Prompt rows from text (token ids) and from client embeddings."""
    text = embeds = 0
    for prompt in prompts:
        segments = prompt.segments if isinstance(prompt, SplicedPrompt) else (prompt,)
        for segment in segments:
            if isinstance(segment, torch.Tensor):
                embeds += int(segment.shape[0])
            else:
                text += len(segment)
    return text, embeds


def _completion_tokens(body: bytes) -> int | None:
    """`usage.completion_tokens` of an answer (or of a stream's usage event)."""
    try:
        usage = orjson.loads(body).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else None


async def relay(events: EventStream,
                record: access.RequestRecord | None = None) -> AsyncIterator[bytes]:
    """Pass SSE events through. A failure after the first byte (a replica gone, a broken
    connection between replicas) ends the stream with an error event and `[DONE]`: the
    status line has gone, so the event is the only way left to say it. However the
    relay ends, the events are closed, which ends the upstream request.

    Events with usage (`stream_options.include_usage`) give the record its completion
    tokens; only those are parsed."""
    try:
        async for event in events:
            if record is not None and b'"usage"' in event:
                tokens = _completion_tokens(event.removeprefix(b"data: ").strip())
                if tokens is not None:
                    record.completion_tokens = tokens
            yield event
    except Exception as exc:
        yield to_gateway_error(exc).to_sse_event()
        yield SSE_DONE
    finally:
        await events.aclose()
