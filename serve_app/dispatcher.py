"""DispatcherCore: sends encoded prompt embeddings to the upstream's /v1/completions.

The upstream body is assembled from bytes: orjson serialises the small sampling part and
the base64 payloads are spliced in unescaped (base64 needs no JSON escaping). Responses
are relayed as they come, with the model name and the prompt token count corrected.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from serve_app import envs
from serve_app.chat_response import ChatShape, ChatStreamConverter, chat_completion
from serve_app.codec import EncodedPromptEmbeds
from serve_app.config import UpstreamConfig
from serve_app.errors import GatewayError
from serve_app.protocol import SSE_DONE

logger = logging.getLogger(__name__)

_WRITE_TIMEOUT_S = 60.0
_POOL_TIMEOUT_S = 30.0
_KEEPALIVE_EXPIRY_S = 30.0


@dataclass(frozen=True)
class UpstreamCall:
    """What the ingress asks of the upstream, less the embeddings themselves."""

    served_model: str
    fields: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    chat: ChatShape | None = None
    """Set for chat requests: answers are turned into the chat shape on the way back."""


@dataclass(frozen=True)
class UpstreamReply:
    """A complete answer (non-stream), or the head of a stream (`body` empty, status 200)."""

    status: int
    body: bytes = b""


def make_http_client(config: UpstreamConfig) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=config.connect_timeout_s,
        read=config.read_timeout_s,
        write=_WRITE_TIMEOUT_S,
        pool=_POOL_TIMEOUT_S,
    )
    limits = httpx.Limits(
        max_connections=config.max_connections,
        max_keepalive_connections=config.max_connections,
        keepalive_expiry=_KEEPALIVE_EXPIRY_S,
    )
    return httpx.AsyncClient(timeout=timeout, limits=limits)


def build_upstream_body(
    fields: dict[str, Any], embeds: Sequence[EncodedPromptEmbeds], dialect: str
) -> bytes:
    """JSON body with the embeddings spliced in as raw bytes (no re-escaping, one join)."""
    head = orjson.dumps(fields)
    parts = [head[:-1], b"," if len(head) > 2 else b""]
    parts.append(b'"prompt":"","prompt-embeds":' if dialect == "nim" else b'"prompt_embeds":')
    if len(embeds) == 1:
        parts += [b'"', embeds[0].data, b'"']
    else:
        parts.append(b"[")
        for index, item in enumerate(embeds):
            parts += [b',"' if index else b'"', item.data, b'"']
        parts.append(b"]")
    parts.append(b"}")
    return b"".join(parts)


def _upstream_error(status: int, body: bytes) -> GatewayError:
    """The upstream's own message for its 4xx; a 502 naming the upstream for anything else."""
    message = "upstream error"
    try:
        parsed = orjson.loads(body)
        detail = parsed.get("error", parsed) if isinstance(parsed, dict) else {}
        if isinstance(detail, dict) and isinstance(detail.get("message"), str):
            message = detail["message"]
        elif isinstance(detail, str):
            message = detail
    except orjson.JSONDecodeError:
        pass
    if 400 <= status < 500:
        return GatewayError(message, status, code="upstream_error")
    return GatewayError(
        f"upstream failed with HTTP {status}: {message}", 502, code="upstream_error"
    )


def _transport_error(exc: httpx.HTTPError) -> GatewayError:
    if isinstance(exc, httpx.TimeoutException):
        return GatewayError("upstream timed out", 504, code="upstream_timeout")
    if isinstance(exc, httpx.ConnectError):
        return GatewayError("upstream is unreachable", 503, code="upstream_unreachable")
    return GatewayError(
        f"upstream connection failed ({type(exc).__name__})", 502, code="upstream_error"
    )


