"""Embedding vectors as bytes, as vLLM writes them (`vllm/utils/serial_utils.py`).

`embed_dtype` picks the element type, `endianness` the byte order (`native`: the server's).
`base64` puts each vector's bytes in its JSON item; `bytes` answers every vector's bytes
back to back as `application/octet-stream`, with a `metadata` header (JSON: `id`,
`created`, `model`, `data` with each vector's `index`, `embed_dtype`, `endianness`,
`start`, `end`, `shape`, and `usage`); `bytes_only` is the same body without the header.
That header grows by ~118 bytes an input, so `bytes` carries at most
`METADATA_MAX_INPUTS` inputs.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt
import pybase64
import torch
from starlette.responses import Response

from serve_app.errors import GatewayError
from serve_app.protocol.embeddings import EmbedDType, Endianness

EMBED_DTYPES: dict[EmbedDType, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
METADATA_MAX_INPUTS = 64
"""The most inputs a `bytes` answer carries. Its `metadata` header is one line of ~118
bytes an input plus ~250 (measured: 7,559 bytes for 64 inputs of 8,192 dims with a
64-character model name), so 64 inputs stay under 8 KB: within Apache's 8,190-byte header
line, nginx with `proxy_buffer_size 8k`, and half of the 16 KB of headers that h11 (httpx),
Node and HAProxy accept. Past that, proxies and clients fail the whole answer."""

# numpy has no bfloat16 or fp8: the bytes are swapped as integers of the same width.
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def vector_bytes(rows: npt.NDArray[np.float32], embed_dtype: EmbedDType,
                 endianness: Endianness) -> npt.NDArray[Any]:
    """`(inputs, dims)` float32 rows cast to `embed_dtype` (rounding to nearest, as torch
    casts), each element's bytes in `endianness` order; `.tobytes()` of a row is its wire
    form."""
    cast = torch.from_numpy(rows).to(EMBED_DTYPES[embed_dtype]).contiguous()
    raw = cast.view(_SAME_WIDTH_INT[cast.element_size()]).numpy()
    if endianness != "native" and endianness != sys.byteorder:
        raw = raw.byteswap()
    return raw


def base64_rows(raw: npt.NDArray[Any]) -> list[str]:
    return [pybase64.b64encode(row.tobytes()).decode("ascii") for row in raw]


def check_metadata_fits(inputs: int) -> None:
    """A 400 before any work for a `bytes` answer whose header would be too large."""
    if inputs > METADATA_MAX_INPUTS:
        raise GatewayError(
            f"encoding_format bytes carries at most {METADATA_MAX_INPUTS} inputs (their "
            f"metadata travels in one response header); the request has {inputs}. Use "
            "bytes_only or base64 for more.", 400, param="encoding_format")


def bytes_answer(raw: npt.NDArray[Any], embed_dtype: EmbedDType, endianness: Endianness,
                 model: str, prompt_tokens: int, with_metadata: bool) -> Response:
    """vLLM's `bytes` (`with_metadata`) or `bytes_only` answer for these rows."""
    headers = None
    if with_metadata:
        metadata = {"id": f"embd-{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": model,
                    "data": _items(raw, embed_dtype, endianness),
                    # vLLM's dict form of its usage here: no completion_tokens.
                    "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
        headers = {"metadata": json.dumps(metadata)}
    return Response(raw.tobytes(), media_type="application/octet-stream", headers=headers)


def _items(raw: npt.NDArray[Any], embed_dtype: EmbedDType,
           endianness: Endianness) -> list[dict[str, Any]]:
    """Where each vector lies in the body: `[start, end)` bytes, and its shape."""
    size = raw.shape[1] * raw.itemsize
    return [{"index": i, "embed_dtype": embed_dtype, "endianness": endianness,
             "start": i * size, "end": (i + 1) * size, "shape": [raw.shape[1]]}
            for i in range(raw.shape[0])]
