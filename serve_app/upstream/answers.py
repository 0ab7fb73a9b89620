"""Upstream completions answers -> OpenAI chat answers (`chat.completion` and its chunks).

The upstream only ever sees a completions request; the dispatcher turns each answer or
stream event back into the chat shape the client asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChatShape:
    """How to answer a chat request: how many top logprobs per token, if any."""

    top_logprobs: int | None = None


def _head(payload: dict[str, Any], kind: str) -> dict[str, Any]:
    """id / object / created / model of a chat answer made from an upstream completion."""
    upstream_id = str(payload.get("id") or "")
    return {"id": "chatcmpl-" + upstream_id.removeprefix("cmpl-"), "object": kind,
            "created": payload.get("created"), "model": payload.get("model")}


def _token_entry(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(logprobs: Any, top: int | None) -> dict[str, Any] | None:
    """Completions logprobs (parallel lists) -> chat logprobs (one entry per token)."""
    if top is None or not isinstance(logprobs, dict):
        return None
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    content = []
    for token, value, candidates in zip(tokens, values, tops, strict=False):
        entry = _token_entry(token, value)
        ranked = sorted((candidates or {}).items(), key=lambda item: item[1], reverse=True)
        entry["top_logprobs"] = [_token_entry(t, lp) for t, lp in ranked[:top]]
        content.append(entry)
    return {"content": content}


def chat_completion(payload: dict[str, Any], shape: ChatShape) -> dict[str, Any]:
    """A non-streamed `text_completion` as a `chat.completion`."""
    choices = [
        {
            "index": choice.get("index", 0),
            "message": {"role": "assistant", "content": choice.get("text", "")},
            "logprobs": chat_logprobs(choice.get("logprobs"), shape.top_logprobs),
            "finish_reason": choice.get("finish_reason"),
            "stop_reason": choice.get("stop_reason"),
        }
        for choice in payload.get("choices") or []
    ]
    out = {**_head(payload, "chat.completion"), "choices": choices}
    if "usage" in payload:
        out["usage"] = payload["usage"]
    return out


@dataclass
class ChatStreamConverter:
    """Turns each upstream completions chunk into chat chunks, one stream's state.

    Each choice's first chunk carries the role; text goes as `delta.content`.
    """

    shape: ChatShape
    started: set[int] = field(default_factory=set)

    def convert(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        head = _head(payload, "chat.completion.chunk")
        chunks = []
        for choice in payload.get("choices") or []:
            index = choice.get("index", 0)
            if index not in self.started:
                self.started.add(index)
                role = {"index": index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}
                chunks.append({**head, "choices": [role]})
            text = choice.get("text") or ""
            logprobs = chat_logprobs(choice.get("logprobs"), self.shape.top_logprobs)
            if not text and logprobs is None and choice.get("finish_reason") is None:
                continue
            delta = {"content": text} if text else {}
            out = {"index": index, "delta": delta, "logprobs": logprobs,
                   "finish_reason": choice.get("finish_reason")}
            if choice.get("stop_reason") is not None:
                out["stop_reason"] = choice["stop_reason"]
            chunks.append({**head, "choices": [out]})
        if not payload.get("choices") and "usage" in payload:
            chunks.append({**head, "choices": [], "usage": payload["usage"]})
        elif payload.get("usage") and chunks:
            chunks[-1]["usage"] = payload["usage"]  # vLLM's continuous usage stats
        return chunks
