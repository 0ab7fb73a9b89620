"""Prompt adapters: PEFT's prompt-tuning and P-tuning soft prompts, read from the folders
PEFT's `save_pretrained` writes, checked against the served model.

A soft prompt is a block of virtual-token rows that PEFT puts before every prompt's rows
(before BOS). PEFT saves both kinds as that block, the tensor `prompt_embeddings`: for
P-tuning it is the prompt encoder's output for the virtual tokens, which is what a
`PeftModel` loaded for inference uses, so the gateway needs neither peft nor the encoder.
Every refusal names the adapter and its reason. `reload_prompt_adapters` applies a changed
list (a `user_config`): unchanged adapters are kept as loaded, new ones read, removed ones
dropped, and a refused one leaves the loaded set as it is.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from serve_app.config import AdapterConfig
from serve_app.prompts.checkpoint import ModelSpec
from serve_app.prompts.transforms import client_row_contents
from serve_app.prompts.untrusted import _LOAD_LOCK

SUPPORTED_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")
CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
TENSOR_NAME = "prompt_embeddings"

# The folder's files are read whole: bounded, so a wrong path cannot fill the memory.
_MAX_CONFIG_BYTES = 1 << 20
_FILE_OVERHEAD_BYTES = 1 << 20


class AdapterError(ValueError):
    """An adapter the gateway refuses to serve; the message names it."""

    def __init__(self, adapter: AdapterConfig, reason: str) -> None:
        super().__init__(f"model.adapters: adapter {adapter.name!r} ({adapter.path}): {reason}")


@dataclass(frozen=True)
class PromptAdapter:
    """A loaded soft prompt: its virtual tokens' rows, in the model's dtype, on the device
    it is used on."""

    name: str
    peft_type: str
    rows: torch.Tensor
    contents: tuple[int, ...]
    """Each row's stand-in for a token id (`transforms.client_row_contents`, as client
    rows have): a keyed transform's prefix and the routing key cover the adapter's rows."""
    path: str = ""
    """The folder it was read from (`AdapterConfig.path`): a reload keeps it while this
    stays the same."""

    @property
    def virtual_tokens(self) -> int:
        return int(self.rows.shape[0])


def load_prompt_adapter(adapter: AdapterConfig, spec: ModelSpec,
                        device: str | torch.device = "cpu") -> PromptAdapter:
    """The adapter at `adapter.path`, checked against the served model, or `AdapterError`."""
    folder = Path(adapter.path).expanduser()
    if not folder.is_dir():
        raise AdapterError(adapter, "no such folder")
    settings = _read_settings(adapter, folder / CONFIG_FILE)
    peft_type = settings.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise AdapterError(adapter, f"peft_type {peft_type!r} is not served; only "
                                    f"{' and '.join(SUPPORTED_PEFT_TYPES)} are")
    virtual = _virtual_tokens(adapter, settings, spec)
    token_dim = settings.get("token_dim")
    if token_dim != spec.hidden_size:
        raise AdapterError(adapter, f"token_dim is {token_dim}; the model's hidden size is "
                                    f"{spec.hidden_size}")
    tensor = _read_tensor(adapter, folder, max_bytes=virtual * spec.hidden_size * 8)
    if tuple(tensor.shape) != (virtual, spec.hidden_size):
        raise AdapterError(adapter, f"{TENSOR_NAME} has shape {tuple(tensor.shape)}; "
                                    f"adapter_config.json says ({virtual}, {spec.hidden_size})")
    rows = tensor.to(device=device, dtype=spec.dtype, copy=True,
                     memory_format=torch.contiguous_format)
    if not bool(torch.isfinite(rows).all()):
        raise AdapterError(adapter, f"{TENSOR_NAME} holds NaN or infinite values in "
                                    f"{spec.dtype}")
    return PromptAdapter(adapter.name, peft_type, rows, tuple(client_row_contents(rows)),
                         adapter.path)


def load_prompt_adapters(adapters: list[AdapterConfig], spec: ModelSpec,
                         device: str | torch.device = "cpu") -> dict[str, PromptAdapter]:
    """Every configured adapter by name; the first refused stops the start."""
    return {adapter.name: load_prompt_adapter(adapter, spec, device) for adapter in adapters}


def reload_prompt_adapters(loaded: Mapping[str, PromptAdapter], wanted: list[AdapterConfig],
                           spec: ModelSpec, device: str | torch.device = "cpu",
                           ) -> dict[str, PromptAdapter]:
    """The `wanted` adapters by name: those `loaded` under the same name and folder as they
    are (their files are not read again), the others read from their folders. The first
    refused raises `AdapterError`, and `loaded` is left as it was."""
    names = [adapter.name for adapter in wanted]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"model.adapters: adapter names must be unique: {', '.join(repeated)}")
    reloaded: dict[str, PromptAdapter] = {}
    for adapter in wanted:
        kept = loaded.get(adapter.name)
        reloaded[adapter.name] = (kept if kept is not None and kept.path == adapter.path
                                  else load_prompt_adapter(adapter, spec, device))
    return reloaded


def _read_settings(adapter: AdapterConfig, path: Path) -> dict[str, object]:
    if not path.is_file():
        raise AdapterError(adapter, f"no {CONFIG_FILE}")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise AdapterError(adapter, f"{CONFIG_FILE} is over {_MAX_CONFIG_BYTES} bytes")
    try:
        settings = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(adapter, f"{CONFIG_FILE} is not JSON ({exc})") from None
    if not isinstance(settings, dict):
        raise AdapterError(adapter, f"{CONFIG_FILE} is not a JSON object")
    return settings


def _virtual_tokens(adapter: AdapterConfig, settings: dict[str, object],
                    spec: ModelSpec) -> int:
    """The soft prompt's rows: at least one, and room left in the context for a prompt."""
    virtual = settings.get("num_virtual_tokens")
    if not isinstance(virtual, int) or isinstance(virtual, bool) or virtual < 1:
        raise AdapterError(adapter, f"num_virtual_tokens is {virtual!r}; a positive count "
                                    "is needed")
    if virtual >= spec.max_model_len:
        raise AdapterError(adapter, f"{virtual} virtual tokens leave no room in the model's "
                                    f"context of {spec.max_model_len} tokens")
    return virtual


