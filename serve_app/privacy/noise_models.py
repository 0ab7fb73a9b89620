"""The adversary's copy of each noise generator a `NoiseSpec` can name: where a pair of
noise values sits on the generator's grid of uniforms, and the exact values the generator
makes from a grid point, bit for bit, so that a candidate token can be tested against the
bytes sent (`serve_app.privacy.exact`).

Float32 generators are modelled operation by operation:
- `torch_cpu_blocks`: torch's CPU `normal_` kernel for float32 on x86 with AVX2 (also the
  kernel AVX-512 machines run): Box-Muller with avx_mathfun's `log256_ps` and
  `sincos256_ps`, whose multiply-adds the compiler fuses (read from torch 2.13's
  `libtorch_cpu.so`). torch's own `sqrt`, `log`, `sin`, `cos` on float32 tensors are not
  correctly rounded, so the model computes each fused step in float64 and rounds once.
  `torch_randn_matches` checks the model against `torch.randn` on the machine it runs on;
- `adjacent_columns`: the keyed transforms' Box-Muller in torch's own float32 operations on
  the CPU, which are the same at every position of a tensor.
Float64 generators are modelled with torch's float64 operations; with 53-bit uniforms their
grid is far finer than one step of the wire dtype, so no candidate is ever ruled out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from serve_app.prompts.noise_spec import NoiseSpec

_F32 = torch.float32
# avx_mathfun's constants, as the float32 values torch's kernel holds.
_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
          1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
          3.3333331174e-1)
_LOG_Q1, _LOG_Q2 = -2.12194440e-4, 0.693359375
_SQRT_HALF = 0.707106781186547524
_FOUR_OVER_PI = 1.27323954473516
_DP = (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8)
_COS_P = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)
_SIN_P = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
TORCH_BLOCK = 16


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=_F32)


def _fma(a: torch.Tensor, b: torch.Tensor | float, c: torch.Tensor | float) -> torch.Tensor:
    """float32 a * b + c with one rounding: the product is exact in float64, and rounding
    the float64 sum to float32 errs only on exact float32 midpoints (about 2**-29 of them)."""
    b64 = b.double() if isinstance(b, torch.Tensor) else float(_f32(b))
    c64 = c.double() if isinstance(c, torch.Tensor) else float(_f32(c))
    return (a.double() * b64 + c64).float()


def _sqrt(values: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (float64 then float32: exact for sqrt)."""
    return values.double().sqrt().float()


def _log256(x: torch.Tensor) -> torch.Tensor:
    """avx_mathfun's `log256_ps` for normal positive float32 inputs, fused as compiled."""
    bits = x.view(torch.int32)
    exponent = ((bits >> 23) - 127).to(_F32) + 1.0
    mantissa = ((bits & ~0x7F800000) | 0x3F000000).view(_F32)  # in [0.5, 1)
    small = mantissa < _f32(_SQRT_HALF)
    exponent = exponent - small.to(_F32)
    m = mantissa - 1.0 + torch.where(small, mantissa, torch.zeros_like(mantissa))
    z = m * m
    y = torch.full_like(m, float(_f32(_LOG_P[0])))
    for p in _LOG_P[1:]:
        y = _fma(y, m, p)
    y = _fma(y * m, z, exponent * _f32(_LOG_Q1))
    y = y - z * 0.5  # exact product: the fused form rounds the same
    return _fma(exponent, _LOG_Q2, m + y)