class DispatcherCore:
    def __init__(
        self, config: UpstreamConfig, client: httpx.AsyncClient, api_key: str | None = None
    ) -> None:
        self.config = config
        self.client = client
        self.url = f"{config.url}/completions"
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"

    @classmethod
    def from_config(cls, config: UpstreamConfig) -> DispatcherCore:
        return cls(config, make_http_client(config), envs.secret(config.api_key_env))

    async def aclose(self) -> None:
        await self.client.aclose()

    def _body(self, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds]) -> bytes:
        if not embeds:
            raise GatewayError("no prompt to send upstream", 400, param="prompt")
        fields = {**call.fields, "model": self.config.model or call.served_model}
        return build_upstream_body(fields, embeds, self.config.dialect)

    def _patch(self, payload: dict[str, Any], call: UpstreamCall,
               prompt_rows: int) -> dict[str, Any]:
        """Report the served name and the true prompt length (NIM may report 0)."""
        payload["model"] = call.served_model
        usage = payload.get("usage")
        if isinstance(usage, dict):
            completion = usage.get("completion_tokens") or 0
            usage["prompt_tokens"] = prompt_rows
            usage["total_tokens"] = prompt_rows + completion
        return payload

    async def complete(
        self, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds]
    ) -> UpstreamReply:
        try:
            body = self._body(call, embeds)
            response = await self.client.post(self.url, content=body, headers=self.headers)
        except GatewayError as exc:
            return UpstreamReply(exc.status, exc.to_body())
        except httpx.HTTPError as exc:
            error = _transport_error(exc)
            return UpstreamReply(error.status, error.to_body())
        if response.status_code >= 400:
            error = _upstream_error(response.status_code, response.content)
            return UpstreamReply(error.status, error.to_body())
        payload = _json_object(response.content)
        if payload is None:
            error = GatewayError("upstream sent invalid JSON", 502, code="upstream_error")
            return UpstreamReply(error.status, error.to_body())
        answer = self._patch(payload, call, sum(item.rows for item in embeds))
        if call.chat is not None:
            answer = chat_completion(answer, call.chat)
        return UpstreamReply(200, orjson.dumps(answer))

    async def stream(
        self, call: UpstreamCall, embeds: Sequence[EncodedPromptEmbeds]
    ) -> AsyncIterator[UpstreamReply | bytes]:
        """Yield an `UpstreamReply` head, then (when it is 200) SSE event bytes to `[DONE]`."""
        try:
            body = self._body(call, embeds)
        except GatewayError as exc:
            yield UpstreamReply(exc.status, exc.to_body())
            return
        rows = sum(item.rows for item in embeds)
        started = False
        try:
            request = self.client.build_request(
                "POST", self.url, content=body, headers=self.headers
            )
            response = await self.client.send(request, stream=True)
            try:
                if response.status_code >= 400:
                    error = _upstream_error(response.status_code, await response.aread())
                    yield UpstreamReply(error.status, error.to_body())
                    return
                yield UpstreamReply(200)
                started = True
                async for event in self._relay_events(response, call, rows):
                    yield event
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            error = _transport_error(exc)
            if not started:
                yield UpstreamReply(error.status, error.to_body())
                return
            yield error.to_sse_event()
            yield SSE_DONE


    async def _relay_events(
        self, response: httpx.Response, call: UpstreamCall, rows: int
    ) -> AsyncIterator[bytes]:
        """Re-emit each upstream SSE data event, patched; end with `[DONE]` in every case."""
        chat = ChatStreamConverter(call.chat) if call.chat is not None else None
        async for data in _sse_data(response):
            if data == b"[DONE]":
                yield SSE_DONE
                return
            payload = _json_object(data)
            if payload is None:
                error = GatewayError(
                    "upstream sent an invalid stream event", 502, code="upstream_error"
                )
                yield error.to_sse_event()
                yield SSE_DONE
                return
            if "error" in payload:
                yield b"data: " + data + b"\n\n"
                continue
            patched = self._patch(payload, call, rows)
            for event in chat.convert(patched) if chat else [patched]:
                yield b"data: " + orjson.dumps(event) + b"\n\n"
        error = GatewayError("upstream stream ended before [DONE]", 502, code="upstream_error")
        yield error.to_sse_event()
        yield SSE_DONE


def _json_object(data: bytes) -> dict[str, Any] | None:
    """The upstream's JSON object, or None for invalid JSON or any other JSON type."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


async def _sse_data(response: httpx.Response) -> AsyncIterator[bytes]:
    """The `data:` payload of each server-sent event (multi-line data joined by newlines)."""
    lines: list[bytes] = []
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            line = raw.rstrip(b"\r")
            if line:
                if line.startswith(b"data:"):
                    lines.append(line[5:].lstrip(b" "))
                continue
            if lines:
                yield b"\n".join(lines)
                lines = []
    if lines:
        yield b"\n".join(lines)
