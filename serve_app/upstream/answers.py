"""Upstream answers as the client asked for them: one shaper per call.

Every answer reports the served model name and the true prompt length (the gateway knows
it; NIM may report 0). Completions answers are relayed as the upstream wrote them with those
two corrected. Chat requests went upstream as completions, so their answers and chunks are
built here as `chat.completion` and `chat.completion.chunk` models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from serve_app.protocol.chat import (
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from serve_app.protocol.common import LOGPROB_FLOOR, UsageInfo, sse_event
from serve_app.upstream.call import ChatShape, UpstreamCall


class AnswerShaper(Protocol):
    """Turns one call's upstream answer (or each of its stream events) into the client's."""

    def whole(self, payload: dict[str, Any]) -> bytes: ...

    def events(self, payload: dict[str, Any]) -> list[bytes]: ...


def shaper_for(call: UpstreamCall, prompt_rows: int) -> AnswerShaper:
    if call.chat is not None:
        return ChatAnswers(call.answered_model, prompt_rows, call.chat)
    return CompletionAnswers(call.answered_model, prompt_rows)


@dataclass
class CompletionAnswers:
    served_model: str
    prompt_rows: int

    def patch(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The served name and the true prompt length in the upstream's own answer."""
        payload["model"] = self.served_model
        usage = payload.get("usage")
        if isinstance(usage, dict):
            completion = usage.get("completion_tokens") or 0
            usage["prompt_tokens"] = self.prompt_rows
            usage["total_tokens"] = self.prompt_rows + completion
        return payload

    def whole(self, payload: dict[str, Any]) -> bytes:
        return orjson.dumps(self.patch(payload))

    def events(self, payload: dict[str, Any]) -> list[bytes]:
        return [sse_event(orjson.dumps(self.patch(payload)))]


def _chat_id(payload: dict[str, Any]) -> str:
    return "chatcmpl-" + str(payload.get("id") or "").removeprefix("cmpl-")


def _token_logprob(token: str, logprob: float | None) -> dict[str, Any]:
    value = LOGPROB_FLOOR if logprob is None else logprob
    return {"token": token, "logprob": value, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(logprobs: Any, top: int | None) -> ChatChoiceLogprobs | None:
    """Completions logprobs (parallel lists) -> chat logprobs (one entry per token).

    Each token's alternatives are the first `top` of its completions entry, in the order
    vLLM wrote them: the sampled token first, then by rank. vLLM's own chat takes them so
    (`_get_top_logprobs`), so a sampled token outside the top ranks stays listed."""
    if top is None or not isinstance(logprobs, dict):
        return None
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    content = []
    for token, value, candidates in zip(tokens, values, tops, strict=False):
        listed = list((candidates or {}).items())[:top]
        content.append(ChatTokenLogprob(
            **_token_logprob(token, value),
            top_logprobs=[ChatTopLogprob(**_token_logprob(t, lp)) for t, lp in listed]))
    return ChatChoiceLogprobs(content=content)


@dataclass
class ChatAnswers:
    """A chat call's answers; for a stream, its state: each choice's first chunk carries
    the assistant role, text goes as `delta.content`."""

    served_model: str
    prompt_rows: int
    shape: ChatShape
    started: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.completions = CompletionAnswers(self.served_model, self.prompt_rows)

    def whole(self, payload: dict[str, Any]) -> bytes:
        payload = self.completions.patch(payload)
        choices = [
            ChatCompletionChoice(
                index=choice.get("index", 0),
                message=ChatResponseMessage(content=choice.get("text", "")),
                logprobs=chat_logprobs(choice.get("logprobs"), self.shape.top_logprobs),
                finish_reason=choice.get("finish_reason"),
                stop_reason=choice.get("stop_reason"))
            for choice in payload.get("choices") or []
        ]
        answer = ChatCompletionResponse(
            id=_chat_id(payload), created=payload.get("created") or 0, model=self.served_model,
            choices=choices, usage=_usage(payload))
        return answer.model_dump_json().encode()

    def events(self, payload: dict[str, Any]) -> list[bytes]:
        # Fields set are sent, nulls included, as OpenAI and vLLM send chunks; a delta
        # holds only what it carries.
        return [sse_event(chunk.model_dump_json(exclude_unset=True).encode())
                for chunk in self.chunks(self.completions.patch(payload))]

    def chunks(self, payload: dict[str, Any]) -> list[ChatCompletionChunk]:
        def chunk(choices: list[ChatChunkChoice],
                  usage: UsageInfo | None = None) -> ChatCompletionChunk:
            built = ChatCompletionChunk(id=_chat_id(payload), object="chat.completion.chunk",
                                        created=payload.get("created") or 0,
                                        model=self.served_model, choices=choices)
            if usage is not None:
                built.usage = usage
            return built

        out = []
        for choice in payload.get("choices") or []:
            index = choice.get("index", 0)
            if index not in self.started:
                self.started.add(index)
                out.append(chunk([ChatChunkChoice(
                    index=index, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                    finish_reason=None)]))
            text = choice.get("text") or ""
            logprobs = chat_logprobs(choice.get("logprobs"), self.shape.top_logprobs)
            finish = choice.get("finish_reason")
            if not text and logprobs is None and finish is None:
                continue
            delta = ChatDelta(content=text) if text else ChatDelta()
            choice_chunk = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                                           finish_reason=finish)
            if choice.get("stop_reason") is not None:
                choice_chunk.stop_reason = choice["stop_reason"]
            out.append(chunk([choice_chunk]))
        usage = _usage(payload)
        if not payload.get("choices") and usage is not None:
            out.append(chunk([], usage))
        elif usage is not None:
            for made in out:  # vLLM's continuous usage stats: every chunk carries them
                made.usage = usage
        return out


def _usage(payload: dict[str, Any]) -> UsageInfo | None:
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    return UsageInfo(prompt_tokens=usage.get("prompt_tokens") or 0,
                     completion_tokens=usage.get("completion_tokens") or 0,
                     total_tokens=usage.get("total_tokens") or 0)
