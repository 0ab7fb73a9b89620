"""A call's upstream events with the gateway's stop strings applied, and the whole answer
joined from them.

The upstream generates without the stop strings, always streamed (`STREAM_FIELDS`), and
`StopFilter` cuts each choice's events with its `ChoiceText` (`stops`): every event goes
on (empty while its text is held back, as vLLM streams), with the settled text, until the
choice stops; the choice's later events are what the upstream generated past its stop, and
are dropped. Once every choice has ended and one was cut while the upstream still
generated it, the Dispatcher closes the upstream request. `WholeAnswer` joins the cut events
into the answer vLLM gives without streaming.

Each choice's tokens are counted to its end (for a cut choice, to the event that completed
its stop): from the running count vLLM puts in every event with `continuous_usage_stats`,
else from the event's logprobs, else one per event (vLLM streams one event per token step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serve_app.protocol.completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
)
from serve_app.upstream.stops import ChoiceText, StopRule

STREAM_FIELDS: dict[str, Any] = {
    "stream": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
}
"""What the upstream is asked for when the gateway applies the stops: a stream, whatever
the client asked, with every choice's running token count in each event."""

_HEAD = ("id", "object", "created", "model")
_LOGPROB_LISTS = ("tokens", "token_logprobs", "top_logprobs")


class StopFilter:
    """One call's upstream events, each choice cut at its first stop string."""

    def __init__(self, rule: StopRule, choices: int, usage_in_chunks: bool) -> None:
        self.rule = rule
        self.choices = choices
        self.usage_in_chunks = usage_in_chunks
        """The client asked for vLLM's `continuous_usage_stats`: each chunk carries its
        choice's tokens so far."""
        self.texts: dict[int, ChoiceText] = {}
        self.ended: set[int] = set()
        self.cut: set[int] = set()
        """Choices the gateway ended while the upstream was still generating them."""
        self.head: dict[str, Any] = {}
        self.upstream_usage: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """Every choice has ended, and the upstream still generates past a stop: close it."""
        return len(self.ended) >= self.choices and bool(self.cut)

    def apply(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks one upstream event becomes: one per choice not yet ended."""
        self.head = {key: payload[key] for key in _HEAD if key in payload}
        choices = payload.get("choices") or []
        if not choices:
            usage = payload.get("usage")
            self.upstream_usage = usage if isinstance(usage, dict) else None
            return []
        # vLLM's running count is the choice's own when the event carries one choice.
        usage = payload.get("usage") if len(choices) == 1 else None
        chunks = (self._chunk(payload, choice, usage) for choice in choices)
        return [chunk for chunk in chunks if chunk is not None]

    def usage(self) -> dict[str, int]:
        """The upstream's own usage where the gateway cut no choice short, else the sum of
        the choices' counts."""
        if self.upstream_usage is not None and not self.cut:
            completion = self.upstream_usage.get("completion_tokens")
            if isinstance(completion, int):
                return _usage(completion)
        return _usage(sum(text.tokens for text in self.texts.values()))

    def usage_chunk(self) -> dict[str, Any]:
        """The stream's last chunk for `stream_options.include_usage`."""
        return {**self.head, "choices": [], "usage": self.usage()}

    def _chunk(self, payload: dict[str, Any], choice: dict[str, Any],
               usage: Any) -> dict[str, Any] | None:
        index = choice.get("index", 0)
        if index in self.ended:
            return None  # generated past the choice's stop
        text = self.texts.setdefault(index, ChoiceText(self.rule))
        sent = text.sent
        finish, reason = choice.get("finish_reason"), choice.get("stop_reason")
        piece = text.step(self._new_text(choice, reason), _step_tokens(choice, usage, text.tokens))
        if text.stop is not None:
            if finish is None:
                self.cut.add(index)
            finish, reason = "stop", text.stop
        elif finish is not None:
            piece += text.rest()
            if isinstance(reason, int):
                reason = self.rule.token_ids.get(reason, reason)
        if finish is not None:
            self.ended.add(index)
        out = {**choice, "text": piece, "finish_reason": finish, "stop_reason": reason}
        if isinstance(choice.get("logprobs"), dict):
            out["logprobs"] = _with_offsets(choice["logprobs"], sent)
        chunk = {key: value for key, value in payload.items() if key != "usage"}
        chunk["choices"] = [out]
        if self.usage_in_chunks:
            chunk["usage"] = _usage(text.tokens)
        return chunk

    def _new_text(self, choice: dict[str, Any], reason: Any) -> str:
        """The event's text, with the text of the stop token the upstream stopped on when
        it is the gateway's: vLLM leaves a stop token's text out unless
        `include_stop_str_in_output`, so the gateway's search sees it as vLLM's would."""
        text = str(choice.get("text") or "")
        if isinstance(reason, int) and reason in self.rule.token_ids and (
                not self.rule.include_in_output):
            text += self.rule.token_ids[reason]
        return text


def _step_tokens(choice: dict[str, Any], usage: Any, counted: int) -> int:
    """The tokens one event brought its choice."""
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return max(0, usage["completion_tokens"] - counted)
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    return 1


def _with_offsets(logprobs: dict[str, Any], start: int) -> dict[str, Any]:
    """vLLM's text offsets: each token's, running on from the choice's text so far."""
    offsets = []
    for token in logprobs.get("tokens") or []:
        offsets.append(start)
        start += len(str(token))
    return {**logprobs, "text_offset": offsets}


def _usage(completion_tokens: int) -> dict[str, int]:
    """Usage with the completion count; the answer shaper puts in the prompt's."""
    return {"prompt_tokens": 0, "completion_tokens": completion_tokens,
            "total_tokens": completion_tokens}


@dataclass
class _Joined:
    pieces: list[str] = field(default_factory=list)
    logprobs: dict[str, list[Any]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, choice: dict[str, Any]) -> None:
        self.pieces.append(choice["text"])
        self.finish_reason = choice.get("finish_reason")
        self.stop_reason = choice.get("stop_reason")
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            joined = self.logprobs = self.logprobs or {key: [] for key in _LOGPROB_LISTS}
            for key in _LOGPROB_LISTS:
                joined[key] += logprobs.get(key) or []

    def choice(self, index: int) -> CompletionChoice:
        logprobs = None
        if self.logprobs is not None:
            logprobs = CompletionLogprobs.model_validate(_with_offsets(self.logprobs, 0))
        return CompletionChoice(index=index, text="".join(self.pieces), logprobs=logprobs,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason)


class WholeAnswer:
    """A call's cut chunks joined into the answer vLLM gives without streaming."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, _Joined] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        self.head = chunk
        for choice in chunk["choices"]:
            self.choices.setdefault(choice.get("index", 0), _Joined()).add(choice)

    def payload(self, usage: dict[str, int]) -> dict[str, Any]:
        answer = CompletionResponse(
            id=str(self.head.get("id") or ""), created=int(self.head.get("created") or 0),
            model=str(self.head.get("model") or ""),
            choices=[self.choices[index].choice(index) for index in sorted(self.choices)])
        return {**answer.model_dump(mode="json"), "usage": usage}
