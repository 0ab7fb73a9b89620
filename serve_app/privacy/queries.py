"""Attacks that need more than one sighting of the victim's prompt, or prompts of the
adversary's own sent through the gateway:

- averaging: the same prompt seen `sightings` times, its rows averaged, then the nearest
  row (fresh noise shrinks with the square root of the count);
- chosen prefix: an adversary who is also a client grows a guess of the victim's prompt
  one token at a time, trying candidates in the order of the nearest rows to the victim's
  row, until its own row at that position is the victim's, bit for bit (deterministic
  transforms: the rows are a function of the prefix);
- sigma reuse: one prompt seen under two sigmas with one key, whose noise is the same
  vector scaled: the two sightings give the clean rows exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from serve_app.privacy.lookups import nearest_rows, recovered
from serve_app.privacy.target import AuditTarget, as_bits, tenant_rows

# Candidates sent per round of the chosen-prefix search: the first rounds are small
# because the true token is mostly among the nearest few.
_PREFIX_ROUNDS = (4, 16, 64, 256)


def averaging(target: AuditTarget, prompts: Sequence[Sequence[int]],
              victim_rows: Sequence[torch.Tensor], truth: torch.Tensor,
              sightings: int) -> float:
    """Tokens read from the mean of `sightings` sightings of every prompt (the victim's
    first, then `sightings - 1` more)."""
    total = torch.cat(list(victim_rows)).double()
    for _ in range(sightings - 1):
        total += torch.cat(target.rows(prompts)).double()
    return recovered(nearest_rows(total / sightings, target.host_weight), truth)


@dataclass(frozen=True)
class PrefixOutcome:
    """Tokens the chosen-prefix search recovers, of `rows`, and the prompts it sent."""

    tokens: int
    rows: int
    queries: int

    @property
    def recovered(self) -> float:
        return self.tokens / self.rows

    @property
    def queries_per_token(self) -> float | None:
        return None if self.tokens == 0 else self.queries / self.tokens


def chosen_prefix(target: AuditTarget, prompts: Sequence[Sequence[int]],
                  victim_rows: Sequence[torch.Tensor], same_tenant: bool) -> PrefixOutcome:
    """Each victim prompt guessed position by position; a position where no candidate
    matches ends that prompt's search (the adversary cannot check what follows)."""
    found = queries = total = 0
    matrix = target.host_weight.double()
    for prompt, rows in zip(prompts, victim_rows, strict=True):
        guess: list[int] = []
        total += len(prompt)
        for position in range(len(prompt)):
            order = torch.cdist(rows[position:position + 1].double(), matrix)[0].argsort()
            token, tried = _first_match(target, guess, order, rows[position], same_tenant)
            queries += tried
            if token is None:
                break
            guess.append(token)
            found += token == prompt[position]
    return PrefixOutcome(tokens=found, rows=total, queries=queries)


def _first_match(target: AuditTarget, guess: list[int], candidates: torch.Tensor,
                 expected: torch.Tensor, same_tenant: bool) -> tuple[int | None, int]:
    """The first candidate (in order) whose row after `guess` is `expected`, bit for bit,
    and how many candidates a one-at-a-time adversary sends to find it."""
    tried = 0
    for size in (*_PREFIX_ROUNDS, len(candidates)):
        batch = candidates[tried:tried + size].tolist()
        if not batch:
            break
        rows = tenant_rows(target, [[*guess, token] for token in batch], same_tenant)
        last = as_bits(torch.stack([r[-1] for r in rows]))
        matches = (last == as_bits(expected)).all(dim=1).nonzero()
        if len(matches):
            first = int(matches[0, 0])
            return batch[first], tried + first + 1
        tried += len(batch)
    return None, tried


def sigma_reuse(target: AuditTarget, prompts: Sequence[Sequence[int]],
                victim_rows: Sequence[torch.Tensor], truth: torch.Tensor,
                other_sigma: float) -> float:
    """Tokens read from the victim's rows and the same prompts' rows at `other_sigma` under
    the same key: for rows `w + a n` and `w + b n`, `w = (b x_a - a x_b) / (b - a)`."""
    a, b = target.sigma, other_sigma
    assert a is not None and a != b
    at_a = torch.cat(list(victim_rows)).double()
    at_b = torch.cat(target.retuned(b).rows(prompts)).double()
    return recovered(nearest_rows((b * at_a - a * at_b) / (b - a), target.host_weight),
                     truth)
