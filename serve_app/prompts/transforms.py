"""Prompt transforms: what the Embedder does to the looked-up rows, on their device and
for the whole batch at once, before they are encoded for the upstream.

Raw rows are rows of the model's input-embedding matrix, so an upstream holding the weights
reads the prompt back by a nearest-row lookup; a transform trades some of that away against
answer quality, and `serve_app.privacy` measures both. The kinds (`TransformConfig.kind`):
- `none`: the rows as they are;
- `gaussian`: fresh noise per request, `sigma` times the matrix's standard deviation;
- `keyed_gaussian`: the same noise drawn from a seed per row that a secret key and the
  prefix fix (`keyed_noise`), so identical prefixes give byte-identical rows;
- `module`: an operator's torch module, with safetensors weights.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from serve_app import envs
from serve_app.config import TransformConfig
from serve_app.prompts.keyed_noise import KeyedSeeds, standard_normals

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
    row counts, in order.
    """

    def __call__(self, rows: torch.Tensor, content: torch.Tensor,
                 lengths: Sequence[int]) -> torch.Tensor:
        ...


def client_row_contents(tensor: torch.Tensor) -> list[int]:
    """Client rows' stand-ins for token ids: a negative digest of each row's bytes, so a
    keyed transform's prefix covers client rows too."""
    raw = tensor.detach().contiguous().cpu().view(torch.uint8).numpy()
    return [-1 - int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=7).digest(),
                                "little") for row in raw]


class GaussianNoise:
    """Fresh noise for every call, from torch's generator on the rows' device."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, rows: torch.Tensor, content: torch.Tensor,
                 lengths: Sequence[int]) -> torch.Tensor:
        noise = torch.randn(rows.shape, dtype=torch.float32, device=rows.device)
        return (rows.float() + self.scale * noise).to(rows.dtype)


class KeyedGaussianNoise:
    """Noise that the key and each row's prefix fix: the same prefix, the same rows."""

    def __init__(self, scale: float, seeds: KeyedSeeds) -> None:
        self.scale = scale
        self.seeds = seeds

    def __call__(self, rows: torch.Tensor, content: torch.Tensor,
                 lengths: Sequence[int]) -> torch.Tensor:
        low, high = self.seeds.seeds(content, lengths)
        noise = standard_normals(low, high, rows.shape[1])
        return (rows.float() + self.scale * noise).to(rows.dtype)


class ModuleTransform:
    """An operator's `torch.nn.Module`, checked to keep shape, dtype and device."""

    def __init__(self, module: torch.nn.Module, token_ids: bool) -> None:
        self.module = module
        self.token_ids = token_ids

    def __call__(self, rows: torch.Tensor, content: torch.Tensor,
                 lengths: Sequence[int]) -> torch.Tensor:
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
    transform(weight[:2].clone(), torch.arange(2, device=weight.device), [2])
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


def build_transform(config: TransformConfig, weight: torch.Tensor) -> PromptTransform | None:
    """The configured transform for this embedding matrix; None for `none`."""
    if config.kind == "none":
        return None
    if config.kind == "module":
        return _build_module(config, weight)
    scale = config.sigma * matrix_std(weight)
    if config.kind == "gaussian":
        return GaussianNoise(scale)
    if config.kind == "keyed_gaussian":
        key = envs.secret(config.key_env)
        if key is None:
            raise ValueError(f"keyed_gaussian: the environment variable {config.key_env} "
                             f"(privacy.transform.key_env) is not set")
        transform = KeyedGaussianNoise(scale, KeyedSeeds(key))
        # On CUDA the first call compiles the noise kernel: here, not in a request.
        transform(weight[:2], torch.arange(2, device=weight.device), [2])
        return transform
    raise ValueError(f"unknown privacy.transform.kind: {config.kind}")


def describe(config: TransformConfig) -> dict[str, Any]:
    """The transform and its parameters, for `/health` and the start-up log: never the key,
    nor where it lives."""
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
