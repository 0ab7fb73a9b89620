"""Finding a model's files and reading what the gateway needs from them.

The gateway never instantiates the whole LLM: it reads the tokenizer, `config.json`, and
the one input-embedding tensor straight out of the safetensors files.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from serve_app import envs
from serve_app.config import DEMO_MODEL, ModelConfig
from serve_app.prompts.untrusted import EmbedsSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Weights formats we never need to download: the loader reads safetensors only.
_HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "original/*"]


@dataclass(frozen=True)
class ModelSpec:
    """The facts about a checkpoint that requests are validated against."""

    hidden_size: int
    vocab_size: int
    max_model_len: int
    dtype: torch.dtype

    def embeds_spec(self, max_bytes: int | None = None) -> EmbedsSpec:
        """What client prompt embeds must look like for this model.

        By default one tensor may be as large as the full context in float32.
        """
        return EmbedsSpec(
            hidden_size=self.hidden_size,
            max_rows=self.max_model_len,
            max_bytes=max_bytes or self.max_model_len * self.hidden_size * 4,
            dtype=self.dtype,
        )


def resolve_model_dir(config: ModelConfig, weights: bool = True) -> Path:
    """A local directory holding the checkpoint: built (demo), given, or downloaded.

    `weights=False` is for the ingress, which reads only the tokenizer and `config.json`:
    a hub download then skips the weight files (16 GB for an 8B model).
    """
    if config.source == DEMO_MODEL:
        from serve_app.demo.model import ensure_demo_model

        path = ensure_demo_model(envs.cache_dir())
        logger.warning("demo model at %s", path)
        return path
    return local_or_hub(config.source, config.revision, weights)


def local_or_hub(source: str, revision: str | None, weights: bool = True) -> Path:
    """`source` as a local directory, else a hub snapshot (safetensors and configs only;
    configs and tokenizer only without `weights`)."""
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    ignore = _HUB_IGNORE if weights else [*_HUB_IGNORE, "*.safetensors"]
    return Path(snapshot_download(source, revision=revision, ignore_patterns=ignore))


def _text_config(model_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    # Multimodal checkpoints nest the language model's settings.
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def read_model_spec(model_dir: Path, config: ModelConfig) -> ModelSpec:
    raw = _text_config(model_dir)
    context = config.max_model_len or raw.get("max_position_embeddings") or raw.get("n_positions")
    if not context:
        raise ValueError(
            f"{model_dir}/config.json names no context length; set model.max_model_len"
        )
    declared = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    dtype_name = declared if config.dtype == "auto" else config.dtype
    if dtype_name not in _DTYPES:
        raise ValueError(f"unsupported checkpoint dtype {dtype_name!r}; set model.dtype")
    return ModelSpec(
        hidden_size=int(raw["hidden_size"]),
        vocab_size=int(raw["vocab_size"]),
        max_model_len=int(context),
        dtype=_DTYPES[dtype_name],
    )


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


INLINE_TOKENIZE_CHARS = 8192
"""Tokenize on the event loop up to this many characters; above, in a worker thread."""


async def tokenize_off_loop_if_large(chars: int, tokenize: Callable[..., T], *args: Any) -> T:
    """`tokenize(*args)`: inline when short (a thread hop costs more), else in a thread."""
    if chars <= INLINE_TOKENIZE_CHARS:
        return tokenize(*args)
    return await asyncio.to_thread(tokenize, *args)


def _embedding_parameter_name(model_dir: Path) -> tuple[str, bool]:
    """Name of the input-embedding weight, found on a weightless (meta) copy of the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    weight = model.get_input_embeddings().weight
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if parameter is weight:
            return name, tied
    raise ValueError(f"cannot locate the input embedding weight of {model_dir}")


def _safetensors_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    return files


def _pick_checkpoint_key(name: str, tied: bool, available: dict[str, Path]) -> str:
    if name in available:
        return name
    # Checkpoints may prefix or rename the module path (e.g. `language_model.`): match the tail.
    tail = ".".join(name.split(".")[-2:])
    candidates = sorted(key for key in available if key.endswith(tail))
    if len(candidates) == 1:
        return candidates[0]
    if tied and "lm_head.weight" in available:
        return "lm_head.weight"
    raise KeyError(f"input embedding weight {name!r} not found in the checkpoint")


def load_input_embeddings(
    model_dir: Path, dtype: torch.dtype | None = None, device: str = "cpu"
) -> torch.Tensor:
    """The `(vocab, hidden)` input-embedding matrix, read alone from the safetensors files.

    `dtype` None keeps the stored dtype.
    """
    from safetensors import safe_open

    name, tied = _embedding_parameter_name(model_dir)
    files = _safetensors_files(model_dir)
    key = _pick_checkpoint_key(name, tied, files)
    with safe_open(str(files[key]), framework="pt", device="cpu") as handle:
        weight = handle.get_tensor(key)
    return weight.to(device=device, dtype=dtype or weight.dtype)


def select_device(preference: str) -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        logger.warning("model.device is cuda but no CUDA device is visible; using the CPU")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"
