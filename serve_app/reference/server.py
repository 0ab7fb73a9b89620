"""The reference upstream's core: vLLM-compatible completions generated from prompt embeddings.

It is the embedded default upstream: it accepts only `prompt_embeds` (a text prompt gets
400, like a server that must never see text), decodes them with the gateway's safe codec,
and generates from them with a transformers causal LM (`generation`). Greedy at
temperature 0; sampling with temperature / top_p / seed; penalties, logit bias, logprobs,
stop strings and stop token ids (with vLLM's `stop_reason`), n, streaming, usage. Plain
Python: its HTTP app is in `app`.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch

from serve_app.config import ReferenceConfig
from serve_app.errors import GatewayError, to_gateway_error
from serve_app.limits import check_context, check_embeds_compatible, check_model
from serve_app.prompts.checkpoint import (
    load_tokenizer,
    read_model_spec,
    resolve_model_dir,
    select_device,
)
from serve_app.prompts.untrusted import EmbedsSpec, decode_prompt_embeds
from serve_app.protocol import SSE_DONE, CompletionRequest, UsageInfo
from serve_app.protocol.common import sse_event
from serve_app.protocol.completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamResponse,
)
from serve_app.reference.generation import (
    CompletionLogprobsBuilder,
    SamplingParams,
    TextAssembler,
    TextDelta,
    TokenStep,
    decode_steps,
)

StopReason = int | str | None
"""vLLM's `stop_reason`: the stop string or stop token id that ended a choice."""

Emit = Callable[[int, TextDelta | None, str | None, StopReason], None]
"""`emit(choice index, new text or None, finish reason or None, stop reason)`."""


