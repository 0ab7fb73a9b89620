"""The audit's attack suite on the demo model, attack by attack: each reads the tokens
through a reference weak transform it must break, and reads no more than it should
through one it must not; then the suite's order, choice of attacks and command line."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from serve_app.config import TransformConfig
from serve_app.privacy import __main__ as cli
from serve_app.privacy.lookups import linear_map, row_norms, token_recovery
from serve_app.privacy.queries import averaging, chosen_prefix, sigma_reuse
from serve_app.privacy.sample import BUILT_IN_SAMPLE
from serve_app.privacy.suite import SuiteOptions, Victim, counted, run_suite, worst
from serve_app.privacy.target import AuditTarget, TransformFactory
from serve_app.privacy.weak_transforms import (
    Float32Gaussian,
    KeyedFloat32Gaussian,
    RandomRotation,
)
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.transforms import (
    GaussianNoise,
    ModuleTransform,
    PromptTransform,
    build_keyed_transform,
    matrix_std,
)

KEY = "a suite test key of 32 chars...."


class NoisyRotation:
    """A random rotation, then fresh float64 noise of `scale`, rounded once."""

    def __init__(self, hidden: int, scale: float) -> None:
        self.rotation = RandomRotation(hidden)
        self.scale = scale

    def __call__(self, rows: torch.Tensor, content: torch.Tensor, lengths: Any,
                 tenants: Any) -> torch.Tensor:
        noise = torch.randn(rows.shape, dtype=torch.float64)
        return (self.rotation(rows).double() + self.scale * noise).to(rows.dtype)


@pytest.fixture(scope="module")
def weight(embedder: EmbedderCore) -> torch.Tensor:
    return embedder.weight


@pytest.fixture(scope="module")
def prompts(demo_tokenizer: Any) -> list[list[int]]:
    return [list(demo_tokenizer(text).input_ids) for text in BUILT_IN_SAMPLE]


def _target(weight: torch.Tensor, build: TransformFactory, sigma: float | None = None,
            key: str | None = None) -> AuditTarget:
    return AuditTarget(weight, {"kind": "test"}, build, sigma, key)


def _victim(target: AuditTarget, prompts: list[list[int]]) -> Victim:
    torch.manual_seed(0)
    return Victim.send(target, prompts)


def _gaussian(weight: torch.Tensor) -> TransformFactory:
    std = matrix_std(weight)
    return lambda sigma, key: Float32Gaussian(sigma * std)


def _keyed(weight: torch.Tensor, bind_sigma: bool = False) -> TransformFactory:
    std = matrix_std(weight)

    def build(sigma: float, key: str | None) -> PromptTransform:
        assert key is not None
        return KeyedFloat32Gaussian(sigma * std, f"{key}/{sigma}" if bind_sigma else key)
    return build


def _gateway_keyed(weight: torch.Tensor) -> TransformFactory:
    """The gateway's keyed transform: float64 noise, its seed bound to sigma and the tenant."""
    def build(sigma: float, key: str | None) -> PromptTransform:
        assert key is not None
        config = TransformConfig(kind="keyed_gaussian", sigma=sigma, key_env="UNUSED_HERE")
        return build_keyed_transform(config, weight, key)
    return build


def _seeded_gaussian(scale: float) -> TransformFactory:
    """The gateway's `gaussian` at a fixed scale, its fresh seeds drawn from seed 0."""
    return lambda sigma, key: GaussianNoise(scale, random.Random(0).randbytes)


def _rotation(weight: torch.Tensor, noise_sigma: float | None = None) -> TransformFactory:
    hidden, std = weight.shape[1], matrix_std(weight)
    if noise_sigma is None:
        return lambda sigma, key: ModuleTransform(RandomRotation(hidden).eval(), False)
    return lambda sigma, key: NoisyRotation(hidden, noise_sigma * std)


def _nearest(victim: Victim) -> float:
    return token_recovery(victim.rows, victim.prompts, victim.target.weight).l2


# ------------------------------------------------------------------ averaging


def test_averaging_sightings_cancels_fresh_noise(weight: torch.Tensor,
                                                 prompts: list[list[int]]) -> None:
    victim = _victim(_target(weight, _gaussian(weight), 4.0), prompts)
    assert _nearest(victim) < 0.7
    assert averaging(victim.target, prompts, victim.rows, victim.truth, 16) >= 0.98
    assert averaging(victim.target, prompts, victim.rows, victim.truth, 1) == _nearest(victim)


def test_averaging_keyed_rows_learns_nothing(weight: torch.Tensor,
                                             prompts: list[list[int]]) -> None:
    victim = _victim(_target(weight, _keyed(weight), 4.0, KEY), prompts)
    assert victim.deterministic
    assert averaging(victim.target, prompts, victim.rows, victim.truth, 16) == _nearest(victim)


