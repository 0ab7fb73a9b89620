"""Prompt transforms: what the Embedder does to the looked-up rows, on their device and
for the whole batch at once, before they are encoded for the upstream.

Raw rows are rows of the model's input-embedding matrix, so an upstream holding the weights
reads the prompt back by a nearest-row lookup; a transform trades some of that away against
answer quality, and `serve_app.privacy` measures both. The kinds (`TransformConfig.kind`):
- `none`: the rows as they are;
- `gaussian`: fresh noise per request, `sigma` times the matrix's standard deviation;
- `keyed_gaussian`: the same noise from a seed per row that a secret key, the transform's
  parameters, the prompt's tenant and the prefix fix (`keyed_noise`), so identical prefixes
  of one tenant give byte-identical rows;
- `module`: an operator's torch module, with safetensors weights.
Both noise kinds make their noise in float64 and round the noisy rows once (`normals`).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from serve_app import envs
from serve_app.config import TransformConfig
from serve_app.prompts.keyed_noise import KeyedSeeds, SeedBinding
from serve_app.prompts.noise_spec import NoiseSpec
from serve_app.prompts.normals import add_noise
from serve_app.prompts.tenants import SHARED_TENANT

logger = logging.getLogger(__name__)

INVERTIBLE_WARNING = (
    "privacy.transform is none: the prompt embeddings sent upstream are rows of the model's "
    "input-embedding matrix, and anyone with the model's weights recovers the prompt from "
    "them. Choose a transform and measure it with `serve-app-audit` (docs/privacy.md)."
)


class PromptTransform(Protocol):
    """Maps a batch's rows `(rows, hidden)` to new rows of the same shape, dtype and device.

    `content` (int64, on the rows' device) holds each row's token id, or a negative digest
    for a client row, so a transform may depend on the prefix; `lengths` are the prompts'
    row counts, in order, and `tenants` the prompts' tenants (`prompts.tenants`), in the
    same order.
    """

    def __call__(self, rows: torch.Tensor, content: torch.Tensor, lengths: Sequence[int],
                 tenants: Sequence[str]) -> torch.Tensor:
        ...


def stream_noise(scale: float) -> NoiseSpec:
    """Both noise kinds' generator (`normals`): float64 from 53-bit uniforms in adjacent
    pairs, the sum rounded once to the wire dtype."""
    return NoiseSpec(scale, torch.float64, 53, "adjacent_columns")


def client_row_contents(tensor: torch.Tensor) -> list[int]:
    """Client rows' stand-ins for token ids: a negative digest of each row's bytes, so a
    keyed transform's prefix covers client rows too."""
    raw = tensor.detach().contiguous().cpu().view(torch.uint8).numpy()
    return [-1 - int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=7).digest(),
                                "little") for row in raw]


