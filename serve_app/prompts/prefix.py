"""A prompt's prefix key: the chain of hashes of its first blocks of rows, for routing.

vLLM caches a prompt's KV by block of `block_size` rows, each block's key chained to the
previous one's; two prompts share cache exactly as far as they share whole blocks. The
gateway sees the rows before they become embeddings (token ids for text, the decoded
tensor for client embeddings), so it can key a request by its first blocks and send equal
keys to one backend (`upstream.routing`). Each row hashes as its own bytes (a token id, or
a marker and the tensor row), so a key depends on the rows only, not on how they are split
into runs, and a client tensor never collides with token ids.

Under a keyed transform two tenants' rows for one prefix differ, and so do their caches:
the caller passes the tenant, which starts the chain, so each tenant's prefix has a key
(and a backend) of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from serve_app.prompts.embedder import PromptInput, SplicedPrompt, prompt_rows

_DIGEST_BYTES = 8
_Run = Sequence[int] | torch.Tensor


def prefix_hashes(prompt: PromptInput, block_size: int, max_blocks: int,
                  tenant: str | None = None) -> list[int]:
    """The chain of hashes of the prompt's first whole blocks, at most `max_blocks`: entry
    i identifies rows [0, (i + 1) x block_size) (and `tenant`, when given) and nothing
    shorter or longer."""
    blocks = min(max_blocks, prompt_rows(prompt) // block_size)
    chain: list[int] = []
    previous = b"" if tenant is None else hashlib.blake2b(
        tenant.encode(), digest_size=_DIGEST_BYTES, person=b"serveapp.route").digest()
    for block in _blocks(_runs(prompt), block_size, blocks):
        digest = hashlib.blake2b(previous, digest_size=_DIGEST_BYTES)
        for run in block:
            digest.update(_run_bytes(run))
        previous = digest.digest()
        chain.append(int.from_bytes(previous, "little"))
    return chain


def prefix_key(prompts: Sequence[PromptInput], block_size: int,
               max_blocks: int, tenant: str | None = None) -> int | None:
    """A request's routing key: the longest hash of its first prompt's chain (under
    `tenant`, when given), or None when that prompt is shorter than one block (then the
    request is routed by load)."""
    if not prompts:
        return None
    chain = prefix_hashes(prompts[0], block_size, max_blocks, tenant)
    return chain[-1] if chain else None


def _runs(prompt: PromptInput) -> tuple[_Run, ...]:
    return prompt.segments if isinstance(prompt, SplicedPrompt) else (prompt,)


def _blocks(runs: Sequence[_Run], block_size: int, count: int) -> Iterator[list[_Run]]:
    """The first `count` blocks of rows, each as the pieces of runs it spans."""
    block: list[_Run] = []
    room = block_size
    produced = 0
    for run in runs:
        start = 0
        while start < len(run) and produced < count:
            piece = run[start:start + room]
            block.append(piece)
            start += len(piece)
            room -= len(piece)
            if room == 0:
                yield block
                produced += 1
                block, room = [], block_size
        if produced == count:
            return


_TENSOR_ROW = b"\xff" * 8
"""Leads every tensor row; no token id (a non-negative int64) has these bytes."""


def _run_bytes(run: _Run) -> bytes:
    """Each row as bytes of its own, so the hash does not depend on where runs split."""
    if isinstance(run, torch.Tensor):
        # The rows' bytes in the model's dtype, as the backend's cache key reads them.
        raw = run.contiguous().view(torch.uint8).numpy()
        rows = np.empty((raw.shape[0], len(_TENSOR_ROW) + raw.shape[1]), dtype=np.uint8)
        rows[:, :len(_TENSOR_ROW)] = 0xFF
        rows[:, len(_TENSOR_ROW):] = raw
        return rows.tobytes()
    return np.asarray(run, dtype="<i8").tobytes()
