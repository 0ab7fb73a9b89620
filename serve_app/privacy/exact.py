"""The exact-arithmetic attack: for each row sent, which candidate tokens could the
transform's own noise generator have turned into exactly these bytes?

For a candidate token the adversary undoes the row, `(sent - row) / scale`, and reads off
each noise pair's place on the generator's grid of uniforms (its radius and angle). Where
that place is known to within a few grid steps, it recomputes the noise at each nearby grid
point exactly as the generator does, adds it to the candidate's row as the transform does,
and compares the result with the bytes sent: a pair with no grid point that lands on them
rules the candidate out. Float32 noise from 24-bit uniforms is such a finite set, and the
true token is the only candidate that survives. Noise finer than one step of the wire
dtype (float64 normals rounded once) leaves every pair unchecked: every candidate survives
and the attack is the nearest row again. A pair that would need a radius beyond the
generator's largest rules the candidate out whatever the precision.

Candidates are the nearest rows by L2, `candidates` at a time, until one survives (at most
`max_candidates`); the adversary reads the nearest survivor, or the nearest row where none
survives. Pairs are checked a few at a time, and a candidate ruled out is not checked
further: a wrong candidate rarely survives more than a few pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from serve_app.privacy.noise_models import GeneratorModel
from serve_app.privacy.target import as_bits
from serve_app.prompts.noise_spec import NoiseSpec

# Pairs checked per step of the early rejection, and pairs enumerated at once (bounds the
# (pairs, window, window) temporaries).
_PAIRS_PER_ROUND = 2
_PAIRS_PER_STEP = 1 << 16
# Grid steps added to both half-widths: the generator rounds its angle to float32 before
# the sine and cosine (up to 0.64 of a step near 2 pi) and its radius's argument likewise.
_GRID_MARGIN = 1.0
# Rows whose distances to the whole matrix are held at once.
_NEAREST_CHUNK_ROWS = 256


@dataclass(frozen=True)
class ExactOptions:
    """How hard the adversary looks: candidates tried per round and in all, and how many
    grid steps either side of a pair's place it recomputes."""

    candidates: int = 32
    max_candidates: int = 256
    window: int = 4


@dataclass(frozen=True)
class ExactOutcome:
    """The attack's figures over the rows sent.

    `recovered`: rows whose read token is the true one. `true_token_consistent`: rows whose
    true token survives (1.0 when the model reproduces the generator; the audit knows the
    truth, the adversary does not). `consistent_candidates`: survivors among the first
    round's candidates, on average (1 when the test tells tokens apart, all of them when it
    cannot). `checked_pairs`: the fraction of the true token's pairs the test could check."""

    recovered: float
    true_token_consistent: float
    consistent_candidates: float
    checked_pairs: float


def _ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at each of `values` (float64)."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(values.abs())
    return torch.ldexp(torch.full_like(values, info.eps), exponent - 1).clamp(
        min=info.tiny * info.eps)


@dataclass(frozen=True)
class _Pairs:
    """Noise pairs, one per entry: the bytes sent and the candidate's values at the pair's
    radius and angle columns, and the grid points nearest the pair's place."""

    sent: tuple[torch.Tensor, torch.Tensor]
    row: tuple[torch.Tensor, torch.Tensor]
    radius_centre: torch.Tensor
    angle_centre: torch.Tensor

    def part(self, start: int, stop: int) -> _Pairs:
        return _Pairs((self.sent[0][start:stop], self.sent[1][start:stop]),
                      (self.row[0][start:stop], self.row[1][start:stop]),
                      self.radius_centre[start:stop], self.angle_centre[start:stop])


