"""The noise of the noise transforms: standard normals made in float64 from one 64-bit seed
per row, added to the rows and rounded once to the rows' own dtype.

Each row's stream is SplitMix64 from the row's seed: uniform k is the top 53 bits of
`mix64(seed + (k + 1) * GOLDEN)`, and uniforms 2p and 2p + 1 make the Box-Muller pair of
columns 2p and 2p + 1 ("adjacent" pairing):

    r = sqrt(-2 ln((u_2p + 1) / 2**53)),  theta = 2 pi u_2p+1 / 2**53,
    z_2p = r cos(theta),  z_2p+1 = r sin(theta)

all in float64. A pair of noise values is one of 2**106 rather than of the 2**48 that
24-bit uniforms give, and `rows.double() + scale * z` is rounded once to the wire dtype,
so the values the noise can take form no finite set that exact arithmetic could test a
candidate token against.

On the CPU the stream runs eagerly, in place, in chunks that stay in cache (a fresh
temporary per op faults in new pages and costs more than the arithmetic). Every op is
elementwise, and torch's vectorized float64 log, sin and cos give the same bits at every
position of a tensor, so a row's noise does not depend on the rows batched with it. On
CUDA the whole of `add_noise` is one compiled kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_SERIAL_ELEMENTS = 32768
"""torch's grain size: an elementwise op on fewer elements runs on one thread. A CPU chunk
stays under it (its buffers, about 48 bytes a normal, stay in L2)."""
_UNIFORM_SCALE = 2.0 ** -53
_ANGLE_SCALE = 2.0 * math.pi * _UNIFORM_SCALE


def _int64(value: int) -> int:
    """A 64-bit pattern as the signed int64 torch computes with (wrapping)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_M1, _M2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)
_LOW_53 = (1 << 53) - 1


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64; the masks make the right shifts logical."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _M1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _M2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _mix64_(z: torch.Tensor, spare: torch.Tensor) -> None:
    """`_mix64` in place, with `spare` (z's shape) for the shifted words."""
    for shift, factor in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=spare)
        spare &= (1 << (64 - shift)) - 1
        z ^= spare
        if factor is not None:
            z *= factor


def stream_counters(pairs: int, device: torch.device | str) -> torch.Tensor:
    """`(2, pairs)` int64: each pair's radius (k = 2p) and angle (k = 2p + 1) counters,
    `(k + 1) * GOLDEN`, SplitMix64's increments."""
    k = torch.arange(2 * pairs, dtype=torch.int64, device=device).view(pairs, 2).T
    return ((k + 1) * _GOLDEN).contiguous()


def _pairs(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """`(rows, 2 x pairs)` float64 normals for `(rows,)` int64 seeds: the stream as one
    expression (the compiled CUDA form, and the CPU's reference)."""
    bits = (_mix64(seeds[:, None, None] + counters) >> 11) & _LOW_53
    uniform = bits.to(torch.float64)
    radius = torch.sqrt(-2.0 * torch.log((uniform[:, 0] + 1.0) * _UNIFORM_SCALE))
    angle = uniform[:, 1] * _ANGLE_SCALE
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2).flatten(1)


def _noised(rows: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor,
            scale: float) -> torch.Tensor:
    noise = _pairs(seeds, counters)[:, :rows.shape[1]]
    return (rows.double() + scale * noise).to(rows.dtype)


@functools.cache
def _compiled(name: str) -> Callable[..., torch.Tensor]:
    """`_pairs` or `_noised` compiled into one kernel for CUDA: eagerly, each of about 40
    steps would write the batch's noise to memory."""
    function: Callable[..., torch.Tensor] = _pairs if name == "pairs" else _noised
    return torch.compile(function, dynamic=True, fullgraph=True)


class _ChunkBuffers:
    """One chunk's buffers, reused chunk after chunk by one thread."""

    def __init__(self, rows: int, pairs: int) -> None:
        words = (rows, 2, pairs)
        self.words = torch.empty(words, dtype=torch.int64)
        self.spare = torch.empty(words, dtype=torch.int64)
        self.uniform = torch.empty(words, dtype=torch.float64)
        self.trig = torch.empty((rows, pairs), dtype=torch.float64)
        self.noise = torch.empty((rows, 2 * pairs), dtype=torch.float64)
        self.total = torch.empty((rows, 2 * pairs), dtype=torch.float64)


