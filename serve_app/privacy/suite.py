"""The attack suite: the adversary the audit models, as the attacks it runs on one
transform's rows, each with the tokens it recovers. The upstream operator holds the weights,
reads every byte as sent, sees many requests, and may also be a client of the gateway; the
audit's headline is what the best of its attacks reads (`worst`).

Each attack says which transforms it applies to: the exact-arithmetic attack to noise
kinds, the chosen-prefix attacks to transforms whose rows are a function of the prompt,
the sigma-reuse attack to those that also have a sigma.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from serve_app.privacy.exact import ExactOptions, exact_arithmetic
from serve_app.privacy.lookups import linear_map, row_norms, token_recovery
from serve_app.privacy.queries import averaging, chosen_prefix, sigma_reuse
from serve_app.privacy.target import AuditTarget, tenant_rows

# A sigma-reuse adversary sees the prompt again under the same key at this multiple.
REUSE_FACTOR = 2.0
# The prompts the target is sent twice to learn whether it is deterministic.
_DETERMINISM_PROMPTS = 2


@dataclass(frozen=True)
class SuiteOptions:
    """Which attacks run (None: every one that applies) and how hard they try."""

    attacks: tuple[str, ...] | None = None
    sightings: int = 16
    known_rows: int | None = None  # None: twice the hidden size
    exact: ExactOptions = ExactOptions()
    seed: int = 0
    separate_tenants: bool = False
    """Whether the gateway tells clients apart (`auth` with `privacy.transform.tenant:
    api_key`): then an adversary that is a client is in another tenant than its victim,
    and the same-tenant chosen-prefix attack, which needs the victim's API key, is
    reported but not counted in the headline."""


DEFAULT_OPTIONS = SuiteOptions()


@dataclass(frozen=True)
class AttackResult:
    """One attack's share of rows read (`recovered`) and what it spent or saw."""

    recovered: float
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"recovered": self.recovered, **self.details}


@dataclass(frozen=True)
class Victim:
    """The sample as the victim sends it: prompts, the rows sent, and the true tokens."""

    target: AuditTarget
    prompts: Sequence[Sequence[int]]
    rows: Sequence[torch.Tensor]
    deterministic: bool

    @property
    def sent(self) -> torch.Tensor:
        return torch.cat(list(self.rows))

    @property
    def truth(self) -> torch.Tensor:
        return torch.tensor([token for prompt in self.prompts for token in prompt])

    @classmethod
    def send(cls, target: AuditTarget, prompts: Sequence[Sequence[int]]) -> Victim:
        rows = target.rows(prompts)
        return cls(target, prompts, rows, target.deterministic(prompts[:_DETERMINISM_PROMPTS]))


def _nearest_row(victim: Victim, options: SuiteOptions) -> AttackResult:
    found = token_recovery(victim.rows, victim.prompts, victim.target.host_weight)
    return AttackResult(found.l2, {"cosine": found.cosine, "top5": found.top5})


def _exact(victim: Victim, options: SuiteOptions) -> AttackResult:
    spec, stated = victim.target.noise_spec()
    assert spec is not None
    outcome = exact_arithmetic(victim.sent, victim.truth, victim.target.host_weight, spec,
                               options.exact)
    return AttackResult(outcome.recovered, {
        "true_token_consistent": outcome.true_token_consistent,
        "consistent_candidates": outcome.consistent_candidates,
        "checked_pairs": outcome.checked_pairs,
        "candidates": options.exact.candidates,
        "noise_spec": {"dtype": str(spec.dtype).removeprefix("torch."),
                       "uniform_bits": spec.uniform_bits, "pairing": spec.pairing,
                       "stated": stated},
    })


def _averaging(victim: Victim, options: SuiteOptions) -> AttackResult:
    found = averaging(victim.target, victim.prompts, victim.rows, victim.truth,
                      options.sightings)
    return AttackResult(found, {"sightings": options.sightings})


