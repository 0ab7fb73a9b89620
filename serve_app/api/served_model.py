"""ServedModel: what the completions and chat APIs share of the model they serve, and the
pipeline call that answers both.

Its tokenizer and limits, its prompt adapters (`select`), the length checks before
tokenizing, the client-tensor decode, the sampling and forwarding checks; for a request's
prompts, the payload size, the prefix key and the stop rule of its `UpstreamCall`; then
the call itself (`respond`), whose stream goes back to the client through `relay`.
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
from serve_app.config import AdapterConfig, AppConfig
from serve_app.errors import GatewayError, to_gateway_error
from serve_app.limits import check_forwarding, check_model, check_sampling
from serve_app.observability import access, request_id
from serve_app.prompts.adapters import (
    AdapterError,
    PromptAdapter,
    load_prompt_adapters,
    reload_prompt_adapters,
)
from serve_app.prompts.chat_template import load_chat_template
from serve_app.prompts.checkpoint import (
    ModelSpec,
    load_tokenizer,
    read_model_spec,
    resolve_model_dir,
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

PromptRequest = CompletionRequest | ChatCompletionRequest


class ServedModel:
    """The generative model behind `/v1/completions` and `/v1/chat/completions`, and the
    pipeline that reaches it."""

    def __init__(
        self, config: AppConfig, tokenizer: Any, spec: ModelSpec, pipeline: Pipeline,
        chat_template: str | None = None, adapters: dict[str, PromptAdapter] | None = None,
    ) -> None:
        self.served_name = config.model.name
        self.embedding_models = {model.name for model in config.embedding_models}
        self.tokenizer = tokenizer
        self.spec = spec
        self.chat_template = chat_template
        """The configured template (`model.chat_template`), or None for the tokenizer's."""
        self.embeds_spec = spec.embeds_spec(config.limits.max_embeds_bytes)
        self.pipeline = pipeline
        self.limits = config.limits
        self.privacy = config.privacy
        self.tokenization = config.tokenization
        self.routing = config.upstream.routing
        # Keyed rows differ between tenants, so a prefix's cache is a tenant's: its routing
        # key names the tenant, and one tenant's hot prefix does not draw every tenant's
        # copy of it to one backend. Other kinds' rows are the same for every tenant.
        self.keyed = config.privacy.transform.kind == "keyed_gaussian"
        self.tenants_by_key = config.privacy.transform.tenant == "api_key"
        self.max_prompt_tokens = self.limits.prompt_tokens_cap(spec.max_model_len)
        self.adapters: dict[str, PromptAdapter] = adapters or {}
        """The prompt adapters by name, on the CPU: their rows' count bounds a request's
        length, and their rows' bytes key its route. `set_adapters` replaces the mapping
        whole; a request keeps the adapter it selected."""

    @classmethod
    def from_config(cls, config: AppConfig, pipeline: Pipeline) -> ServedModel:
        model_dir = resolve_model_dir(config.model, weights=False)
        spec = read_model_spec(model_dir, config.model)
        return cls(config, load_tokenizer(model_dir), spec, pipeline,
                   load_chat_template(config.model.chat_template),
                   load_prompt_adapters(config.model.adapters, spec))

    def model_cards(self) -> list[ModelCard]:
        """The served model, then each prompt adapter with it as `parent`."""
        context = self.spec.max_model_len
        return [ModelCard(id=self.served_name, max_model_len=context),
                *(ModelCard(id=name, max_model_len=context, parent=self.served_name)
                  for name in self.adapters)]

    def set_adapters(self, wanted: list[AdapterConfig]) -> None:
        """Accept and list the `wanted` adapters (`adapters.reload_prompt_adapters`): on a
        refusal (`AdapterError`) the set stays as it was."""
        for adapter in wanted:
            if adapter.name == self.served_name or adapter.name in self.embedding_models:
                raise AdapterError(adapter, "the name is a served model's; adapters need "
                                            "names of their own")
        self.adapters = reload_prompt_adapters(self.adapters, wanted, self.spec)

    def select(self, model: str) -> PromptAdapter | None:
        """The prompt adapter a request's `model` names, None for the served model itself,
        else the 404 of an unknown model."""
        adapter = self.adapters.get(model)
        if adapter is None:
            check_model(model, self.served_name, self.embedding_models)
        return adapter

    def tenant(self, key_tenant: str | None) -> str:
        """A request's tenant: its API key's (`key_tenant`, from the key check) under
        `privacy.transform.tenant: api_key`, else the shared one."""
        return key_tenant if key_tenant is not None and self.tenants_by_key else SHARED_TENANT

    # ------------------------------------------------------------------ checks before work

    def check_text_length(self, budget: TextBudget, texts: Sequence[str],
                          max_tokens: int | None, param: str, virtual_tokens: int = 0) -> None:
        """Length before work: refuse text that cannot fit before tokenizing any of it,
        beside an adapter's `virtual_tokens`."""
        room = max(0, self.spec.max_model_len - (max_tokens or 0) - virtual_tokens)
        if budget.exceeds(texts, room):
            raise too_long(sum(map(len, texts)), room, self.spec.max_model_len, max_tokens,
                           param)

    def over_request_budget(self, amount: int, unit: str) -> GatewayError:
        return GatewayError(
            f"The request's prompts come to {amount} {unit}; at most "
            f"{self.max_prompt_tokens} prompt tokens are accepted in one request "
            "(limits.max_prompt_tokens).", 400, param="prompt", code="too_many_tokens")

    def check_sampling(self, request: PromptRequest, max_tokens: int | None,
                       logprobs: int | None, logprobs_param: str = "logprobs") -> None:
        check_sampling(request, max_tokens, logprobs, self.limits, self.spec.vocab_size,
                       logprobs_param)
        check_forwarding(request, self.privacy)

    def decode(self, text: str, param: str) -> torch.Tensor:
        """A client tensor, checked and in the model's dtype (`prompts.untrusted`)."""
        return decode_prompt_embeds(text, self.embeds_spec, param)

    # ------------------------------------------------------------------ the upstream call

    async def upstream_call(self, request: PromptRequest, prompts: Sequence[PromptInput],
                            tenant: str, chat: ChatShape | None = None,
                            adapter: PromptAdapter | None = None) -> UpstreamCall:
        """The call for a request's prompts (each led by `adapter`'s rows, if any): its
        allowlisted fields and stop rule, the payload size and the routing key."""
        fields, stops = self._stops(request)
        return UpstreamCall(self.served_name, fields, bool(request.stream), chat=chat,
                            payload_bytes=self._payload_bytes(prompts, adapter),
                            request_id=request_id.current(),
                            prefix_key=await self._prefix_key(prompts, tenant, adapter),
                            stops=stops, adapter=adapter.name if adapter else None)

    def _payload_bytes(self, prompts: Sequence[PromptInput],
                       adapter: PromptAdapter | None) -> int:
        """The base64 the upstream call will carry, known before any lookup."""
        row_bytes = self.spec.hidden_size * self.spec.dtype.itemsize
        virtual = adapter.virtual_tokens if adapter else 0
        return sum(base64_length((virtual + prompt_rows(prompt)) * row_bytes)
                   for prompt in prompts)

    async def _prefix_key(self, prompts: Sequence[PromptInput], tenant: str,
                          adapter: PromptAdapter | None) -> int | None:
        """The request's routing key; client tensor rows are hashed off the event loop.
        An adapter's rows lead the prompt as client rows would: the backend's cache keys
        on the rows, whoever made them."""
        if prompts and adapter is not None:
            first = prompts[0]
            segments = first.segments if isinstance(first, SplicedPrompt) else (list(first),)
            prompts = [SplicedPrompt((adapter.rows, *segments))]
        key_of = functools.partial(prefix_key, prompts, self.routing.block_size,
                                   self.routing.prefix_blocks, tenant if self.keyed else None)
        if prompts and isinstance(prompts[0], SplicedPrompt):
            return await asyncio.to_thread(key_of)
        return key_of()

    def _stops(self, request: PromptRequest) -> tuple[SamplingFields, StopRule | None]:
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

    def _stop_token_ids(self, request: PromptRequest, strings: list[str]) -> dict[int, str]:
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

    async def respond(self, call: UpstreamCall, prompts: list[PromptInput],
                      tenant: str) -> Response:
        """The pipeline's answer to the call: a JSON response, or the stream relayed."""
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
