"""Noise fixed by a secret key and a prompt's prefix: one 64-bit seed per row, and a
counter-based Gaussian stream per seed, computed on the rows' device.

Row i's seed is a keyed BLAKE2b of the content of positions 0..i (token ids, or a digest of
a client row's bytes), so identical prefixes give identical seeds and a change at position
i changes every seed from i on. The stream turns each seed into `hidden` standard normals
with integer arithmetic only (exact on every device) and one Box-Muller step, so a seed
gives bit-identical noise on every replica with the same kind of device.

The stream is a fast integer hash, not a cipher: its secret is the 64-bit seed per row,
which only the key holder can compute (docs/privacy.md says what that leaves).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

MIN_KEY_CHARS = 16
_MASK32 = 0xFFFFFFFF
# Elements per step of the stream: bounds the int64 temporaries (8 bytes each).
_CHUNK_ELEMENTS = 1 << 22
_TWO_PI = 2.0 * math.pi


class PrefixSeeds:
    """Keyed seeds of every prefix. Holds the key only inside a BLAKE2b state, so neither
    `repr` nor an exception's message can show it."""

    def __init__(self, key: str) -> None:
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"the transform key must have at least {MIN_KEY_CHARS} characters")
        self._keyed = hashlib.blake2b(key=key.encode(), digest_size=8, person=b"serveapp")

    def __repr__(self) -> str:
        return "PrefixSeeds(<key withheld>)"

    def seeds(self, positions: Sequence[int]) -> list[int]:
        """One signed 64-bit seed per position: the keyed hash of positions 0..i."""
        running = self._keyed.copy()
        out = []
        for content in positions:
            running.update(content.to_bytes(8, "little", signed=True))
            out.append(int.from_bytes(running.copy().digest(), "little", signed=True))
        return out


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """`x * constant mod 2**32` for x in [0, 2**32), exact in int64 (no product overflows)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (xor-shift-multiply, as in lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _column_constants(hidden: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two distinct 32-bit constants per column (one per seed half)."""
    counter = torch.arange(2 * hidden, dtype=torch.int64, device=device)
    mixed = _mix32(_mul32(counter, 0x9E3779B9) ^ 0x5BD1E995)
    return mixed[:hidden], mixed[hidden:]


def standard_normals(seeds: torch.Tensor, hidden: int) -> torch.Tensor:
    """`(len(seeds), hidden)` float32 standard normals, a pure function of each seed."""
    device = seeds.device
    even = hidden + hidden % 2
    first, second = _column_constants(even, device)
    low = (seeds & _MASK32)[:, None]
    high = ((seeds >> 32) & _MASK32)[:, None]
    out = torch.empty((seeds.shape[0], even), dtype=torch.float32, device=device)
    step = max(1, _CHUNK_ELEMENTS // even)
    for start in range(0, seeds.shape[0], step):
        rows = slice(start, start + step)
        # Both halves of the seed pass through the hash: the stream depends on all 64 bits.
        bits = _mix32(_mix32(low[rows] ^ first) ^ high[rows] ^ second) >> 8  # 24 bits
        uniform = (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
        radius = torch.sqrt(-2.0 * torch.log(uniform[:, 0::2]))
        angle = _TWO_PI * uniform[:, 1::2]
        out[rows, 0::2] = radius * torch.cos(angle)
        out[rows, 1::2] = radius * torch.sin(angle)
    return out[:, :hidden]