def _chunk_normals(seeds: torch.Tensor, counters: torch.Tensor,
                   buffers: _ChunkBuffers) -> torch.Tensor:
    """`_pairs` for one chunk of rows, in place, step for step the same float64 ops (so
    the same bits); returns a view of `buffers.noise`."""
    n = seeds.shape[0]
    words, spare = buffers.words[:n], buffers.spare[:n]
    uniform, trig, noise = buffers.uniform[:n], buffers.trig[:n], buffers.noise[:n]
    torch.add(seeds[:, None, None], counters, out=words)
    _mix64_(words, spare)
    words >>= 11
    words &= _LOW_53
    uniform.copy_(words)
    radius, angle = uniform[:, 0], uniform[:, 1]
    radius.add_(1.0).mul_(_UNIFORM_SCALE).log_().mul_(-2.0).sqrt_()
    angle.mul_(_ANGLE_SCALE)
    torch.cos(angle, out=trig)
    torch.mul(radius, trig, out=noise[:, 0::2])
    torch.sin(angle, out=trig)
    torch.mul(radius, trig, out=noise[:, 1::2])
    return noise


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="serve-app-noise")


def _each_chunk(seeds: torch.Tensor, hidden: int,
                consume: Callable[[int, torch.Tensor, _ChunkBuffers], None]) -> None:
    """`consume(start, noise, buffers)` for each chunk of rows from `start`, `noise` its
    `(rows, hidden)` float64 normals in `buffers`, which the thread reuses.

    A chunk's ops stay under torch's grain size, so each runs on the calling thread alone:
    under intra-op parallelism every op of every chunk would wait at a barrier for all of
    torch's threads, which on a loaded machine costs more than the op (a 2-core VM at load
    10 took 28 s for a batch one thread makes in 0.35 s). The chunks run on as many threads
    as torch has instead, each with its own buffers."""
    pairs = (hidden + 1) // 2
    step = max(1, (_SERIAL_ELEMENTS - 1) // (2 * pairs))
    counters = stream_counters(pairs, "cpu")
    starts = range(0, seeds.shape[0], step)
    workers = max(1, min(torch.get_num_threads(), len(starts)))
    inference = torch.is_inference_mode_enabled()  # thread-local: the caller's, in each

    def run(span: range) -> None:
        with torch.inference_mode(inference):
            buffers = _ChunkBuffers(step, pairs)
            for start in span:
                noise = _chunk_normals(seeds[start:start + step], counters, buffers)
                consume(start, noise[:, :hidden], buffers)

    spans = [starts[worker::workers] for worker in range(workers)]
    if workers == 1:
        run(spans[0])
    else:
        for done in _pool(workers).map(run, spans):
            del done


def standard_normals(seeds: torch.Tensor, hidden: int) -> torch.Tensor:
    """`(rows, hidden)` float64 standard normals, a pure function of each row's int64 seed
    (`(rows,)`), on the seeds' device."""
    if seeds.is_cuda:
        return _compiled("pairs")(seeds, stream_counters((hidden + 1) // 2, seeds.device))[
            :, :hidden]
    out = torch.empty((seeds.shape[0], hidden), dtype=torch.float64)

    def keep(start: int, noise: torch.Tensor, buffers: _ChunkBuffers) -> None:
        out[start:start + noise.shape[0]] = noise

    _each_chunk(seeds, hidden, keep)
    return out


def add_noise(rows: torch.Tensor, seeds: torch.Tensor, scale: float) -> torch.Tensor:
    """`(rows.double() + scale * standard_normals(seeds, hidden)).to(rows.dtype)`: one
    rounding, to the rows' dtype, without the batch's float64 noise ever in memory whole."""
    hidden = rows.shape[1]
    if rows.is_cuda:
        counters = stream_counters((hidden + 1) // 2, rows.device)
        return _compiled("noised")(rows, seeds, counters, scale)
    out = torch.empty_like(rows)

    def noised(start: int, noise: torch.Tensor, buffers: _ChunkBuffers) -> None:
        n = noise.shape[0]
        total = buffers.total[:n, :hidden]
        noise.mul_(scale)
        total.copy_(rows[start:start + n])
        total.add_(noise)
        out[start:start + n].copy_(total)

    _each_chunk(seeds, hidden, noised)
    return out
