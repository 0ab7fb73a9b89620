"""The transform under audit as its adversary reaches it: the rows a victim's prompts are
sent as, the rows of prompts the adversary sends itself as a client of the gateway (in the
victim's tenant or in another), the same transform retuned to another sigma under the same
key, and the noise generator it states (`NoiseSpec`).

Every row comes from `EmbedderCore.rows`, the Embedder's own path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.noise_spec import NoiseSpec
from serve_app.prompts.tenants import api_key_tenant
from serve_app.prompts.transforms import PromptTransform, matrix_std

TransformFactory = Callable[[float, str | None], PromptTransform | None]
"""Builds the audited kind at a sigma under a key (kinds without them ignore them)."""

NOISE_KINDS = ("gaussian", "keyed_gaussian")

VICTIM_TENANT = api_key_tenant("serve-app-audit victim")
"""The victim's tenant; the adversary sends as a client in it or in `ADVERSARY_TENANT`."""
ADVERSARY_TENANT = api_key_tenant("serve-app-audit adversary")


@dataclass
class AuditTarget:
    """One transform of one kind, sigma and key on one embedding matrix.

    `description` is what the audit prints for it (never the key); `build` makes the same
    kind again at another sigma or under another key."""

    weight: torch.Tensor
    description: dict[str, Any]
    build: TransformFactory
    sigma: float | None = None
    key: str | None = field(default=None, repr=False)
    apply_to_client_embeds: bool = False
    transform: PromptTransform | None = field(init=False)
    host_weight: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.transform = self.build(self.sigma or 0.0, self.key)
        # The attacks read the matrix on the CPU, where the rows sent arrive.
        self.host_weight = self.weight.detach().cpu()

    @property
    def kind(self) -> str:
        return str(self.description["kind"])

    def rows(self, prompts: Sequence[Sequence[int]],
             tenant: str = VICTIM_TENANT) -> list[torch.Tensor]:
        """The rows the gateway sends upstream for `prompts` of one tenant, one batch."""
        return EmbedderCore(self.weight, self.transform, self.apply_to_client_embeds).rows(
            prompts, [tenant] * len(prompts))

    def retuned(self, sigma: float) -> AuditTarget:
        """The same kind under the same key at another sigma."""
        return AuditTarget(self.weight, {**self.description, "sigma": sigma}, self.build,
                           sigma, self.key, self.apply_to_client_embeds)

    def deterministic(self, prompts: Sequence[Sequence[int]]) -> bool:
        """Whether sending the same prompts twice gives the same bytes."""
        first, second = self.rows(prompts), self.rows(prompts)
        return all(same_bytes(a, b) for a, b in zip(first, second, strict=True))

    def noise_spec(self) -> tuple[NoiseSpec | None, bool]:
        """The generator the transform states, and whether it stated one: a noise kind that
        states none is taken as float64 normals rounded once (53-bit uniforms)."""
        stated = getattr(self.transform, "noise_spec", None)
        if isinstance(stated, NoiseSpec):
            return stated, True
        if self.kind in NOISE_KINDS and self.sigma is not None:
            scale = self.sigma * matrix_std(self.weight)
            return NoiseSpec(scale, torch.float64, 53, "adjacent_columns"), False
        return None, False


def tenant_rows(target: AuditTarget, prompts: Sequence[Sequence[int]],
                same_tenant: bool) -> list[torch.Tensor]:
    """The rows of prompts an adversary sends as a client of the gateway, in the victim's
    tenant or in another: the same transform and key, the tenant the gateway gives it."""
    return target.rows(prompts, VICTIM_TENANT if same_tenant else ADVERSARY_TENANT)


_BITS_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(values: torch.Tensor) -> torch.Tensor:
    """A float tensor's bytes as integers of its width, to compare bit for bit (float
    comparison calls -0.0 and 0.0 equal)."""
    return values.contiguous().view(_BITS_VIEW[values.element_size()])


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bits(a), as_bits(b))
