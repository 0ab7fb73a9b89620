"""CompletionsService: OpenAI completions requests turned into prompts for the pipeline.

A prompt is token ids: text tokenized here, or ids as the client sent them; or a client
tensor, decoded and checked here, as a `SplicedPrompt` of one segment. A `model` naming a
prompt adapter puts its virtual tokens before each prompt, in the Embedder; its rows count
in every length check here. The served model (`api.served_model`) then calls the pipeline
with them, in vLLM's order: the embeddings' prompts first, then the text's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from starlette.responses import Response

from serve_app.api.served_model import ServedModel
from serve_app.endpoint import answer
from serve_app.errors import GatewayError, item_param
from serve_app.limits import (
    check_context,
    check_embeds_compatible,
    check_items,
    check_text_chars,
)
from serve_app.prompts.checkpoint import tokenize_off_loop_if_large
from serve_app.prompts.embedder import PromptInput, SplicedPrompt, prompt_rows
from serve_app.prompts.text_budget import TextBudget
from serve_app.protocol import CompletionRequest
from serve_app.upstream.call import UpstreamCall


class CompletionsService:
    """`/v1/completions` for the served model."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        tokenization = served.tokenization
        self.split_special_tokens = tokenization.completion_special_tokens == "text"
        self.budget = TextBudget.of(served.tokenizer, not self.split_special_tokens)

    async def create_completion(self, body: bytes, key_tenant: str | None = None) -> Response:
        """`/v1/completions`; `key_tenant` is the tenant of the API key the request was
        accepted with, if any (`ServedModel.tenant`)."""
        tenant = self.served.tenant(key_tenant)
        return await answer(body, CompletionRequest,
                            lambda request: self._complete(request, tenant))

    async def _complete(self, request: CompletionRequest, tenant: str) -> Response:
        call, prompts = await self._prepare(request, tenant)
        return await self.served.respond(call, prompts, tenant)

    async def _prepare(
        self, request: CompletionRequest, tenant: str
    ) -> tuple[UpstreamCall, list[PromptInput]]:
        served = self.served
        adapter = served.select(request.model)
        virtual = adapter.virtual_tokens if adapter else 0
        prompts, client_embeds = request.text_prompts(), request.embeds_list()
        check_items(len(prompts) + len(client_embeds), served.limits, "prompt")
        served.check_sampling(request, request.max_tokens, request.logprobs)
        # Every prompt goes upstream as embeddings, so vLLM's refusals apply to all of them;
        # answering here also keeps the suffix text from ever leaving the gateway.
        check_embeds_compatible(request)
        listed = request.prompt_listed()
        token_ids = await self._token_ids(prompts, request.add_special_tokens,
                                          request.max_tokens, listed, virtual)
        if not client_embeds and not token_ids:
            raise GatewayError("Either prompt or prompt_embeds must be given.", 400,
                               param="prompt")
        self._check_token_ids(token_ids, request.max_tokens, listed, virtual)
        upstream: list[PromptInput] = []
        if client_embeds:
            upstream += await asyncio.to_thread(
                self._decode, client_embeds, isinstance(request.prompt_embeds, list),
                request.max_tokens, virtual)
        # vLLM's order: the embeddings' choices first, then the text prompts'.
        upstream += token_ids
        self._check_request_rows(upstream, virtual)
        call = await served.upstream_call(request, upstream, tenant, adapter=adapter)
        return call, upstream

    async def _token_ids(self, prompts: list[str] | list[list[int]], add_special_tokens: bool,
                         max_tokens: int | None, listed: bool,
                         virtual: int) -> list[list[int]]:
        if not prompts or not isinstance(prompts[0], str):
            return prompts  # type: ignore[return-value]
        texts: list[str] = prompts
        # Long text is counted and tokenized off the event loop, its checks included.
        return await tokenize_off_loop_if_large(sum(map(len, texts)), self._tokenize,
                                                texts, add_special_tokens, max_tokens, listed,
                                                virtual)

    def _tokenize(self, texts: list[str], add_special_tokens: bool,
                  max_tokens: int | None, listed: bool, virtual: int) -> list[list[int]]:
        """Text prompts to token ids, refused first (by their path) if they cannot fit
        beside the adapter's `virtual` tokens."""
        served = self.served
        for index, text in enumerate(texts):
            served.check_text_length(self.budget, [text], max_tokens,
                                     item_param("prompt", index, listed), virtual)
        if self.budget.exceeds(texts, served.max_prompt_tokens):
            raise served.over_request_budget(sum(map(len, texts)), "characters")
        check_text_chars(sum(map(len, texts)), served.limits, "prompt")
        encoded = served.tokenizer(texts, add_special_tokens=add_special_tokens,
                                   split_special_tokens=self.split_special_tokens)
        return list(encoded.input_ids)

    def _check_token_ids(self, prompts: list[list[int]], max_tokens: int | None,
                         listed: bool, virtual: int) -> None:
        vocab, context = self.served.spec.vocab_size, self.served.spec.max_model_len
        for index, ids in enumerate(prompts):
            param = item_param("prompt", index, listed)
            if not ids:
                raise GatewayError(f"{param} has no tokens.", 400, param=param)
            if any(not 0 <= i < vocab for i in ids):
                raise GatewayError(f"{param}: token ids must lie in [0, {vocab}).", 400,
                                   param=param)
            check_context(virtual + len(ids), max_tokens, context, param)

    def _check_request_rows(self, prompts: Sequence[PromptInput], virtual: int) -> None:
        rows = sum(virtual + prompt_rows(prompt) for prompt in prompts)
        if rows > self.served.max_prompt_tokens:
            raise self.served.over_request_budget(rows, "tokens")

    def _decode(self, texts: list[str], listed: bool, max_tokens: int | None,
                virtual: int) -> list[PromptInput]:
        """Client embeddings, each checked and in the model's dtype, as prompts of one
        segment: the Embedder encodes them as it encodes everything it sends. A refusal
        names the tensor's path: `prompt_embeds`, or `prompt_embeds.1` in a `listed` one."""
        prompts: list[PromptInput] = []
        for index, text in enumerate(texts):
            param = item_param("prompt_embeds", index, listed)
            tensor = self.served.decode(text, param)
            check_context(virtual + int(tensor.shape[0]), max_tokens,
                          self.served.spec.max_model_len, param)
            prompts.append(SplicedPrompt((tensor,)))
        return prompts
