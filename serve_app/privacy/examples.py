"""The reference weak transforms (`weak_transforms`) as audit targets, for
`serve-app-audit --weak-examples`: what the suite shows each weakness costs, on your model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from serve_app.privacy.target import AuditTarget
from serve_app.privacy.weak_transforms import (
    Float32Gaussian,
    KeyedFloat32Gaussian,
    RandomRotation,
)
from serve_app.prompts.transforms import ModuleTransform, PromptTransform, matrix_std

WEAK_MODULE = "serve_app.privacy.weak_transforms:"


def weak_targets(weight: torch.Tensor, sigmas: Sequence[float],
                 seed: int = 0) -> list[AuditTarget]:
    """`none`, float32 gaussian and keyed noise at each sigma (the keyed under a key made
    from `seed`, so a run's figures repeat), and a random rotation as a module."""
    std = matrix_std(weight)

    def gaussian(sigma: float, key: str | None) -> PromptTransform | None:
        return Float32Gaussian(sigma * std)

    def keyed(sigma: float, key: str | None) -> PromptTransform | None:
        assert key is not None
        return KeyedFloat32Gaussian(sigma * std, key)

    def rotation(sigma: float, key: str | None) -> PromptTransform | None:
        module = RandomRotation(weight.shape[1]).to(weight.device, weight.dtype).eval()
        return ModuleTransform(module, token_ids=False)

    def describe(name: str, **extra: Any) -> dict[str, Any]:
        return {"kind": name, "example": WEAK_MODULE + _CLASSES[name], **extra}

    key = f"serve-app-audit weak example key {seed}"
    targets = [AuditTarget(weight, {"kind": "none"}, lambda sigma, key: None)]
    targets += [AuditTarget(weight, describe("f32_gaussian", sigma=sigma), gaussian, sigma)
                for sigma in sigmas]
    targets += [AuditTarget(weight, describe("f32_keyed", sigma=sigma), keyed, sigma, key)
                for sigma in sigmas]
    targets.append(AuditTarget(weight, describe("rotation"), rotation))
    return targets


_CLASSES = {"f32_gaussian": Float32Gaussian.__name__,
            "f32_keyed": KeyedFloat32Gaussian.__name__,
            "rotation": RandomRotation.__name__}
