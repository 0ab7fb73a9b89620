"""ChatService: OpenAI chat requests turned into one prompt for the pipeline.

The messages are templated and tokenized here (`prompts.chat_template`); each
`prompt_embeds` part is decoded and checked here and spliced in where the template placed
it (`SplicedPrompt`). A `model` naming a prompt adapter puts its virtual tokens before the
templated conversation, in the Embedder; they count in the length checks here. The served
model (`api.served_model`) then calls the pipeline, and the Dispatcher answers in the chat
shape (`ChatShape`).
"""

from __future__ import annotations

import asyncio

from starlette.responses import Response

from serve_app.api.served_model import ServedModel
from serve_app.endpoint import answer
from serve_app.errors import GatewayError
from serve_app.limits import check_context, check_items, check_text_chars
from serve_app.prompts.chat_template import ChatTemplate, RenderedChat
from serve_app.prompts.checkpoint import tokenize_off_loop_if_large
from serve_app.prompts.embedder import PromptInput, SplicedPrompt
from serve_app.prompts.text_budget import TextBudget
from serve_app.protocol import ChatCompletionRequest
from serve_app.upstream.call import ChatShape, UpstreamCall


class ChatService:
    """`/v1/chat/completions` for the served model."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        tokenization = served.tokenization
        parses = tokenization.chat_special_tokens == "parse"
        self.template = ChatTemplate(served.tokenizer, served.chat_template,
                                     special_tokens_as_text=not parses,
                                     turn_markers=tokenization.chat_turn_markers)
        self.budget = TextBudget.of(served.tokenizer, parses)

    async def create_chat_completion(self, body: bytes,
                                     key_tenant: str | None = None) -> Response:
        """`/v1/chat/completions`; `key_tenant` is the tenant of the API key the request
        was accepted with, if any (`ServedModel.tenant`)."""
        tenant = self.served.tenant(key_tenant)
        return await answer(body, ChatCompletionRequest,
                            lambda request: self._chat(request, tenant))

    async def _chat(self, request: ChatCompletionRequest, tenant: str) -> Response:
        call, prompts = await self._prepare(request, tenant)
        return await self.served.respond(call, prompts, tenant)

    async def _prepare(
        self, request: ChatCompletionRequest, tenant: str
    ) -> tuple[UpstreamCall, list[PromptInput]]:
        served = self.served
        adapter = served.select(request.model)
        virtual = adapter.virtual_tokens if adapter else 0
        parts = sum(len(m.content) if isinstance(m.content, list) else 1
                    for m in request.messages)
        check_items(parts, served.limits, "messages")
        max_tokens = request.completion_max_tokens
        served.check_sampling(request, max_tokens, request.max_logprobs, "top_logprobs")
        texts = request.texts()
        rendered = await tokenize_off_loop_if_large(sum(map(len, texts)), self._render,
                                                    request, texts, max_tokens, virtual)
        if rendered.embeds:
            prompt = await asyncio.to_thread(self._splice, rendered, max_tokens, virtual)
        else:
            prompt = self._splice(rendered, max_tokens, virtual)
        shape = ChatShape(top_logprobs=request.max_logprobs)
        call = await served.upstream_call(request, [prompt], tenant, chat=shape,
                                          adapter=adapter)
        return call, [prompt]

    def _render(self, request: ChatCompletionRequest, texts: list[str],
                max_tokens: int | None, virtual: int) -> RenderedChat:
        """The templated, tokenized chat, refused first if its text cannot fit beside the
        adapter's `virtual` tokens."""
        self.served.check_text_length(self.budget, texts, max_tokens, "messages", virtual)
        check_text_chars(sum(map(len, texts)), self.served.limits, "messages")
        return self.template.render(request)

    def _splice(self, rendered: RenderedChat, max_tokens: int | None,
                virtual: int) -> PromptInput:
        """The templated prompt: token ids, or ids with the client's tensors in place."""
        tensors = [self.served.decode(part.data, part.param) for part in rendered.embeds]
        rows = rendered.token_count + sum(int(t.shape[0]) for t in tensors)
        if rows == 0:
            raise GatewayError("The chat template produced an empty prompt.", 400,
                               param="messages")
        check_context(virtual + rows, max_tokens, self.served.spec.max_model_len, "messages")
        if not tensors:
            return [i for run in rendered.segments if isinstance(run, list) for i in run]
        return SplicedPrompt(tuple(p if isinstance(p, list) else tensors[p]
                                   for p in rendered.segments))
