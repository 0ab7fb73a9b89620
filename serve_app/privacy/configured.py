"""The gateway's configured transform as an audit target: built by the gateway's own
`build_transform`, a keyed kind with the configured key (or an ephemeral one), the sweep's
configs, and the checks of what a keyed transform promises.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from serve_app import envs
from serve_app.config import TransformConfig
from serve_app.privacy.target import NOISE_KINDS, AuditTarget
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.transforms import (
    GaussianNoise,
    KeyedGaussianNoise,
    PromptTransform,
    build_keyed_transform,
    build_transform,
    describe,
)


@dataclass(frozen=True)
class TransformKey:
    """The `keyed_gaussian` key: the configured one, or a random one for this run alone when
    its variable is unset. Never printed."""

    value: str = field(repr=False)
    ephemeral: bool

    @classmethod
    def for_config(cls, config: TransformConfig) -> TransformKey:
        configured = envs.secret(config.key_env)
        if configured is not None:
            return cls(configured, ephemeral=False)
        return cls(secrets.token_urlsafe(32), ephemeral=True)


def keyed_transform(config: TransformConfig, weight: torch.Tensor,
                    key: str) -> KeyedGaussianNoise:
    """The gateway's keyed transform of `config`, with `key` in place of the configured
    variable."""
    return build_keyed_transform(config, weight, key)


def seeded_gaussian(config: TransformConfig, weight: torch.Tensor,
                    seed: int) -> GaussianNoise:
    """The gateway's `gaussian` transform with its fresh seeds drawn from `seed`, so an
    audit's figures repeat (the gateway draws them from the operating system)."""
    built = build_transform(config, weight)
    assert isinstance(built, GaussianNoise)
    return GaussianNoise(built.scale, entropy=random.Random(seed).randbytes)


def audited_transform(config: TransformConfig, weight: torch.Tensor,
                      key: TransformKey | None, seed: int = 0) -> PromptTransform | None:
    """The transform the Embedder would build; a keyed one takes `key`, which may be
    ephemeral, and `gaussian` draws its seeds from `seed`."""
    if config.kind == "keyed_gaussian":
        assert key is not None
        return keyed_transform(config, weight, key.value)
    if config.kind == "gaussian":
        return seeded_gaussian(config, weight, seed)
    return build_transform(config, weight)


def config_target(config: TransformConfig, weight: torch.Tensor,
                  key: TransformKey | None, seed: int = 0) -> AuditTarget:
    """The configured transform as the adversary reaches it; `key` for a keyed kind, `seed`
    for `gaussian`'s fresh seeds."""

    def build(sigma: float, key_value: str | None) -> PromptTransform | None:
        at = config.model_copy(update={"sigma": sigma}) if config.kind in NOISE_KINDS else config
        if config.kind == "keyed_gaussian":
            assert key_value is not None
            return keyed_transform(at, weight, key_value)
        if config.kind == "gaussian":
            return seeded_gaussian(at, weight, seed)
        return build_transform(at, weight)

    return AuditTarget(weight, describe(config), build,
                       sigma=config.sigma if config.kind in NOISE_KINDS else None,
                       key=key.value if key is not None else None,
                       apply_to_client_embeds=config.apply_to_client_embeds)


@dataclass(frozen=True)
class KeyedChecks:
    """`keyed_gaussian`'s promises, checked: two prompts sharing a prefix get identical rows
    for it, and one prompt under two keys gets a different row at every position."""

    key: Literal["environment", "ephemeral"]
    identical_prefixes_identical_rows: bool
    different_keys_different_rows: bool


def keyed_checks(config: TransformConfig, weight: torch.Tensor, key: TransformKey,
                 prompts: Sequence[Sequence[int]]) -> KeyedChecks:
    """Checks the keyed transform's promises on the sample's first prompts, each prompt in a
    request of its own as a client would send them."""
    first = list(prompts[0])
    shared = max(1, len(first) // 2)
    other = list(prompts[1]) if len(prompts) > 1 else first[::-1]
    branching = first[:shared] + other  # shares only the first `shared` positions
    core = EmbedderCore(weight, keyed_transform(config, weight, key.value))
    [rows], [branched] = core.rows([first]), core.rows([branching])
    other_key = EmbedderCore(weight, keyed_transform(config, weight, secrets.token_urlsafe(32)))
    [rekeyed] = other_key.rows([first])
    return KeyedChecks(
        key="ephemeral" if key.ephemeral else "environment",
        identical_prefixes_identical_rows=torch.equal(rows[:shared], branched[:shared]),
        different_keys_different_rows=bool((rows != rekeyed).any(dim=1).all()),
    )


def sweep_configs(config: TransformConfig, sigmas: Sequence[float]) -> list[TransformConfig]:
    """The configured noise kind at each sigma; `gaussian` when the configured kind has no
    sigma (`none`, `module`)."""
    kind = config.kind if config.kind in NOISE_KINDS else "gaussian"
    base = config.model_dump()
    return [TransformConfig.model_validate({**base, "kind": kind, "sigma": sigma})
            for sigma in sigmas]