def _known_pairs(victim: Victim, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` tokens of the adversary's choosing, sent as its own prompts (64 a prompt),
    with the clean rows it knows for them."""
    weight = victim.target.host_weight
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(weight.shape[0], (count,), generator=generator).tolist()
    prompts = [tokens[i:i + 64] for i in range(0, count, 64)]
    sent = torch.cat(tenant_rows(victim.target, prompts, same_tenant=True))
    return weight[tokens], sent


def _linear_map(victim: Victim, options: SuiteOptions) -> AttackResult:
    count = options.known_rows or 2 * victim.target.host_weight.shape[1]
    clean, sent = _known_pairs(victim, count, options.seed)
    outcome = linear_map(victim.sent, victim.truth, victim.target.host_weight, clean, sent)
    return AttackResult(max(outcome.least_squares, outcome.procrustes), {
        "least_squares": outcome.least_squares, "procrustes": outcome.procrustes,
        "known_rows": outcome.known_rows})


def _row_norms(victim: Victim, options: SuiteOptions) -> AttackResult:
    return AttackResult(row_norms(victim.sent, victim.truth, victim.target.host_weight))


def _prefix(same_tenant: bool) -> Callable[[Victim, SuiteOptions], AttackResult]:
    def run(victim: Victim, options: SuiteOptions) -> AttackResult:
        outcome = chosen_prefix(victim.target, victim.prompts, victim.rows, same_tenant)
        return AttackResult(outcome.recovered, {
            "queries": outcome.queries, "queries_per_token": outcome.queries_per_token})
    return run


def _sigma_reuse(victim: Victim, options: SuiteOptions) -> AttackResult:
    sigma = victim.target.sigma
    assert sigma is not None
    other = sigma * REUSE_FACTOR
    found = sigma_reuse(victim.target, victim.prompts, victim.rows, victim.truth, other)
    return AttackResult(found, {"sigmas": [sigma, other]})


@dataclass(frozen=True)
class Attack:
    """One attack of the suite: whether it applies to a victim's transform, and its run."""

    applies: Callable[[Victim], bool]
    run: Callable[[Victim, SuiteOptions], AttackResult]


def _always(victim: Victim) -> bool:
    return True


def _has_noise(victim: Victim) -> bool:
    spec, _ = victim.target.noise_spec()
    return spec is not None and spec.scale > 0


def _deterministic(victim: Victim) -> bool:
    return victim.deterministic


def _retunable(victim: Victim) -> bool:
    return victim.deterministic and bool(victim.target.sigma) and victim.target.key is not None


ATTACKS: dict[str, Attack] = {
    "nearest_row": Attack(_always, _nearest_row),
    "exact_arithmetic": Attack(_has_noise, _exact),
    "averaging": Attack(_always, _averaging),
    "linear_map": Attack(_always, _linear_map),
    "row_norms": Attack(_always, _row_norms),
    "chosen_prefix": Attack(_deterministic, _prefix(same_tenant=True)),
    "chosen_prefix_other_tenant": Attack(_deterministic, _prefix(same_tenant=False)),
    "sigma_reuse": Attack(_retunable, _sigma_reuse),
}
"""Every attack by name, in the order the suite runs them."""


def run_suite(victim: Victim,
              options: SuiteOptions = DEFAULT_OPTIONS) -> dict[str, AttackResult]:
    """Each chosen attack that applies to the victim's transform, worst first."""
    chosen = options.attacks or tuple(ATTACKS)
    unknown = set(chosen) - set(ATTACKS)
    if unknown:
        raise ValueError(f"unknown attacks: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(ATTACKS)})")
    results = {}
    for name in chosen:
        attack = ATTACKS[name]
        if attack.applies(victim):
            torch.manual_seed(options.seed)
            result = attack.run(victim, options)
            if name == NEEDS_THE_VICTIMS_KEY and options.separate_tenants:
                result = AttackResult(result.recovered, {**result.details, "counted": False})
            results[name] = result
    return dict(sorted(results.items(), key=lambda item: -item[1].recovered))


NEEDS_THE_VICTIMS_KEY = "chosen_prefix"
"""The attack an adversary can run only from inside its victim's tenant."""


def counted(results: dict[str, AttackResult],
            options: SuiteOptions = DEFAULT_OPTIONS) -> dict[str, AttackResult]:
    """The attacks the headline counts: all of them, but the one that needs the victim's
    API key where the gateway keeps tenants apart."""
    if not options.separate_tenants:
        return results
    return {name: result for name, result in results.items()
            if name != NEEDS_THE_VICTIMS_KEY}


def worst(results: dict[str, AttackResult]) -> tuple[str, float]:
    """The attack that reads most, and its share."""
    name = max(results, key=lambda n: results[n].recovered)
    return name, results[name].recovered
