"""The reference backend: a small vLLM-compatible `/v1/completions` server for embeddings.

It is the embedded default upstream: it accepts only `prompt_embeds` (a text prompt gets
400, like a server that must never see text), decodes them with the gateway's safe codec,
and generates from them with a transformers causal LM (`reference_generation`). Greedy at
temperature 0; sampling with temperature / top_p / seed; penalties, logit bias, logprobs,
stop strings, n, streaming, usage.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import torch
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from serve_app.config import ReferenceBackendConfig
from serve_app.errors import GatewayError, model_not_found, to_gateway_error
from serve_app.prompts.checkpoint import (
    load_tokenizer,
    read_model_spec,
    resolve_model_dir,
    select_device,
)
from serve_app.prompts.codec import EmbedsSpec, decode_prompt_embeds
from serve_app.protocol import SSE_DONE, CompletionRequest, ModelCard, ModelList
from serve_app.reference.generation import (
    CompletionLogprobsBuilder,
    SamplingParams,
    TextAssembler,
    TextDelta,
    TokenStep,
    decode_steps,
)

Emit = Callable[[int, TextDelta | None, str | None], None]
"""`emit(choice index, new text or None, finish reason or None)`."""


class ReferenceBackend:
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
    def from_config(cls, config: ReferenceBackendConfig) -> ReferenceBackend:
        from transformers import AutoModelForCausalLM

        model_dir: Path = resolve_model_dir(config.model)
        spec = read_model_spec(model_dir, config.model)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=spec.dtype)
        model.to(select_device(config.model.device)).eval()
        return cls(model, load_tokenizer(model_dir), config.model.name, spec.embeds_spec(),
                   spec.max_model_len, config.max_tokens_default)

    def _validate(self, request: CompletionRequest) -> list[torch.Tensor]:
        if request.model != self.served_name:
            raise model_not_found(request.model)
        if request.text_prompts():
            raise GatewayError("This server accepts only prompt_embeds, not text prompts.",
                               400, param="prompt")
        embeds = request.embeds_list()
        if not embeds:
            raise GatewayError("prompt_embeds is required.", 400, param="prompt_embeds")
        structured = request.structured_fields()
        if structured:
            raise GatewayError(f"{structured[0]} is not supported by the reference backend.",
                               400, param=structured[0])
        incompatible = request.incompatible_with_embeds()
        if incompatible:
            raise GatewayError(f"{incompatible} is not compatible with prompt embeds.", 400,
                               param=incompatible)
        tensors = [decode_prompt_embeds(text, self.spec) for text in embeds]
        max_tokens = self._max_tokens(request)
        for tensor in tensors:
            if tensor.shape[0] + max_tokens > self.max_model_len:
                raise GatewayError(
                    f"This model's maximum context length is {self.max_model_len} tokens; the "
                    f"request has {tensor.shape[0]} prompt tokens and max_tokens {max_tokens}.",
                    400, param="max_tokens")
        return tensors

    def _max_tokens(self, request: CompletionRequest) -> int:
        return request.max_tokens or self.max_tokens_default

    def generate_one(self, embeds: torch.Tensor, params: SamplingParams,
                     generator: torch.Generator | None, on_delta: Callable[[TextDelta], None],
                     cancelled: threading.Event) -> tuple[TextDelta | None, str, int]:
        """One sample for one prompt; `on_delta` gets each piece of text as it is settled.

        Returns the last piece (held back until the end), the finish reason and the
        number of tokens generated.
        """
        assembler = TextAssembler(self.tokenizer, params.stop, on_delta)
        tokens, finish = 0, "length"
        eos = self.tokenizer.eos_token_id
        for step in decode_steps(self.model, embeds, params, eos, generator, cancelled):
            tokens += 1
            if assembler.add(step):
                finish = "stop"
                break
            if step.token_id == eos:
                finish = "stop"
        return assembler.finish(), finish, tokens

    def run(self, tensors: list[torch.Tensor], request: CompletionRequest, emit: Emit,
            cancelled: threading.Event | None = None) -> int:
        """Generate every (prompt, sample); `emit(index, delta, finish_reason)`. Returns tokens.

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
                        emit(index, delta, None)

                    if cancelled.is_set():
                        return completion_tokens
                    last, finish, tokens = self.generate_one(tensor, params, generator,
                                                             on_delta, cancelled)
                    emit(index, last, finish)
                    completion_tokens += tokens
        return completion_tokens

    def usage(self, tensors: list[torch.Tensor], completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(int(t.shape[0]) for t in tensors)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def complete(self, request: CompletionRequest) -> dict[str, Any]:
        tensors = await asyncio.to_thread(self._validate, request)
        texts: dict[int, list[str]] = {}
        steps: dict[int, list[TokenStep]] = {}
        finishes: dict[int, str] = {}

        def emit(index: int, delta: TextDelta | None, finish: str | None) -> None:
            if delta:
                texts.setdefault(index, []).append(delta.text)
                steps.setdefault(index, []).extend(delta.steps)
            if finish:
                finishes[index] = finish

        completion_tokens = await asyncio.to_thread(self.run, tensors, request, emit)
        choices = [
            {"index": i, "text": "".join(texts.get(i, [])),
             "logprobs": self._logprobs(request, steps.get(i, [])),
             "finish_reason": finishes[i], "stop_reason": None}
            for i in sorted(finishes)
        ]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.served_name, "choices": choices,
                "usage": self.usage(tensors, completion_tokens)}

    def _logprobs(self, request: CompletionRequest, steps: list[TokenStep],
                  builder: CompletionLogprobsBuilder | None = None) -> dict[str, Any] | None:
        if request.logprobs is None:
            return None
        return (builder or CompletionLogprobsBuilder(self.tokenizer)).build(steps)

    async def stream(self, request: CompletionRequest) -> AsyncIterator[bytes]:
        """Validate first (errors become HTTP errors), then yield SSE events to `[DONE]`."""
        tensors = await asyncio.to_thread(self._validate, request)
        return self._events(tensors, request)

    async def _events(self, tensors: list[torch.Tensor],
                      request: CompletionRequest) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.served_name}
        builders: dict[int, CompletionLogprobsBuilder] = {}

        def emit(index: int, delta: TextDelta | None, finish: str | None) -> None:
            builder = builders.setdefault(index, CompletionLogprobsBuilder(self.tokenizer))
            logprobs = self._logprobs(request, delta.steps if delta else [], builder)
            choice = {"index": index, "text": delta.text if delta else "",
                      "logprobs": logprobs, "finish_reason": finish, "stop_reason": None}
            loop.call_soon_threadsafe(queue.put_nowait, {**head, "choices": [choice]})

        cancelled = threading.Event()

        def produce() -> None:
            try:
                tokens = self.run(tensors, request, emit, cancelled)
                if request.include_usage:
                    final = {**head, "choices": [], "usage": self.usage(tensors, tokens)}
                    loop.call_soon_threadsafe(queue.put_nowait, final)
            except Exception as exc:
                error = to_gateway_error(exc).to_dict()
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        producer = loop.run_in_executor(None, produce)
        try:
            while (event := await queue.get()) is not None:
                yield b"data: " + orjson.dumps(event) + b"\n\n"
            yield SSE_DONE
        finally:
            cancelled.set()  # a client that left stops the generation, not just the relay
            await producer


def create_reference_app(backend: ReferenceBackend) -> FastAPI:
    app = FastAPI(title="serve_app reference backend", docs_url=None, redoc_url=None)

    @app.exception_handler(Exception)
    async def _error(_: Request, exc: Exception) -> Response:
        return to_gateway_error(exc).to_response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=backend.served_name,
                                         max_model_len=backend.max_model_len)])

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        try:
            request = CompletionRequest.model_validate(orjson.loads(await raw.body()))
            if request.stream:
                events = await backend.stream(request)
                return StreamingResponse(events, media_type="text/event-stream")
            body = orjson.dumps(await backend.complete(request))
            return Response(body, media_type="application/json")
        except Exception as exc:
            return to_gateway_error(exc).to_response()

    return app
