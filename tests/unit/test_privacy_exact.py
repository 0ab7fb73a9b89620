"""The exact-arithmetic attack on the demo model: its models of the noise generators are
bit-exact, it reads every token through the reference weak float32 transforms, and it
reads no more than the nearest row through float64 noise rounded once to the wire."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from serve_app.config import TransformConfig
from serve_app.privacy.audit import token_recovery
from serve_app.privacy.exact import ExactOptions, exact_arithmetic
from serve_app.privacy.noise_models import GeneratorModel, torch_cpu_normals, torch_randn_matches
from serve_app.privacy.sample import BUILT_IN_SAMPLE
from serve_app.privacy.weak_transforms import Float32Gaussian, KeyedFloat32Gaussian
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.noise_spec import NoiseSpec
from serve_app.prompts.transforms import (
    GaussianNoise,
    PromptTransform,
    build_keyed_transform,
    matrix_std,
)

KEY = "an exact-arithmetic test key..."
# torch's CPU `randn` runs other code off x86's AVX2 kernel (AVX-512 machines run it too):
# the attack's model of it is that kernel's, bit for bit.
AVX2_KERNEL = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_avx2_kernel = pytest.mark.skipif(
    not AVX2_KERNEL, reason="the model of torch's randn is its x86 AVX2 kernel's")


def _gateway_noise(kind: str, weight: torch.Tensor, sigma: float) -> PromptTransform:
    """The gateway's own noise transform of `kind` at `sigma` (float64, rounded once)."""
    config = TransformConfig(kind=kind, sigma=sigma, key_env="UNUSED_IN_THIS_TEST")
    if kind == "keyed_gaussian":
        return build_keyed_transform(config, weight, KEY)
    return GaussianNoise(sigma * matrix_std(weight), entropy=random.Random(0).randbytes)


@pytest.fixture(scope="module")
def prompts(demo_tokenizer: Any) -> list[list[int]]:
    return [list(demo_tokenizer(text).input_ids) for text in BUILT_IN_SAMPLE]


@pytest.fixture(scope="module")
def truth(prompts: list[list[int]]) -> torch.Tensor:
    return torch.tensor([token for prompt in prompts for token in prompt])


def _sent(weight: torch.Tensor, transform: Any, prompts: list[list[int]]) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.cat(EmbedderCore(weight, transform).rows(prompts))


@needs_avx2_kernel
def test_the_torch_model_is_torch_randn_bit_for_bit() -> None:
    assert torch_randn_matches(samples=1 << 16, seed=3)
    generator = torch.Generator().manual_seed(5)
    uniforms = torch.rand(4096, generator=generator)
    normals = torch.randn(4096, generator=generator.manual_seed(5))
    model = GeneratorModel(NoiseSpec(1.0, torch.float32, 24, "torch_cpu_blocks"))
    k = (uniforms * (1 << 24)).long().view(-1, 16)
    cos, sin = model.cos_sin(k[:, 8:])
    radii = model.radii(k[:, :8])
    assert torch.equal(torch.cat([radii * cos, radii * sin], dim=1).flatten(), normals)
    assert torch.equal(torch_cpu_normals(uniforms.view(-1, 16)).flatten(), normals)


def test_the_adjacent_model_is_the_keyed_float32_noise_bit_for_bit() -> None:
    low, high = (torch.randint(-(1 << 31), 1 << 31, (300, 1), dtype=torch.int32,
                               generator=torch.Generator().manual_seed(seed))
                 for seed in (1, 2))
    noise = KeyedFloat32Gaussian._normals(low, high, 64)
    grid = KeyedFloat32Gaussian.grid(low, high, 64).long()
    model = GeneratorModel(NoiseSpec(1.0, torch.float32, 24, "adjacent_columns"))
    cos, sin = model.cos_sin(grid[:, 1::2])
    radii = model.radii(grid[:, 0::2])
    assert torch.equal(radii * cos, noise[:, 0::2])
    assert torch.equal(radii * sin, noise[:, 1::2])


@needs_avx2_kernel
@pytest.mark.parametrize("sigma", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", [Float32Gaussian, KeyedFloat32Gaussian])
def test_float32_noise_gives_every_token_away(embedder: EmbedderCore, prompts: list[list[int]],
                                              truth: torch.Tensor, kind: Any,
                                              sigma: float) -> None:
    weight = embedder.weight
    scale = sigma * matrix_std(weight)
    transform = Float32Gaussian(scale) if kind is Float32Gaussian else kind(scale, KEY)
    sent = _sent(weight, transform, prompts)
    outcome = exact_arithmetic(sent, truth, weight, transform.noise_spec)
    assert outcome.true_token_consistent == 1.0
    assert outcome.recovered >= 0.998  # at most one row of 574
    assert outcome.checked_pairs > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gaussian", "keyed_gaussian"])
def test_the_gateways_noise_leaves_every_candidate(
        embedder: EmbedderCore, prompts: list[list[int]], truth: torch.Tensor, kind: str,
        dtype: torch.dtype) -> None:
    """The gateway's noise, float64 rounded once to the wire dtype: every candidate token
    stays possible, so exact arithmetic reads no more than the nearest row does."""
    weight = embedder.weight.to(dtype)
    transform = _gateway_noise(kind, weight, 2.0)
    spec = transform.noise_spec  # type: ignore[attr-defined]
    assert (spec.dtype, spec.uniform_bits) == (torch.float64, 53)
    sent = _sent(weight, transform, prompts)
    options = ExactOptions(candidates=16)
    outcome = exact_arithmetic(sent, truth, weight, spec, options)
    nearest = token_recovery(list(sent.split([len(p) for p in prompts])), prompts, weight).l2
    assert outcome.consistent_candidates == options.candidates
    assert outcome.recovered <= nearest + 0.02
    if dtype == torch.float32:
        assert outcome.checked_pairs == 0.0
        # The same bytes read as float32 noise: the test then rules the true token out.
        as_float32 = NoiseSpec(spec.scale, torch.float32, 24, spec.pairing)
        misread = exact_arithmetic(sent, truth, weight, as_float32,
                                   ExactOptions(max_candidates=16))
        assert misread.true_token_consistent < 0.1
