"""`NoiseSpec`: how a noise transform makes its rows, stated for the inversion audit.

The audit's adversary holds the gateway's code (Kerckhoffs), so it knows how the noise is
drawn, and tests each candidate token by asking whether the bytes sent can come out of that
generator (`serve_app.privacy.exact`). A noise transform states its generator here, as its
`noise_spec` attribute; the audit reads nothing else of it.

The rows sent are `(rows.to(dtype) + scale * normals).to(wire dtype)`, the normals made in
`dtype` by Box-Muller from uniforms with `uniform_bits` bits, paired as `pairing` says:
- `torch_cpu_blocks`: torch's CPU `normal_` kernel (`torch.randn`) over the flat batch.
  Uniforms `k / 2**bits` for the whole tensor; in each block of 16, element j takes its
  radius from `1 - u[j]` and element j + 8 its angle from `u[j + 8]` (j < 8); when the size
  is not a multiple of 16, the last 16 elements are drawn again as one more block.
- `adjacent_columns`: per row, uniforms `(k + 1/2) / 2**bits`; column 2i gives the radius
  and column 2i + 1 the angle of one pair, whose cosine lands in column 2i and sine in 2i + 1.

Float32 noise from 24-bit uniforms is a finite set that exact arithmetic tests candidates
against; noise made in float64 from 53-bit uniforms and rounded once to the wire leaves
every candidate possible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Pairing = Literal["torch_cpu_blocks", "adjacent_columns"]


@dataclass(frozen=True)
class NoiseSpec:
    """A noise transform's generator: the noise's scale in the rows' units, the dtype the
    normals and the sum are computed in, the uniforms' bits, and how uniforms pair."""

    scale: float
    dtype: torch.dtype
    uniform_bits: int
    pairing: Pairing
