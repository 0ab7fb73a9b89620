"""The reference upstream's decode loop: sampling, penalties, logprobs, stop strings and
stop tokens.

A plain KV-cached loop over a transformers causal LM rather than `generate()`, so each
step's raw logits are at hand: logprobs are computed from them before any sampling
adjustment, as vLLM reports them by default.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from serve_app.protocol import CompletionRequest
from serve_app.protocol.common import LOGPROB_FLOOR


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    include_stop_str_in_output: bool = False

    @classmethod
    def from_request(cls, request: CompletionRequest, max_tokens_default: int,
                     vocab_size: int) -> SamplingParams:
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        bias = {int(k): v for k, v in (request.logit_bias or {}).items()
                if k.lstrip("-").isdigit() and 0 <= int(k) < vocab_size}
        return cls(
            max_tokens=request.max_tokens or max_tokens_default,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=request.top_p or 1.0,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            logit_bias=bias,
            logprobs=request.logprobs,
            stop=tuple(s for s in stop if s),
            stop_token_ids=frozenset(request.stop_token_ids or ()),
            include_stop_str_in_output=bool(request.include_stop_str_in_output),
        )


@dataclass(frozen=True)
class TokenStep:
    """One generated token; `top` (sampled token first, then the top-k) when logprobs asked."""

    token_id: int
    logprob: float | None = None
    top: dict[int, float] | None = None


def _adjust(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor) -> torch.Tensor:
    """Logit bias and OpenAI's presence/frequency penalties over the generated tokens."""
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    if params.presence_penalty or params.frequency_penalty:
        logits -= params.presence_penalty * (counts > 0) + params.frequency_penalty * counts
    return logits


def _sample(logits: torch.Tensor, params: SamplingParams,
            generator: torch.Generator | None) -> int:
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _step_logprobs(logits: torch.Tensor, token: int, k: int) -> TokenStep:
    logprobs = torch.log_softmax(logits, dim=-1)
    top: dict[int, float] = {token: max(float(logprobs[token]), LOGPROB_FLOOR)}
    if k:
        values, ids = torch.topk(logprobs, k)
        for token_id, value in zip(ids.tolist(), values.tolist(), strict=True):
            top.setdefault(token_id, max(value, LOGPROB_FLOOR))
    return TokenStep(token, top[token], top)


def decode_steps(model: Any, embeds: torch.Tensor, params: SamplingParams, eos_token_id: int,
                 generator: torch.Generator | None,
                 cancelled: threading.Event) -> Iterator[TokenStep]:
    """Generate from `(rows, hidden)` embeddings until EOS, max_tokens or cancellation."""
    device = model.device
    counts = torch.zeros(model.config.vocab_size, dtype=torch.float32)
    with torch.inference_mode():
        out = model(inputs_embeds=embeds.to(device)[None], use_cache=True, logits_to_keep=1)
        for _ in range(params.max_tokens):
            raw = out.logits[0, -1].float().cpu()
            token = _sample(_adjust(raw.clone(), params, counts), params, generator)
            if params.logprobs is None:
                yield TokenStep(token)
            else:
                yield _step_logprobs(raw, token, params.logprobs)
            if token == eos_token_id or cancelled.is_set():
                return
            counts[token] += 1
            out = model(input_ids=torch.tensor([[token]], device=device),
                        past_key_values=out.past_key_values, use_cache=True)


@dataclass
class TextDelta:
    """New text for one choice, with the logprobs of the tokens that produced it."""

    text: str
    steps: list[TokenStep]


def find_stop(text: str, new_chars: int, stop: tuple[str, ...],
              include: bool) -> tuple[str, int] | None:
    """vLLM's `check_stop_strings`: the first stop string, in the order given, found ending
    in the last `new_chars` characters of `text`, and the length `text` keeps (cut before
    the stop string, or after it when `include`)."""
    if not new_chars:
        return None
    for string in stop:
        start = text.find(string, max(0, len(text) - new_chars - len(string) + 1))
        if start >= 0:
            return string, start + len(string) if include else start
    return None


class TextAssembler:
    """Turns token steps into text deltas, cutting at stop strings as vLLM does.

    After each token the stop strings are looked for in the text that token completed
    (`find_stop`). Every step gives a delta, as vLLM streams one event per token; its text
    is empty while held back: the tail that could still become a stop string
    (`max(len(stop)) - 1` characters, none when stop strings stay in the output) and half
    of a multi-byte character are never streamed.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams,
                 on_delta: Callable[[TextDelta], None]) -> None:
        self.tokenizer = tokenizer
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.holdback = 0 if self.include_stop or not self.stop else max(
            len(s) for s in self.stop) - 1
        self.on_delta = on_delta
        self.ids: list[int] = []
        self.pending: list[TokenStep] = []
        self.text = ""
        self.checked = 0
        """Characters of complete text already searched for stop strings."""
        self.emitted = 0
        self.stop_string: str | None = None

    def add(self, step: TokenStep, last: bool = False, with_text: bool = True) -> bool:
        """Take one step; True once a stop string has appeared.

        The `last` step's text is kept for `finish()`: the last token's chunk is the one
        that carries the finish reason, as vLLM frames its streams. A step `with_text`
        false counts with no text: a stop token, whose text vLLM leaves out.
        """
        if with_text:
            self.ids.append(step.token_id)
        self.pending.append(step)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        complete = self.text.removesuffix("\ufffd")  # an incomplete UTF-8 sequence so far
        found = find_stop(complete, len(complete) - self.checked, self.stop, self.include_stop)
        self.checked = len(complete)
        if found is not None:
            self.stop_string, kept = found
            self.text = complete[:kept]
        elif not last:
            self._emit(final=False)
        return found is not None

    def _emit(self, final: bool) -> TextDelta | None:
        # The hold-back counts from the complete text, as vLLM's detokenizer holds back
        # an incomplete character before its stop-string buffer.
        end = len(self.text) if final else len(self.text.removesuffix("\ufffd")) - self.holdback
        if final and end <= self.emitted and not self.pending:
            return None
        delta = TextDelta(self.text[self.emitted : max(end, self.emitted)], self.pending)
        self.pending = []
        self.emitted = max(end, self.emitted)
        if not final:
            self.on_delta(delta)
        return delta

    def finish(self) -> TextDelta | None:
        """The held-back rest (and the steps not yet reported), for the final chunk."""
        return self._emit(final=True)


class CompletionLogprobsBuilder:
    """OpenAI completions `logprobs` objects for one choice, text offsets running on."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.offset = 0

    def _token(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def build(self, steps: list[TokenStep]) -> dict[str, Any]:
        tokens, offsets = [], []
        for step in steps:
            token = self._token(step.token_id)
            tokens.append(token)
            offsets.append(self.offset)
            self.offset += len(token)
        return {
            "text_offset": offsets,
            "token_logprobs": [step.logprob for step in steps],
            "tokens": tokens,
            "top_logprobs": [
                {self._token(i): lp for i, lp in (step.top or {}).items()} for step in steps
            ],
        }