class GaussianNoise:
    """Fresh noise for every call: each row's seed is 64 bits from `entropy`
    (`secrets.token_bytes`: the operating system's generator; never torch's, whose CPU
    generator keeps 32 bits of its seed)."""

    def __init__(self, scale: float,
                 entropy: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.scale = scale
        self.entropy = entropy
        self.noise_spec = stream_noise(scale)

    def __call__(self, rows: torch.Tensor, content: torch.Tensor, lengths: Sequence[int],
                 tenants: Sequence[str]) -> torch.Tensor:
        fresh = bytearray(self.entropy(8 * rows.shape[0]))
        seeds = torch.frombuffer(fresh, dtype=torch.int64).to(rows.device, non_blocking=True)
        return add_noise(rows, seeds, self.scale)


class KeyedGaussianNoise:
    """Noise that the key, the parameters, the tenant and each row's prefix fix: the same
    tenant and prefix, the same rows."""

    def __init__(self, scale: float, seeds: KeyedSeeds) -> None:
        self.scale = scale
        self.seeds = seeds
        self.noise_spec = stream_noise(scale)

    def __call__(self, rows: torch.Tensor, content: torch.Tensor, lengths: Sequence[int],
                 tenants: Sequence[str]) -> torch.Tensor:
        return add_noise(rows, self.seeds.seeds(content, lengths, tenants), self.scale)


class ModuleTransform:
    """An operator's `torch.nn.Module`, checked to keep shape, dtype and device."""

    def __init__(self, module: torch.nn.Module, token_ids: bool) -> None:
        self.module = module
        self.token_ids = token_ids

    def __call__(self, rows: torch.Tensor, content: torch.Tensor, lengths: Sequence[int],
                 tenants: Sequence[str]) -> torch.Tensor:
        with torch.inference_mode():
            out = self.module(rows, content.clamp(min=-1)) if self.token_ids else self.module(rows)
        if not isinstance(out, torch.Tensor) or (out.shape, out.dtype, out.device) != (
                rows.shape, rows.dtype, rows.device):
            raise RuntimeError("the privacy.transform module must return a tensor of its "
                               "input's shape, dtype and device")
        return out


def _import_class(path: str) -> type[torch.nn.Module]:
    module_name, _, name = path.partition(":")
    if not name:
        raise ValueError("privacy.transform.module must be `package.module:Class`")
    found = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise ValueError(f"privacy.transform.module {path!r} is not a torch.nn.Module class")
    return found


def load_safetensors_state(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file; anything else (a pickle above all) is refused
    without being read as one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.endswith(".safetensors"):
        raise ValueError("privacy.transform.module_weights must be a .safetensors file")
    try:
        return load_file(str(Path(path).expanduser()))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"privacy.transform.module_weights is not a readable safetensors "
                         f"file ({type(exc).__name__})") from None


def _build_module(config: TransformConfig, weight: torch.Tensor) -> ModuleTransform:
    assert config.module is not None  # the config's validator requires it
    module = _import_class(config.module)(**config.module_args)
    if config.module_weights:
        module.load_state_dict(load_safetensors_state(config.module_weights), strict=True)
    module = module.to(device=weight.device, dtype=weight.dtype).eval()
    transform = ModuleTransform(module, config.module_token_ids)
    # The contract, checked before the first request.
    transform(weight[:2].clone(), torch.arange(2, device=weight.device), [2], [SHARED_TENANT])
    return transform


def matrix_std(weight: torch.Tensor, rows_per_chunk: int = 8192) -> float:
    """The matrix's standard deviation (unbiased, as `torch.std`), read in chunks of rows:
    a float32 copy of a whole Llama-3.1-8B matrix would be 2 GiB more on its device."""
    total = squares = torch.zeros((), dtype=torch.float64, device=weight.device)
    for chunk in weight.split(rows_per_chunk):
        values = chunk.float()
        total = total + values.sum(dtype=torch.float64)
        squares = squares + values.square().sum(dtype=torch.float64)
    count = weight.numel()
    return float(((squares - total * total / count) / (count - 1)).sqrt())


def matrix_digest(weight: torch.Tensor, rows_per_chunk: int = 8192) -> str:
    """The model's identity for keyed seeds: blake2b of the matrix's shape, dtype and bytes
    as the Embedder holds them, read in chunks of rows (a GPU matrix through the host).

    A digest of the weights, not of the model's name or path, so a gateway and a
    client-side encoder that load the same checkpoint from two places agree, and new
    weights under an old name do not reuse its rows. About a second per GiB, once."""
    digest = hashlib.blake2b(digest_size=16, person=b"serveapp.model")
    digest.update(f"{tuple(weight.shape)} {weight.dtype}".encode())
    for chunk in weight.split(rows_per_chunk):
        digest.update(chunk.contiguous().cpu().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _noise_scale(config: TransformConfig, weight: torch.Tensor) -> float:
    return config.sigma * matrix_std(weight)


def build_keyed_transform(config: TransformConfig, weight: torch.Tensor,
                          key: str) -> KeyedGaussianNoise:
    """The keyed transform of `config` for this matrix under `key`: the gateway's, when
    `key` is the one its `key_env` holds."""
    binding = SeedBinding(sigma=config.sigma, dtype=weight.dtype, model=matrix_digest(weight))
    transform = KeyedGaussianNoise(_noise_scale(config, weight), KeyedSeeds(key, binding))
    # On CUDA the first calls compile the seed and noise kernels: here, not in a request.
    # torch.compile specializes sizes of one, so a batch of one row and one prompt gets
    # kernels of its own, and any larger batch the dynamic ones.
    for lengths in ([1], [2, 3]):
        rows = sum(lengths)
        transform(weight[:rows], torch.arange(rows, device=weight.device), lengths,
                  [SHARED_TENANT] * len(lengths))
    return transform


def build_transform(config: TransformConfig, weight: torch.Tensor) -> PromptTransform | None:
    """The configured transform for this embedding matrix; None for `none`."""
    if config.kind == "none":
        return None
    if config.kind == "module":
        return _build_module(config, weight)
    if config.kind == "gaussian":
        transform = GaussianNoise(_noise_scale(config, weight))
        transform(weight[:2], torch.arange(2, device=weight.device), [2], [SHARED_TENANT])
        return transform
    if config.kind == "keyed_gaussian":
        key = envs.secret(config.key_env)
        if key is None:
            raise ValueError(f"keyed_gaussian: the environment variable {config.key_env} "
                             f"(privacy.transform.key_env) is not set")
        return build_keyed_transform(config, weight, key)
    raise ValueError(f"unknown privacy.transform.kind: {config.kind}")


def describe(config: TransformConfig) -> dict[str, Any]:
    """The transform and its parameters, for `/health/privacy` (behind the key), the
    start-up log and the audit: never the key, nor where it lives."""
    described: dict[str, Any] = {"kind": config.kind}
    if config.kind in ("gaussian", "keyed_gaussian"):
        described["sigma"] = config.sigma
    if config.kind == "module":
        described |= {"module": config.module, "token_ids": config.module_token_ids,
                      "weights": Path(config.module_weights).name
                      if config.module_weights else None}
    described["apply_to_client_embeds"] = config.apply_to_client_embeds
    return described


def log_transform(config: TransformConfig, log: logging.Logger = logger) -> None:
    """The start-up line: which transform runs, or the warning that none does."""
    if config.kind == "none":
        log.warning(INVERTIBLE_WARNING)
    else:
        log.info("privacy.transform: %s", describe(config))
