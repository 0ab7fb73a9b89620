"""The reference backend: a small vLLM-compatible `/v1/completions` server for embeddings.

It is the embedded default upstream: it accepts only `prompt_embeds` (a text prompt gets
400, like a server that must never see text), decodes them with the gateway's safe codec,
and generates with transformers `generate(inputs_embeds=...)`. Greedy at temperature 0;
sampling with temperature / top_p / seed; stop strings, n, streaming, usage.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from serve_app.checkpoint import load_tokenizer, read_model_spec, resolve_model_dir, select_device
from serve_app.codec import EmbedsSpec, decode_prompt_embeds
from serve_app.config import ReferenceBackendConfig
from serve_app.errors import GatewayError, to_gateway_error
from serve_app.protocol import SSE_DONE, CompletionRequest, ModelCard, ModelList


@dataclass
class Completion:
    text: str
    finish_reason: str
    tokens: int


class _StopWatcher:
    """A stopping criterion that also turns generated ids into text deltas.

    It holds back the tail that could still become a stop string, so streamed text
    never contains (part of) a stop sequence.
    """

    def __init__(self, tokenizer: Any, stop: list[str], on_delta: Callable[[str], None],
                 cancelled: threading.Event) -> None:
        self.tokenizer = tokenizer
        self.cancelled = cancelled
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.on_delta = on_delta
        self.text = ""
        self.emitted = 0
        self.tokens = 0
        self.hit_stop = False

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.tokens = input_ids.shape[-1]
        text = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.hit_stop = text[:cut], True
        else:
            self.text = text
        self._emit(final=self.hit_stop)
        done = self.hit_stop or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

    def _emit(self, final: bool) -> None:
        end = len(self.text) if final else len(self.text) - self.holdback
        if not final and self.text.endswith("\ufffd"):
            end = min(end, len(self.text) - 1)  # an incomplete UTF-8 sequence so far
        if end > self.emitted:
            self.on_delta(self.text[self.emitted : end])
            self.emitted = end

    def finish(self) -> None:
        self._emit(final=True)


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
            raise GatewayError(f"The model `{request.model}` does not exist.", 404,
                               param="model", code="model_not_found")
        if request.text_prompts():
            raise GatewayError("This server accepts only prompt_embeds, not text prompts.",
                               400, param="prompt")
        embeds = request.embeds_list()
        if not embeds:
            raise GatewayError("prompt_embeds is required.", 400, param="prompt_embeds")
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

    def generate_one(self, embeds: torch.Tensor, request: CompletionRequest,
                     on_delta: Callable[[str], None],
                     cancelled: threading.Event) -> Completion:
        """One sample for one prompt; calls `on_delta` with each new piece of text."""
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        watcher = _StopWatcher(self.tokenizer, stop, on_delta, cancelled)
        temperature = 1.0 if request.temperature is None else request.temperature
        sampling: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            sampling.update(temperature=temperature, top_p=request.top_p or 1.0, top_k=0)
        inputs = embeds.to(self.model.device)[None]
        with torch.inference_mode():
            generated = self.model.generate(
                inputs_embeds=inputs,
                attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long,
                                          device=self.model.device),
                max_new_tokens=self._max_tokens(request),
                stopping_criteria=[watcher],
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        watcher.finish()
        ids = generated[0].tolist()
        ended_on_eos = bool(ids) and ids[-1] == self.tokenizer.eos_token_id
        finish = "stop" if watcher.hit_stop or ended_on_eos else "length"
        return Completion(watcher.text, finish, len(ids))

    def run(self, tensors: list[torch.Tensor], request: CompletionRequest,
            emit: Callable[[int, str | None, str | None], None],
            cancelled: threading.Event | None = None) -> int:
        """Generate every (prompt, sample); `emit(index, delta, finish_reason)`. Returns tokens.

        Setting `cancelled` (the client went away) stops at the next token.
        """
        cancelled = cancelled or threading.Event()
        completion_tokens = 0
        with self._lock, torch.random.fork_rng(devices=[]):
            if request.seed is not None:
                torch.manual_seed(request.seed)
            for prompt_index, tensor in enumerate(tensors):
                for sample in range(request.n):
                    index = prompt_index * request.n + sample

                    def on_delta(text: str, index: int = index) -> None:
                        emit(index, text, None)

                    if cancelled.is_set():
                        return completion_tokens
                    result = self.generate_one(tensor, request, on_delta, cancelled)
                    emit(index, None, result.finish_reason)
                    completion_tokens += result.tokens
        return completion_tokens

    def usage(self, tensors: list[torch.Tensor], completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(int(t.shape[0]) for t in tensors)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def complete(self, request: CompletionRequest) -> dict[str, Any]:
        tensors = await asyncio.to_thread(self._validate, request)
        texts: dict[int, list[str]] = {}
        finishes: dict[int, str] = {}

        def emit(index: int, delta: str | None, finish: str | None) -> None:
            if delta:
                texts.setdefault(index, []).append(delta)
            if finish:
                finishes[index] = finish

        completion_tokens = await asyncio.to_thread(self.run, tensors, request, emit)
        choices = [
            {"index": i, "text": "".join(texts.get(i, [])), "logprobs": None,
             "finish_reason": finishes[i], "stop_reason": None}
            for i in sorted(finishes)
        ]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.served_name, "choices": choices,
                "usage": self.usage(tensors, completion_tokens)}

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

        def emit(index: int, delta: str | None, finish: str | None) -> None:
            choice = {"index": index, "text": delta or "", "logprobs": None,
                      "finish_reason": finish, "stop_reason": None}
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