# ------------------------------------------------------------------ linear map, row norms


def _known(victim: Victim, count: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(victim.target.weight.shape[0], (count,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    sent = torch.cat(victim.target.rows([tokens[:64], tokens[64:]]))
    return victim.target.weight[tokens], sent


def test_a_linear_map_fitted_to_known_rows_undoes_a_rotation(
        weight: torch.Tensor, prompts: list[list[int]]) -> None:
    victim = _victim(_target(weight, _rotation(weight)), prompts)
    assert _nearest(victim) < 0.02
    outcome = linear_map(victim.sent, victim.truth, weight, *_known(victim))
    assert outcome.least_squares == outcome.procrustes == 1.0
    assert outcome.known_rows == 128


def test_a_linear_map_does_not_undo_noise(weight: torch.Tensor,
                                          prompts: list[list[int]]) -> None:
    noisy = _victim(_target(weight, _rotation(weight, noise_sigma=2.0)), prompts)
    outcome = linear_map(noisy.sent, noisy.truth, weight, *_known(noisy))
    # What the same noise leaves without the rotation: the map cannot do better.
    scale = 2.0 * matrix_std(weight)
    plain = _victim(_target(weight, _seeded_gaussian(scale)), prompts)
    assert max(outcome.least_squares, outcome.procrustes) <= _nearest(plain) + 0.03


def test_row_norms_read_a_rotation(weight: torch.Tensor, prompts: list[list[int]]) -> None:
    victim = _victim(_target(weight, _rotation(weight)), prompts)
    assert row_norms(victim.sent, victim.truth, weight) == 1.0


def test_row_norms_read_nothing_once_noise_moves_them(weight: torch.Tensor,
                                                      prompts: list[list[int]]) -> None:
    victim = _victim(_target(weight, _rotation(weight, noise_sigma=1.0)), prompts)
    assert row_norms(victim.sent, victim.truth, weight) < 0.1


# ------------------------------------------------------------------ chosen prefix, sigma reuse


def test_chosen_prefixes_read_keyed_rows_in_the_victims_tenant_only(
        weight: torch.Tensor, prompts: list[list[int]]) -> None:
    short = [p[:24] for p in prompts[:3]]
    victim = _victim(_target(weight, _gateway_keyed(weight), 4.0, KEY), short)
    inside = chosen_prefix(victim.target, short, victim.rows, same_tenant=True)
    assert inside.recovered == 1.0 and inside.tokens == sum(map(len, short))
    assert inside.queries_per_token is not None and 1.0 < inside.queries_per_token < 50
    outside = chosen_prefix(victim.target, short, victim.rows, same_tenant=False)
    assert outside.recovered == 0.0 and outside.queries_per_token is None
    assert outside.queries == len(short) * weight.shape[0]  # every candidate, then stop


def test_chosen_prefixes_read_a_keyed_form_without_tenants_from_outside(
        weight: torch.Tensor, prompts: list[list[int]]) -> None:
    short = [p[:24] for p in prompts[:2]]
    victim = _victim(_target(weight, _keyed(weight), 4.0, KEY), short)
    outside = chosen_prefix(victim.target, short, victim.rows, same_tenant=False)
    assert outside.recovered == 1.0


def test_chosen_prefixes_do_not_apply_to_fresh_noise(weight: torch.Tensor,
                                                     prompts: list[list[int]]) -> None:
    victim = _victim(_target(weight, _gaussian(weight), 1.0), prompts[:2])
    assert not victim.deterministic
    chosen = ("nearest_row", "chosen_prefix", "chosen_prefix_other_tenant", "sigma_reuse")
    assert list(run_suite(victim, SuiteOptions(attacks=chosen))) == ["nearest_row"]


def test_two_sigmas_under_one_key_give_the_clean_rows(weight: torch.Tensor,
                                                      prompts: list[list[int]]) -> None:
    victim = _victim(_target(weight, _keyed(weight), 4.0, KEY), prompts)
    assert _nearest(victim) < 0.7
    assert sigma_reuse(victim.target, prompts, victim.rows, victim.truth, 8.0) == 1.0


@pytest.mark.parametrize("bound", ["weak form, sigma in its key", "the gateway's keyed"])
def test_sigma_bound_into_the_seed_leaves_two_sightings_nothing(
        weight: torch.Tensor, prompts: list[list[int]], bound: str) -> None:
    build = _keyed(weight, bind_sigma=True) if bound.startswith("weak") else _gateway_keyed(
        weight)
    victim = _victim(_target(weight, build, 4.0, KEY), prompts)
    assert sigma_reuse(victim.target, prompts, victim.rows, victim.truth, 8.0) <= _nearest(
        victim)


# ------------------------------------------------------------------ the suite


def test_the_suite_runs_what_applies_worst_first(weight: torch.Tensor,
                                                 prompts: list[list[int]]) -> None:
    short = [p[:20] for p in prompts[:3]]  # the chosen-prefix search grows with length
    victim = _victim(_target(weight, _keyed(weight), 4.0, KEY), short)
    results = run_suite(victim, SuiteOptions(sightings=4))
    assert set(results) == {"nearest_row", "exact_arithmetic", "averaging", "linear_map",
                            "row_norms", "chosen_prefix", "chosen_prefix_other_tenant",
                            "sigma_reuse"}
    shares = [result.recovered for result in results.values()]
    assert shares == sorted(shares, reverse=True)
    assert results["exact_arithmetic"].details["noise_spec"] == {
        "dtype": "float32", "uniform_bits": 24, "pairing": "adjacent_columns", "stated": True}
    assert results["averaging"].details == {"sightings": 4}
    with pytest.raises(ValueError, match="unknown attacks: bogus"):
        run_suite(victim, SuiteOptions(attacks=("nearest_row", "bogus")))


class UnstatedNoise:
    """A noise transform that states no generator (no `noise_spec`)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, rows: torch.Tensor, content: torch.Tensor, lengths: Any,
                 tenants: Any) -> torch.Tensor:
        noise = torch.randn(rows.shape, dtype=torch.float64)
        return (rows.double() + self.scale * noise).to(rows.dtype)


def test_a_noise_kind_without_a_noise_spec_is_assumed_rounded_once(
        weight: torch.Tensor) -> None:
    target = AuditTarget(weight, {"kind": "gaussian", "sigma": 2.0},
                         lambda sigma, key: UnstatedNoise(sigma), 2.0)
    spec, stated = target.noise_spec()
    assert not stated and spec is not None
    assert (spec.dtype, spec.uniform_bits) == (torch.float64, 53)
    assert spec.scale == pytest.approx(2.0 * matrix_std(weight))
    assert _target(weight, _rotation(weight)).noise_spec() == (None, False)


def test_the_command_line_audits_the_weak_examples_with_chosen_attacks(
        demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("Tell me about France.\nWhat is the capital of Japan?\n")
    assert cli.main(["audit", "--text-file", str(texts), "--prompts", "1", "--weak-examples",
                     "--sweep", "4", "--attacks", "nearest_row,exact_arithmetic,row_norms",
                     "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(p["transform"]["kind"], p["transform"].get("sigma")) for p in printed] == [
        ("none", None), ("f32_gaussian", 4.0), ("f32_keyed", 4.0), ("rotation", None)]
    by_kind = {p["transform"]["kind"]: p for p in printed}
    for kind, attack in (("f32_gaussian", "exact_arithmetic"), ("f32_keyed", "exact_arithmetic"),
                         ("rotation", "row_norms")):
        assert by_kind[kind]["token_recovery"]["worst"] == 1.0
        assert by_kind[kind]["token_recovery"]["worst_attack"] == attack
        assert list(by_kind[kind]["attacks"])[0] == attack
    assert set(by_kind["rotation"]["attacks"]) == {"nearest_row", "row_norms"}
    with pytest.raises(SystemExit):
        cli.main(["audit", "--attacks", "nearest_row,bogus"])


@pytest.mark.parametrize("sigma", [1.0, 2.0, 4.0])
def test_keyed_rows_with_tenants_apart_give_no_attack_more_than_the_nearest_row(
        weight: torch.Tensor, prompts: list[list[int]], sigma: float) -> None:
    """The gateway's keyed noise where clients are told apart: the victim's own tenant
    alone (its API key) reads its rows by chosen prefixes, and the headline counts every
    other attack, none of which reads more than the nearest row."""
    short = [p[:20] for p in prompts[:3]]
    victim = _victim(_target(weight, _gateway_keyed(weight), sigma, KEY), short)
    apart = SuiteOptions(separate_tenants=True, sightings=4)
    results = run_suite(victim, apart)
    assert results["chosen_prefix"].recovered == 1.0
    assert results["chosen_prefix"].details["counted"] is False
    headline = counted(results, apart)
    assert "chosen_prefix" not in headline and "chosen_prefix_other_tenant" in headline
    nearest = results["nearest_row"].recovered
    assert max(result.recovered for result in headline.values()) <= nearest + 0.03
    together = SuiteOptions(sightings=4)  # one tenant: the adversary as a client is in it
    assert "chosen_prefix" in counted(run_suite(victim, together), together)
    assert worst(counted(run_suite(victim, together), together))[1] == 1.0