class ExactTest:
    """The candidate test for one generator."""

    def __init__(self, spec: NoiseSpec, window: int) -> None:
        self.model = GeneratorModel(spec)
        self.spec = spec
        self.window = window

    def survives(self, sent: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per entry, whether the candidate row `(m, hidden)` can give the row sent
        `(m, hidden)` in some place of the generator's blocks; pairs are checked a few at a
        time, only for candidates still alive."""
        alive_any = torch.zeros(sent.shape[0], dtype=torch.bool)
        for radius_columns, angle_columns in self.model.layouts(sent.shape[1]):
            alive = torch.ones(sent.shape[0], dtype=torch.bool)
            for start in range(0, len(radius_columns), _PAIRS_PER_ROUND):
                columns = (radius_columns[start:start + _PAIRS_PER_ROUND],
                           angle_columns[start:start + _PAIRS_PER_ROUND])
                entries = alive.nonzero()[:, 0]
                failed, _ = self.check(sent[entries], rows[entries], columns)
                alive[entries[failed > 0]] = False
            alive_any |= alive
        return alive_any

    def check(self, sent: torch.Tensor, rows: torch.Tensor,
              columns: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs ruled out and pairs checked, per entry, among the pairs at `columns`."""
        spec, model = self.spec, self.model
        x = (sent[:, columns[0]], sent[:, columns[1]])
        w = (rows[:, columns[0]], rows[:, columns[1]])
        noise = tuple((s.double() - r.double()) / spec.scale for s, r in zip(x, w, strict=True))
        slack = torch.maximum(*(self._slack(s, n) for s, n in zip(x, noise, strict=True)))
        radius = torch.hypot(*noise)
        spread = math.sqrt(2.0) * slack
        near = model.radius_coordinate((radius - spread).clamp(min=0.0))
        far = model.radius_coordinate(radius + spread)
        radius_half = (near - far).abs() / 2 + _GRID_MARGIN
        angle_half = torch.where(radius > 2 * spread, spread / (radius - spread),
                                 torch.full_like(radius, math.inf))
        angle_half = angle_half / model.two_pi * model.grid_size + _GRID_MARGIN
        checkable = (radius_half + 0.5 <= self.window) & (angle_half + 0.5 <= self.window)
        failed = ((radius - spread) > model.max_radius) & ~checkable
        angle = torch.atan2(noise[1], noise[0]) % (2 * math.pi)
        pairs = _Pairs(sent=(x[0][checkable], x[1][checkable]),
                       row=(w[0][checkable], w[1][checkable]),
                       radius_centre=((near + far) / 2)[checkable].round().long(),
                       angle_centre=model.angle_coordinate(angle[checkable]).round().long())
        failed[checkable] = ~self._any_grid_point_lands(pairs)
        return failed.sum(dim=-1), checkable.sum(dim=-1)

    def _slack(self, sent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """How far the generator's noise can lie from `(sent - row) / scale`: the sum's
        rounding (to the dtype, and again to the wire), the product's, and the generator's
        own error against exact math (half a unit in its last place)."""
        spec = self.spec
        sent64 = sent.double()
        rounding = _ulp(sent64, sent.dtype) + _ulp(spec.scale * noise, spec.dtype)
        if sent.dtype != spec.dtype:
            rounding = rounding + _ulp(sent64, spec.dtype)
        eps = torch.finfo(spec.dtype).eps
        return rounding / (2 * spec.scale) + eps / 2 * noise.abs()

    def _any_grid_point_lands(self, pairs: _Pairs) -> torch.Tensor:
        """Per pair: whether some grid point within the window gives exactly the bytes
        sent."""
        lands = [self._lands(pairs.part(start, start + _PAIRS_PER_STEP))
                 for start in range(0, pairs.radius_centre.shape[0], _PAIRS_PER_STEP)]
        return torch.cat(lands) if lands else torch.zeros(0, dtype=torch.bool)

    def _lands(self, pairs: _Pairs) -> torch.Tensor:
        model, spec = self.model, self.spec
        steps = torch.arange(-self.window, self.window + 1)
        radius_k = (pairs.radius_centre[:, None] + steps).clamp(0, model.grid_size - 1)
        angle_k = (pairs.angle_centre[:, None] + steps) % model.grid_size
        radii = model.radii(radius_k)[:, :, None]
        cos, sin = (t[:, None, :] for t in model.cos_sin(angle_k))
        scale = torch.tensor(spec.scale, dtype=spec.dtype)
        lands = None
        for sent, row, values in zip(pairs.sent, pairs.row, (radii * cos, radii * sin),
                                     strict=True):
            made = (row.to(spec.dtype)[:, None, None] + scale * values).to(sent.dtype)
            same = as_bits(made) == as_bits(sent)[:, None, None]
            lands = same if lands is None else lands & same
        assert lands is not None
        return lands.flatten(1).any(dim=1)


def exact_arithmetic(sent: torch.Tensor, truth: torch.Tensor, weight: torch.Tensor,
                     spec: NoiseSpec, options: ExactOptions = ExactOptions()) -> ExactOutcome:
    """The attack on rows sent `(n, hidden)` whose true tokens are `truth`, against the
    matrix `weight` (both in the wire dtype)."""
    test = ExactTest(spec, options.window)
    order = _nearest_first(sent, weight, min(options.max_candidates, weight.shape[0]))
    read = order[:, 0].clone()
    open_rows = torch.arange(sent.shape[0])
    consistent_first = torch.zeros(1, dtype=torch.float64)
    for start in range(0, order.shape[1], options.candidates):
        ids = order[open_rows, start:start + options.candidates]
        rows_open = sent[open_rows][:, None, :].expand(-1, ids.shape[1], -1)
        alive = test.survives(rows_open.flatten(0, 1), weight[ids.flatten()]).view(ids.shape)
        if start == 0:
            consistent_first = alive.sum(dim=1).double()
        found = alive.any(dim=1)
        nearest_alive = alive.to(torch.int8).argmax(dim=1)
        read[open_rows[found]] = ids[found, nearest_alive[found]]
        open_rows = open_rows[~found]
        if open_rows.numel() == 0:
            break
    failed, checked = _truth_checks(test, sent, weight[truth])
    pairs = len(test.model.layouts(sent.shape[1])[0][0])
    return ExactOutcome(
        recovered=float((read == truth).double().mean()),
        true_token_consistent=float((failed == 0).double().mean()),
        consistent_candidates=float(consistent_first.mean()),
        checked_pairs=float(checked.double().mean()) / max(1, pairs),
    )


def _truth_checks(test: ExactTest, sent: torch.Tensor,
                  rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs ruled out and checked for the true rows, in the place that rules out fewest."""
    layouts = test.model.layouts(sent.shape[1])
    results = [test.check(sent, rows, columns) for columns in layouts]
    failed = torch.stack([f for f, _ in results])
    checked = torch.stack([c for _, c in results])
    best = failed.argmin(dim=0, keepdim=True)
    return failed.gather(0, best)[0], checked.gather(0, best)[0]


def _nearest_first(sent: torch.Tensor, weight: torch.Tensor, count: int) -> torch.Tensor:
    """Each row's `count` nearest matrix rows by L2, nearest first, in chunks of rows."""
    matrix = weight.double()
    return torch.cat([torch.cdist(chunk.double(), matrix).topk(count, largest=False).indices
                      for chunk in sent.split(_NEAREST_CHUNK_ROWS)])
