"""The audit's reference weak transforms: kept as they are so that the attack suite has
something it must break, and the docs an example of each weakness. None is for the gateway.

- `Float32Gaussian`: fresh noise from `torch.randn` in float32 (24-bit uniforms), added in
  float32: the exact-arithmetic attack reads every token, and averaging repeated sightings
  cancels the noise.
- `KeyedFloat32Gaussian`: noise fixed by a key and the prefix, from 24-bit uniforms in
  float32 (the keyed hash below, then one Box-Muller step); the key is not bound to sigma or
  to a tenant: exact arithmetic reads every token, two sigmas under one key give the clean
  rows, and an adversary who is also a client grows the prompt by chosen prefixes.
- `RandomRotation`: a fixed random orthogonal map, as a `module` transform
  (`module: serve_app.privacy.weak_transforms:RandomRotation`, `module_args: {hidden: H}`):
  nearest-row lookup reads nothing, but row norms read every token, and a linear map fitted
  to a few known rows inverts it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from serve_app.prompts.keyed_noise import GOLDEN32, LOW32, halves, int32_bits, mix32
from serve_app.prompts.noise_spec import NoiseSpec

_TWO_PI = 2.0 * math.pi


class Float32Gaussian:
    """Fresh float32 noise from torch's generator for every call."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.noise_spec = NoiseSpec(scale, torch.float32, 24, "torch_cpu_blocks")

    def __call__(self, rows: torch.Tensor, content: torch.Tensor, lengths: Sequence[int],
                 tenants: Sequence[str]) -> torch.Tensor:
        noise = torch.randn(rows.shape, dtype=torch.float32, device=rows.device)
        return (rows.float() + self.scale * noise).to(rows.dtype)


class KeyedFloat32Gaussian:
    """Noise that the key and each row's prefix fix, in float32 from 24-bit uniforms."""

    def __init__(self, scale: float, key: str) -> None:
        self.scale = scale
        derived = hashlib.blake2b(key.encode(), digest_size=32, person=b"serveapp").digest()
        self._words = [int32_bits(int.from_bytes(derived[i:i + 4], "little"))
                       for i in range(0, 32, 4)]
        self.noise_spec = NoiseSpec(scale, torch.float32, 24, "adjacent_columns")

    def __repr__(self) -> str:
        return "KeyedFloat32Gaussian(<key withheld>)"

    def __call__(self, rows: torch.Tensor, content: torch.Tensor, lengths: Sequence[int],
                 tenants: Sequence[str]) -> torch.Tensor:
        # Keyed by one key for every client: this form knows no tenants.
        low, high = self._seeds(content.cpu(), lengths)
        noise = self._normals(low[:, None], high[:, None], rows.shape[1])
        return (rows.float() + self.scale * noise.to(rows.device)).to(rows.dtype)

    def _seeds(self, content: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
        """Each row's seed halves: a keyed hash of (position, content) summed along the
        prompt, hashed again."""
        k = self._words
        counts = torch.tensor(list(lengths), dtype=torch.int64)
        starts = torch.cumsum(counts, 0) - counts
        index = torch.arange(content.shape[0])
        position = index - torch.repeat_interleave(starts, counts)
        low, high = halves(content)
        place = mix32(position.to(torch.int32) * GOLDEN32)
        seed_halves = []
        for a, b, c, d in ((k[0], k[1], k[4], k[5]), (k[2], k[3], k[6], k[7])):
            lane = mix32(mix32(low ^ a) ^ high ^ place ^ b).to(torch.int64) & LOW32
            total = torch.cumsum(lane, 0)
            before = torch.cat([total.new_zeros(1), total])[starts]
            summed = total - torch.repeat_interleave(before, counts)
            s_low, s_high = halves(summed)
            seed_halves.append(mix32(mix32(s_low ^ c) ^ s_high ^ d))
        return seed_halves[0], seed_halves[1]

    @staticmethod
    def grid(low: torch.Tensor, high: torch.Tensor, hidden: int) -> torch.Tensor:
        """The 24-bit integers of each row's uniforms `(rows, hidden rounded up to even)`,
        from the rows' seed halves `(rows, 1)`."""
        even = hidden + hidden % 2
        counter = torch.arange(2 * even, dtype=torch.int32)
        mixed = mix32(counter * GOLDEN32 ^ 0x5BD1E995)
        first, second = mixed[:even], mixed[even:]
        return (mix32(mix32(low ^ first) ^ high ^ second) >> 8) & 0xFFFFFF

    @staticmethod
    def _normals(low: torch.Tensor, high: torch.Tensor, hidden: int) -> torch.Tensor:
        """Box-Muller in float32 on 24-bit uniforms: radius from even columns, angle from
        odd ones, cosine and sine side by side."""
        bits = KeyedFloat32Gaussian.grid(low, high, hidden)
        uniform = (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))
        radius = torch.sqrt(-2.0 * torch.log(uniform[:, 0::2]))
        angle = _TWO_PI * uniform[:, 1::2]
        normals = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2)
        return normals.flatten(1)[:, :hidden]


class RandomRotation(torch.nn.Module):
    """rows @ Q for a fixed random orthogonal Q (seeded), in the rows' dtype."""

    def __init__(self, hidden: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(hidden, hidden, generator=generator,
                                           dtype=torch.float64))
        self.rotation: torch.Tensor
        self.register_buffer("rotation", (q * r.diagonal().sign()).float())

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self.rotation.to(rows.dtype)