def _sincos256(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """avx_mathfun's `sincos256_ps` for float32 inputs in [0, 2*pi], fused as compiled."""
    octant = (x * _f32(_FOUR_OVER_PI)).to(torch.int32)
    octant = (octant + 1) & ~1
    y = octant.to(_F32)
    sin_negative = (octant & 4) != 0
    first_polynomial = (octant & 2) == 0
    for dp in _DP:
        x = _fma(y, dp, x)
    cos_negative = (~(octant - 2) & 4) != 0
    z = x * x
    near_cos = _fma(_fma(torch.full_like(z, float(_f32(_COS_P[0]))), z, _COS_P[1]), z,
                    _COS_P[2])
    near_cos = _fma(near_cos * z, z, -(z * 0.5)) + 1.0
    near_sin = _fma(_fma(torch.full_like(z, float(_f32(_SIN_P[0]))), z, _SIN_P[1]), z,
                    _SIN_P[2])
    near_sin = _fma(near_sin * z, x, x)
    sin = torch.where(first_polynomial, near_sin, near_cos)
    cos = torch.where(first_polynomial, near_cos, near_sin)
    return torch.where(sin_negative, -sin, sin), torch.where(cos_negative, -cos, cos)


def torch_cpu_normals(uniforms: torch.Tensor) -> torch.Tensor:
    """torch's CPU float32 `normal_` on blocks of 16 24-bit uniforms `(..., 16)`."""
    radius = _sqrt(_f32(-2.0) * _log256(1.0 - uniforms[..., :8]))
    sin, cos = _sincos256(_f32(2.0 * math.pi) * uniforms[..., 8:])
    return torch.cat([radius * cos, radius * sin], dim=-1)


@dataclass(frozen=True)
class GeneratorModel:
    """One `NoiseSpec`'s generator: its pairs' columns, the grid coordinates of a noise
    pair, and the exact noise values at grid points.

    A pair is (radius column, angle column): the radius uniform sets the pair's radius,
    the angle uniform its angle; the radius column holds radius * cos, the angle column
    radius * sin. Grid coordinates are the integers k of the uniforms."""

    spec: NoiseSpec

    @property
    def grid_size(self) -> int:
        return 1 << self.spec.uniform_bits

    @property
    def _offset(self) -> float:
        """Where on its step a uniform sits: torch draws k / 2**bits, the keyed kinds
        (k + 1/2) / 2**bits."""
        return 0.0 if self.spec.pairing == "torch_cpu_blocks" else 0.5

    @property
    def two_pi(self) -> float:
        """2 pi as the generator multiplies by it."""
        return float(torch.tensor(2.0 * math.pi, dtype=self.spec.dtype))

    @property
    def max_radius(self) -> float:
        """The largest radius the generator reaches: the smallest radius uniform's."""
        smallest = (self._offset or 1.0) / self.grid_size
        return math.sqrt(-2.0 * math.log(smallest)) * (1.0 + 1e-6)

    def layouts(self, hidden: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(radius columns, angle columns) of the pairs inside one row, for each place a
        row can start at in the generator's blocks: one for `adjacent_columns` and for
        `torch_cpu_blocks` rows whose width is a multiple of 16."""
        if self.spec.pairing == "adjacent_columns":
            radius = torch.arange(0, hidden - 1, 2)
            return [(radius, radius + 1)]
        half = TORCH_BLOCK // 2
        step = math.gcd(hidden, TORCH_BLOCK)
        layouts = []
        for phase in range(0, TORCH_BLOCK, step):
            radius = torch.tensor([i for i in range(hidden - half)
                                   if (i + phase) % TORCH_BLOCK < half], dtype=torch.int64)
            layouts.append((radius, radius + half))
        return layouts

    def radius_coordinate(self, radius: torch.Tensor) -> torch.Tensor:
        """The continuous grid coordinate of the radius uniform giving `radius` (float64)."""
        half_square = -0.5 * radius.square()
        if self.spec.pairing == "torch_cpu_blocks":  # radius from 1 - u
            return -torch.expm1(half_square) * self.grid_size
        return half_square.exp() * self.grid_size - self._offset

    def angle_coordinate(self, angle: torch.Tensor) -> torch.Tensor:
        """The continuous grid coordinate of the angle uniform giving `angle` in [0, 2 pi)."""
        return angle / self.two_pi * self.grid_size - self._offset

    def radii(self, k: torch.Tensor) -> torch.Tensor:
        """The generator's radius at radius grid points `k` (int64), in its dtype."""
        uniform = self._uniforms(k)
        if self.spec.pairing == "torch_cpu_blocks" and self.spec.dtype == _F32:
            return _sqrt(_f32(-2.0) * _log256(1.0 - uniform))
        if self.spec.pairing == "torch_cpu_blocks":
            return torch.sqrt(-2 * torch.log(1.0 - uniform))
        return torch.sqrt(-2.0 * torch.log(uniform))

    def cos_sin(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's cosine and sine at angle grid points `k` (int64)."""
        uniform = self._uniforms(k)
        if self.spec.pairing == "torch_cpu_blocks" and self.spec.dtype == _F32:
            sin, cos = _sincos256(_f32(2.0 * math.pi) * uniform)
            return cos, sin
        angle = (2.0 * math.pi) * uniform
        return torch.cos(angle), torch.sin(angle)

    def _uniforms(self, k: torch.Tensor) -> torch.Tensor:
        dtype = self.spec.dtype
        if self._offset:
            return (k.to(dtype) + self._offset) * (1.0 / self.grid_size)
        return k.to(dtype) * (1.0 / self.grid_size)


def torch_randn_matches(samples: int = 4096, seed: int = 0) -> bool:
    """Whether `torch_cpu_normals` reproduces `torch.randn` bit for bit on this machine
    (its x86 AVX2 kernel; other CPUs run other code)."""
    generator = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(samples, generator=generator)
    normals = torch.randn(samples, generator=generator.manual_seed(seed))
    return torch.equal(torch_cpu_normals(uniforms.view(-1, TORCH_BLOCK)).flatten(), normals)