def _read_tensor(adapter: AdapterConfig, folder: Path, max_bytes: int) -> torch.Tensor:
    """`prompt_embeddings` from the safetensors file, else from the `.bin` through torch's
    weights-only loader: a pickle that builds any other object is refused."""
    safetensors, pickled = folder / SAFETENSORS_FILE, folder / PICKLE_FILE
    path = safetensors if safetensors.is_file() else pickled
    if not path.is_file():
        raise AdapterError(adapter, f"no {SAFETENSORS_FILE} or {PICKLE_FILE}")
    if path.stat().st_size > max_bytes + _FILE_OVERHEAD_BYTES:
        raise AdapterError(adapter, f"{path.name} is larger than its virtual tokens need")
    raw = path.read_bytes()
    loaded = _load_safetensors(adapter, raw) if path == safetensors else _load_pickle(
        adapter, raw)
    if not isinstance(loaded, dict) or not isinstance(loaded.get(TENSOR_NAME), torch.Tensor):
        raise AdapterError(adapter, f"{path.name} holds no {TENSOR_NAME} tensor")
    tensor: torch.Tensor = loaded[TENSOR_NAME]
    if tensor.layout != torch.strided or not tensor.is_floating_point():
        raise AdapterError(adapter, f"{TENSOR_NAME} must be a dense floating-point tensor, "
                                    f"not {tensor.layout} {tensor.dtype}")
    return tensor.detach()


def _load_safetensors(adapter: AdapterConfig, raw: bytes) -> object:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(raw)
    except (SafetensorError, ValueError) as exc:
        raise AdapterError(adapter, f"{SAFETENSORS_FILE} is unreadable ({exc})") from None


def _load_pickle(adapter: AdapterConfig, raw: bytes) -> object:
    # The lock and the sparse checks are those of the client-tensor decode: torch.load's
    # unpickler and the invariant checks are process-wide state.
    try:
        with _LOAD_LOCK, torch.sparse.check_sparse_tensor_invariants():
            return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # weights_only refuses anything but tensors and containers
        raise AdapterError(adapter, f"{PICKLE_FILE} is not a weights-only torch.save file "
                                    f"({type(exc).__name__}); resave it with PEFT's "
                                    "save_pretrained (safetensors)") from None
