"""Keyed seeds: one 64-bit noise seed per row, fixed by a secret key, every parameter that
shapes the rows, the prompt's tenant and the row's prefix; made on the rows' device for a
whole batch (the stream that turns a seed into noise is `normals`).

Three layers of derivation, each with blake2b under its own personalization:
- the key and a canonical encoding of the `SeedBinding` (kind, sigma, wire dtype, the
  model's digest, `TRANSFORM_VERSION`) give the transform's secret: changing any parameter
  changes every row, so rows made under one sigma cannot be set beside rows made under
  another to cancel the noise;
- that secret and the tenant give the tenant's eight 32-bit key words: two tenants' rows
  share nothing, and whatever one tenant learns of its own words says nothing of another's;
- the words and the prefix give the row's seed: each position's content and index are
  hashed under the words, the hashes are summed along the prompt (a cumulative sum, so the
  batch needs no loop), and the sum is hashed again. Identical prefixes of one tenant give
  identical seeds; a change at position i changes every seed from i on.

The last layer is a fast integer hash (exact on every device: 32-bit products wrap the same
way on CPUs and GPUs), not a cipher: what keeps the noise from being subtracted is that
only the key holder can compute the words (docs/privacy.md says what that leaves).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MIN_KEY_CHARS = 16
TRANSFORM_VERSION = 2
"""Part of every keyed seed: a new definition of the noise gets a new number, so rows made
under two definitions never coincide."""
_TENANT_CACHE = 4096
"""Tenants whose key words are kept; beyond, the cache starts again."""
LOW32 = 0xFFFFFFFF


def int32_bits(value: int) -> int:
    """A 32-bit pattern as the signed int32 torch multiplies by."""
    return value - (1 << 32) if value >= 1 << 31 else value


_M1, _M2 = int32_bits(0x7FEB352D), int32_bits(0x846CA68B)
GOLDEN32 = int32_bits(0x9E3779B9)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash on int32 (xor-shift-multiply, as lowbias32); the masks make
    the right shifts logical."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def halves(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int64 tensor's low and high 32 bits, each as int32."""
    return wrap32(values & LOW32), wrap32((values >> 32) & LOW32)


def wrap32(values: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as the int32 with the same bits."""
    return (values - ((values >> 31) << 32)).to(torch.int32)


@dataclass(frozen=True)
class SeedBinding:
    """Everything besides the key, the tenant and the prompt that shapes keyed rows."""

    sigma: float
    dtype: torch.dtype
    """The wire dtype: the Embedder's rows'."""
    model: str
    """The model's identity: `transforms.matrix_digest` of its input-embedding matrix."""
    kind: str = "keyed_gaussian"
    version: int = TRANSFORM_VERSION

    def encode(self) -> bytes:
        """Canonical bytes: sorted JSON, sigma in hex (exact)."""
        fields = {"kind": self.kind, "sigma": float(self.sigma).hex(),
                  "dtype": str(self.dtype).removeprefix("torch."), "model": self.model,
                  "version": self.version}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


class KeyedSeeds:
    """Per-row seeds under a key. Keeps only secrets derived from the key, so neither
    `repr` nor an exception's message can show it."""

    def __init__(self, key: str, binding: SeedBinding) -> None:
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"the transform key must have at least {MIN_KEY_CHARS} characters")
        key_hash = hashlib.blake2b(key.encode(), digest_size=32, person=b"serveapp.key").digest()
        self._secret = hashlib.blake2b(binding.encode(), key=key_hash, digest_size=32,
                                       person=b"serveapp.params").digest()
        self._tenant_words: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return "KeyedSeeds(<key withheld>)"

    def words(self, tenant: str) -> list[int]:
        """The tenant's eight 32-bit key words (as signed int32 values)."""
        words = self._tenant_words.get(tenant)
        if words is None:
            derived = hashlib.blake2b(tenant.encode(), key=self._secret, digest_size=32,
                                      person=b"serveapp.tenant").digest()
            words = [int32_bits(int.from_bytes(derived[i:i + 4], "little"))
                     for i in range(0, 32, 4)]
            if len(self._tenant_words) >= _TENANT_CACHE:
                self._tenant_words.clear()
            self._tenant_words[tenant] = words
        return words

    def seeds(self, content: torch.Tensor, lengths: Sequence[int],
              tenants: Sequence[str]) -> torch.Tensor:
        """Each row's int64 seed; `content` holds each row's token id or client-row digest
        (int64), prompt after prompt, as `lengths` says, and `tenants` names each prompt's
        tenant."""
        if len(tenants) != len(lengths):
            raise ValueError("one tenant per prompt")
        device = content.device
        # One host-to-device copy: each prompt's row count beside its tenant's words.
        table = torch.tensor([[length, *self.words(tenant)]
                              for length, tenant in zip(lengths, tenants, strict=True)],
                             dtype=torch.int64).to(device, non_blocking=True)
        if content.is_cuda:
            return _compiled_row_seeds()(content, table)
        return row_seeds(content, table)


def row_seeds(content: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The seeds of `KeyedSeeds.seeds` from `table`: per prompt, its row count and its
    tenant's eight words (int64 holding int32 values)."""
    counts = table[:, 0]
    rows = content.shape[0]
    starts = torch.cumsum(counts, 0) - counts
    index = torch.arange(rows, device=content.device)
    position = index - torch.repeat_interleave(starts, counts, output_size=rows)
    # Each row's tenant's words, (8, rows).
    k = torch.repeat_interleave(table[:, 1:].to(torch.int32), counts, dim=0,
                                output_size=rows).T
    low, high = halves(content)
    place = mix32(position.to(torch.int32) * GOLDEN32)
    sums = []
    for a, b in ((k[0], k[1]), (k[2], k[3])):
        # Each lane: a keyed 32-bit hash of (index, content), summed along the prompt.
        lane = mix32(mix32(low ^ a) ^ high ^ place ^ b).to(torch.int64) & LOW32
        total = torch.cumsum(lane, 0)  # below 2**63 for any batch that fits in memory
        # The sum over the prompt alone: the running total less its value before the
        # prompt's first row.
        before = torch.cat([total.new_zeros(1), total])[starts]
        sums.append(total - torch.repeat_interleave(before, counts, output_size=rows))
    seed_low = _finish(sums[0], k[4], k[5]).to(torch.int64) & LOW32
    seed_high = _finish(sums[1], k[6], k[7]).to(torch.int64)
    return (seed_high << 32) | seed_low


@functools.cache
def _compiled_row_seeds() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`row_seeds` as one compiled graph for CUDA: eagerly it is about 40 small kernels,
    whose launches are most of a short batch's keyed transform."""
    compiled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.compile(
        row_seeds, dynamic=True, fullgraph=True)
    return compiled


def _finish(prefix_sum: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    low, high = halves(prefix_sum)
    return mix32(mix32(low ^ a) ^ high ^ b)