class ReferenceServer:
    """Generation from prompt embeddings with a transformers causal LM (plain Python)."""

    def __init__(self, model: Any, tokenizer: Any, served_name: str, spec: EmbedsSpec,
                 max_model_len: int, max_tokens_default: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.spec = spec
        self.max_model_len = max_model_len
        self.max_tokens_default = max_tokens_default
        # One generation at a time: generate() and the seeded global RNG are shared state.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: ReferenceConfig) -> ReferenceServer:
        from transformers import AutoModelForCausalLM

        model_dir: Path = resolve_model_dir(config.model)
        spec = read_model_spec(model_dir, config.model)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=spec.dtype)
        model.to(select_device(config.model.device)).eval()
        return cls(model, load_tokenizer(model_dir), config.model.name, spec.embeds_spec(),
                   spec.max_model_len, config.max_tokens_default)

    def _validate(self, request: CompletionRequest) -> list[torch.Tensor]:
        """The request's prompt tensors, or the refusal vLLM would give; this server also
        refuses what it cannot honour (text prompts, structured outputs)."""
        check_model(request.model, self.served_name)
        if request.text_prompts():
            raise GatewayError("This server accepts only prompt_embeds, not text prompts.",
                               400, param="prompt")
        embeds = request.embeds_list()
        if not embeds:
            raise GatewayError("prompt_embeds is required.", 400, param="prompt_embeds")
        structured = request.structured_fields()
        if structured:
            # Ignoring them would hand an unconstrained answer back as if constrained.
            raise GatewayError(f"{structured[0]} is not supported by the reference upstream.",
                               400, param=structured[0])
        check_embeds_compatible(request)
        tensors = [decode_prompt_embeds(text, self.spec) for text in embeds]
        for tensor in tensors:
            check_context(int(tensor.shape[0]), self._max_tokens(request), self.max_model_len)
        return tensors

    def _max_tokens(self, request: CompletionRequest) -> int:
        return request.max_tokens or self.max_tokens_default

    def generate_one(self, embeds: torch.Tensor, params: SamplingParams,
                     generator: torch.Generator | None, on_delta: Callable[[TextDelta], None],
                     cancelled: threading.Event
                     ) -> tuple[TextDelta | None, str, StopReason, int]:
        """One sample for one prompt; `on_delta` gets each token's settled text.

        Returns the last piece (held back until the end), the finish and stop reasons and
        the number of tokens generated. As in vLLM, a stop string or stop token counts
        among the tokens, and a stop token's text is left out unless
        `include_stop_str_in_output`.
        """
        assembler = TextAssembler(self.tokenizer, params, on_delta)
        tokens, finish, reason = 0, "length", None
        eos = self.tokenizer.eos_token_id
        for step in decode_steps(self.model, embeds, params, eos, generator, cancelled):
            tokens += 1
            stop_token = step.token_id in params.stop_token_ids
            last = step.token_id == eos or stop_token or tokens == params.max_tokens
            with_text = not stop_token or params.include_stop_str_in_output
            if assembler.add(step, last=last, with_text=with_text):
                return assembler.finish(), "stop", assembler.stop_string, tokens
            if stop_token:
                return assembler.finish(), "stop", step.token_id, tokens
            if step.token_id == eos:
                finish = "stop"
        return assembler.finish(), finish, reason, tokens

    def run(self, tensors: list[torch.Tensor], request: CompletionRequest, emit: Emit,
            cancelled: threading.Event | None = None) -> int:
        """Generate every (prompt, sample); `emit(index, delta, finish, stop_reason)`.
        Returns the tokens generated.

        Setting `cancelled` (the client went away) stops at the next token.
        """
        cancelled = cancelled or threading.Event()
        params = SamplingParams.from_request(request, self.max_tokens_default,
                                             self.model.config.vocab_size)
        generator = None
        if request.seed is not None and params.temperature > 0:
            generator = torch.Generator().manual_seed(request.seed)
        completion_tokens = 0
        with self._lock:
            for prompt_index, tensor in enumerate(tensors):
                for sample in range(request.n):
                    index = prompt_index * request.n + sample

                    def on_delta(delta: TextDelta, index: int = index) -> None:
                        emit(index, delta, None, None)

                    if cancelled.is_set():
                        return completion_tokens
                    last, finish, reason, tokens = self.generate_one(
                        tensor, params, generator, on_delta, cancelled)
                    emit(index, last, finish, reason)
                    completion_tokens += tokens
        return completion_tokens

    def usage(self, tensors: list[torch.Tensor], completion_tokens: int) -> UsageInfo:
        prompt_tokens = sum(int(t.shape[0]) for t in tensors)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        tensors = await asyncio.to_thread(self._validate, request)
        texts: dict[int, list[str]] = {}
        steps: dict[int, list[TokenStep]] = {}
        finishes: dict[int, tuple[str, StopReason]] = {}

        def emit(index: int, delta: TextDelta | None, finish: str | None,
                 reason: StopReason) -> None:
            if delta:
                texts.setdefault(index, []).append(delta.text)
                steps.setdefault(index, []).extend(delta.steps)
            if finish:
                finishes[index] = finish, reason

        completion_tokens = await asyncio.to_thread(self.run, tensors, request, emit)
        choices = [
            CompletionChoice(index=i, text="".join(texts.get(i, [])),
                             logprobs=_logprobs(request, steps.get(i, []),
                                                CompletionLogprobsBuilder(self.tokenizer)),
                             finish_reason=finishes[i][0], stop_reason=finishes[i][1])
            for i in sorted(finishes)
        ]
        return CompletionResponse(id=_completion_id(), created=int(time.time()),
                                  model=self.served_name, choices=choices,
                                  usage=self.usage(tensors, completion_tokens))

    async def stream(self, request: CompletionRequest) -> AsyncIterator[bytes]:
        """Validate first (errors become HTTP errors), then yield SSE events to `[DONE]`."""
        tensors = await asyncio.to_thread(self._validate, request)
        return self._events(tensors, request)

    async def _events(self, tensors: list[torch.Tensor],
                      request: CompletionRequest) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        chunks = _StreamChunks(request, self.served_name, self.tokenizer)
        cancelled = threading.Event()

        def send(event: bytes | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def emit(index: int, delta: TextDelta | None, finish: str | None,
                 reason: StopReason) -> None:
            send(chunks.choice(index, delta, finish, reason))

        def produce() -> None:
            try:
                tokens = self.run(tensors, request, emit, cancelled)
                if request.include_usage:
                    send(chunks.usage(self.usage(tensors, tokens)))
            except Exception as exc:
                send(to_gateway_error(exc).to_sse_event())
            finally:
                send(None)

        producer = loop.run_in_executor(None, produce)
        try:
            while (event := await queue.get()) is not None:
                yield event
            yield SSE_DONE
        finally:
            cancelled.set()  # a client that left stops the generation, not just the relay
            await producer


class _StreamChunks:
    """One stream's events as vLLM writes them: every chunk with all its fields (`usage`,
    `logprobs` and `stop_reason` null until set), the usage chunk without its nulls."""

    def __init__(self, request: CompletionRequest, served_name: str, tokenizer: Any) -> None:
        self.request = request
        self.served_name = served_name
        self.tokenizer = tokenizer
        self.id = _completion_id()
        self.created = int(time.time())
        self.builders: dict[int, CompletionLogprobsBuilder] = {}

    def _chunk(self, choices: list[CompletionChoice],
               usage: UsageInfo | None = None) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=self.id, created=self.created,
                                        model=self.served_name, choices=choices,
                                        usage=usage)

    def choice(self, index: int, delta: TextDelta | None, finish: str | None,
               reason: StopReason) -> bytes:
        builder = self.builders.setdefault(index, CompletionLogprobsBuilder(self.tokenizer))
        logprobs = _logprobs(self.request, delta.steps if delta else [], builder)
        choice = CompletionChoice(index=index, text=delta.text if delta else "",
                                  logprobs=logprobs, finish_reason=finish, stop_reason=reason)
        return sse_event(self._chunk([choice]).model_dump_json().encode())

    def usage(self, usage: UsageInfo) -> bytes:
        return sse_event(self._chunk([], usage).model_dump_json(exclude_none=True).encode())


def _logprobs(request: CompletionRequest, steps: list[TokenStep],
              builder: CompletionLogprobsBuilder) -> CompletionLogprobs | None:
    """The choice's `logprobs` for these steps (offsets running on in `builder`), or None
    when the request does not ask for them."""
    if request.logprobs is None:
        return None
    return CompletionLogprobs.model_validate(builder.build(steps))


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"
