"""The upstream's wire format: completions bodies built from bytes, and SSE events read back.

A body is assembled from buffers sent back to back: orjson serialises the small sampling
part and each prompt's base64 buffers are spliced in unescaped (base64 needs no JSON
escaping), so the megabytes of embeddings are never copied into one buffer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Literal, cast

import httpx
import orjson

from serve_app.prompts.codec import Buffer, EncodedPromptEmbeds

Dialect = Literal["vllm", "nim"]


def build_upstream_body(
    fields: dict[str, Any], embeds: Sequence[EncodedPromptEmbeds], dialect: str
) -> list[Buffer]:
    """The JSON body as buffers: the fields, then the embeddings under the key the dialect
    reads (`prompt_embeds` for vLLM; NIM's `prompt-embeds` beside an empty `prompt`)."""
    head = orjson.dumps(fields)
    parts: list[Buffer] = [head[:-1], b"," if len(head) > 2 else b""]
    parts.append(b'"prompt":"","prompt-embeds":' if dialect == "nim" else b'"prompt_embeds":')
    if len(embeds) == 1:
        parts += [b'"', *embeds[0].buffers, b'"']
    else:
        parts.append(b"[")
        for index, item in enumerate(embeds):
            parts += [b',"' if index else b'"', *item.buffers, b'"']
        parts.append(b"]")
    parts.append(b"}")
    return parts


async def body_stream(buffers: list[Buffer]) -> AsyncIterator[bytes]:
    """The body for httpx; memoryview buffers (payloads read in place from Ray's object
    store) pass through h11's writer like bytes, so they are not copied here."""
    for buffer in buffers:
        yield cast(bytes, buffer)


def json_object(data: bytes) -> dict[str, Any] | None:
    """The upstream's JSON object, or None for invalid JSON or any other JSON type."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


async def sse_data(response: httpx.Response) -> AsyncGenerator[bytes, None]:
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
