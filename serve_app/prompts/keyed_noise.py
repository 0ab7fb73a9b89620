"""Noise fixed by a secret key and a prompt's prefix, made on the rows' device for a whole
batch: a 64-bit seed per row, then `hidden` standard normals per seed.

Row i's seed is a keyed hash of the content of positions 0..i (token ids, or a digest of a
client row's bytes): each position's content and index are hashed under the key, the hashes
are summed along the prompt (a cumulative sum, so the batch needs no loop), and the sum is
hashed again. Identical prefixes give identical seeds; a change at position i changes every
seed from i on. The normals come from the seed through integer hashing (exact on every
device: 32-bit products wrap the same way on CPUs and GPUs) and one Box-Muller step, so a
seed gives bit-identical rows on every replica with the same kind of device.

This is a fast integer hash, not a cipher: what keeps the noise from being subtracted is
that only the key holder can compute the seeds (docs/privacy.md says what that leaves).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence

import torch

MIN_KEY_CHARS = 16
# Elements per eager step of the stream: bounds the temporaries (4 bytes each).
_CHUNK_ELEMENTS = 1 << 22
_TWO_PI = 2.0 * math.pi
_LOW = 0xFFFFFFFF


def _int32(value: int) -> int:
    """A 32-bit pattern as the signed int32 torch multiplies by."""
    return value - (1 << 32) if value >= 1 << 31 else value


_M1, _M2 = _int32(0x7FEB352D), _int32(0x846CA68B)
_GOLDEN = _int32(0x9E3779B9)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash on int32 (xor-shift-multiply, as lowbias32); the masks make
    the right shifts logical."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def _halves(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int64 tensor's low and high 32 bits, each as int32."""
    return _wrap32(values & _LOW), _wrap32((values >> 32) & _LOW)


def _wrap32(values: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as the int32 with the same bits."""
    return (values - ((values >> 31) << 32)).to(torch.int32)


class KeyedSeeds:
    """Per-row seeds under a key. Keeps only words derived from the key, so neither `repr`
    nor an exception's message can show it."""

    def __init__(self, key: str) -> None:
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"the transform key must have at least {MIN_KEY_CHARS} characters")
        derived = hashlib.blake2b(key.encode(), digest_size=32, person=b"serveapp").digest()
        self._words = [_int32(int.from_bytes(derived[i:i + 4], "little"))
                       for i in range(0, 32, 4)]

    def __repr__(self) -> str:
        return "KeyedSeeds(<key withheld>)"

    def seeds(self, content: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
        """The (low, high) int32 halves of each row's seed; `content` holds each row's
        token id or client-row digest (int64), prompt after prompt, as `lengths` says."""
        k = self._words
        device = content.device
        counts = torch.tensor(list(lengths), dtype=torch.int64).to(device, non_blocking=True)
        starts = torch.cumsum(counts, 0) - counts
        index = torch.arange(content.shape[0], device=device)
        position = (index - torch.repeat_interleave(starts, counts, output_size=len(index)))
        low, high = _halves(content)
        place = _mix32(position.to(torch.int32) * _GOLDEN)
        sums = []
        for a, b in ((k[0], k[1]), (k[2], k[3])):
            # Each lane: a keyed 32-bit hash of (index, content), summed along the prompt.
            lane = _mix32(_mix32(low ^ a) ^ high ^ place ^ b).to(torch.int64) & _LOW
            total = torch.cumsum(lane, 0)  # below 2**63 for any batch that fits in memory
            # The sum over the prompt alone: the running total less its value before the
            # prompt's first row.
            before = torch.cat([total.new_zeros(1), total])[starts]
            sums.append(total - torch.repeat_interleave(before, counts, output_size=len(index)))
        return self._finish(sums[0], k[4], k[5]), self._finish(sums[1], k[6], k[7])

    @staticmethod
    def _finish(prefix_sum: torch.Tensor, a: int, b: int) -> torch.Tensor:
        low, high = _halves(prefix_sum)
        return _mix32(_mix32(low ^ a) ^ high ^ b)


def _column_constants(hidden: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two distinct 32-bit constants per column (one per seed half)."""
    counter = torch.arange(2 * hidden, dtype=torch.int32, device=device)
    mixed = _mix32(counter * _GOLDEN ^ 0x5BD1E995)
    return mixed[:hidden], mixed[hidden:]


def _normals(low: torch.Tensor, high: torch.Tensor, first: torch.Tensor,
             second: torch.Tensor) -> torch.Tensor:
    """`(rows, columns)` standard normals for rows' seed halves `(rows, 1)` and the
    columns' constants; `columns` is even."""
    # Both halves pass through the hash: the stream depends on all 64 bits of the seed.
    bits = (_mix32(_mix32(low ^ first) ^ high ^ second) >> 8) & 0xFFFFFF
    uniform = (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    radius = torch.sqrt(-2.0 * torch.log(uniform[:, 0::2]))
    angle = _TWO_PI * uniform[:, 1::2]
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2).flatten(1)


@functools.cache
def _fused_normals() -> Callable[..., torch.Tensor]:
    """`_normals` compiled into one kernel for CUDA: the eager form writes every
    intermediate (about 30 passes over the batch's noise) to memory."""
    return torch.compile(_normals, dynamic=True, fullgraph=True)


def standard_normals(low: torch.Tensor, high: torch.Tensor, hidden: int) -> torch.Tensor:
    """`(rows, hidden)` float32 standard normals, a pure function of each row's seed halves.

    On CUDA the stream is one compiled kernel, the same on every replica of one torch
    version; the CPU runs it eagerly (equal within float tolerance).
    """
    device = low.device
    even = hidden + hidden % 2
    first, second = _column_constants(even, device)
    fused = device.type == "cuda"
    normals = _fused_normals() if fused else _normals
    low, high = low[:, None], high[:, None]
    # Eagerly, bound the temporaries; fused, there are none.
    step = max(1, low.shape[0] if fused else _CHUNK_ELEMENTS // even)
    chunks = [normals(low[start:start + step], high[start:start + step], first, second)
              for start in range(0, low.shape[0], step)]
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return out[:, :hidden]
