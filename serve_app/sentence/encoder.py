"""EncoderCore: token ids -> encoder forward -> pooled sentence embeddings.

Pooling follows the checkpoint's sentence-transformers files when present (`modules.json`,
the Pooling module's config, a Normalize module), else the config's choice. The vectors
come back pooled, not normalised: whether to normalise is a per-request choice (vLLM's
`use_activation`), made after Matryoshka truncation by the service, where `spec.normalize`
is the default that makes vectors equal `SentenceTransformer(path).encode(...)`. Plain
Python (no Ray): the Serve deployment in `deployments.py` batches calls into it by token
budget.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from serve_app import envs
from serve_app.config import DEMO_ENCODER, EmbeddingModelConfig
from serve_app.prompts.checkpoint import local_or_hub, select_device

Pooling = Literal["mean", "cls", "last"]

_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"
# Classic 1_Pooling/config.json flags, and the newer single `pooling_mode` names.
_POOLING_FLAGS: dict[str, Pooling] = {
    "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}
_POOLING_NAMES: dict[str, Pooling] = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
_UNREASONABLE_MAX_LENGTH = 1_000_000  # tokenizers without a limit report ~1e30


def resolve_encoder_dir(config: EmbeddingModelConfig) -> Path:
    if config.source == DEMO_ENCODER:
        from serve_app.demo.encoder import ensure_demo_encoder

        return ensure_demo_encoder(envs.cache_dir())
    return local_or_hub(config.source, config.revision)


@dataclass(frozen=True)
class SentenceSpec:
    """What requests to one embedding model are validated and shaped against."""

    hidden_size: int
    max_seq_length: int
    pooling: Pooling
    normalize: bool
    prompts: dict[str, str]
    default_prompt_name: str | None
    matryoshka_dimensions: tuple[int, ...] | None
    """None: not a Matryoshka model. Empty: any size up to `hidden_size`."""

    def prompt(self, name: str | None) -> str:
        chosen = name or self.default_prompt_name
        return self.prompts.get(chosen, "") if chosen else ""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _st_modules(model_dir: Path) -> tuple[Pooling | None, bool | None]:
    """Pooling and normalisation from sentence-transformers files; (None, None) without them."""
    modules = _read_json(model_dir / "modules.json")
    if not modules:
        return None, None
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
    unsupported = sorted(set(kinds) - {_TRANSFORMER, _POOLING, _NORMALIZE})
    if unsupported:  # Dense, LayerNorm, ...: refuse rather than serve different vectors
        raise ValueError(f"sentence-transformers module {unsupported[0]!r} is not supported")
    pooling: Pooling | None = None
    if _POOLING in kinds:
        config = _read_json(model_dir / kinds[_POOLING]["path"] / "config.json") or {}
        pooling = _pooling_of(config)
    return pooling, _NORMALIZE in kinds


def _pooling_of(config: dict[str, Any]) -> Pooling:
    if config.get("include_prompt") is False:
        raise ValueError("pooling that excludes the prompt is not supported")
    modes = config.get("pooling_mode")
    if modes is not None:
        names = [modes] if isinstance(modes, str) else list(modes)
        if len(names) == 1 and names[0] in _POOLING_NAMES:
            return _POOLING_NAMES[names[0]]
        raise ValueError(f"pooling mode {modes!r} is not supported")
    chosen = [mode for flag, mode in _POOLING_FLAGS.items() if config.get(flag)]
    others = [k for k, v in config.items()
              if k.startswith("pooling_mode_") and v and k not in _POOLING_FLAGS]
    if len(chosen) != 1 or others:
        raise ValueError("the checkpoint's pooling combination is not supported")
    return chosen[0]


def read_sentence_spec(model_dir: Path, config: EmbeddingModelConfig,
                       tokenizer: Any) -> SentenceSpec:
    hf = _read_json(model_dir / "config.json") or {}
    st_pooling, st_normalize = _st_modules(model_dir)
    st_config = _read_json(model_dir / "config_sentence_transformers.json") or {}
    bert_config = _read_json(model_dir / "sentence_bert_config.json") or {}
    limits = [bert_config.get("max_seq_length"), hf.get("max_position_embeddings"),
              config.max_model_len]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < _UNREASONABLE_MAX_LENGTH:
        limits.append(tokenizer_limit)
    max_seq_length = min(int(v) for v in limits if v)
    if config.matryoshka_dimensions is not None:
        matryoshka: tuple[int, ...] | None = tuple(config.matryoshka_dimensions)
    elif hf.get("matryoshka_dimensions"):
        matryoshka = tuple(hf["matryoshka_dimensions"])
    else:
        matryoshka = () if hf.get("is_matryoshka") else None
    pooling = (st_pooling or "mean") if config.pooling == "auto" else config.pooling
    normalize = config.normalize
    if normalize is None:
        normalize = True if st_normalize is None else st_normalize
    return SentenceSpec(
        hidden_size=int(hf["hidden_size"]),
        max_seq_length=max_seq_length,
        pooling=pooling,
        normalize=normalize,
        prompts=dict(st_config.get("prompts") or {}),
        default_prompt_name=st_config.get("default_prompt_name"),
        matryoshka_dimensions=matryoshka,
    )


def chunks(sequences: Sequence[Sequence[int]], max_tokens: int) -> list[list[list[int]]]:
    """`sequences` packed in order into chunks of at most `max_tokens` tokens (a longer
    sequence alone in its chunk): each chunk is one Encoder call."""
    packed: list[list[list[int]]] = [[]]
    used = 0
    for sequence in sequences:
        if packed[-1] and used + len(sequence) > max_tokens:
            packed.append([])
            used = 0
        packed[-1].append(list(sequence))
        used += len(sequence)
    return packed


class EncoderCore:
    """Holds the encoder; pads, forwards and pools groups of sequences within a token budget."""

    def __init__(self, model: Any, spec: SentenceSpec, pad_token_id: int,
                 max_batch_tokens: int) -> None:
        self.model = model
        self.spec = spec
        self.pad_token_id = pad_token_id
        self.max_batch_tokens = max_batch_tokens

    @classmethod
    def from_checkpoint(cls, model_dir: Path, config: EmbeddingModelConfig) -> EncoderCore:
        from transformers import AutoModel

        from serve_app.prompts.checkpoint import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        spec = read_sentence_spec(model_dir, config, tokenizer)
        dtype: Any = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
        model = AutoModel.from_pretrained(model_dir, dtype=dtype)
        model.to(select_device(config.device)).eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(model, spec, pad, config.batching.max_batch_tokens)

    def encode(self, batch: Sequence[Sequence[Sequence[int]]]) -> list[torch.Tensor]:
        """Pooled vectors for each request's inputs: one float32 `(inputs, hidden)` tensor
        each.

        All sequences of the batch are sorted by length, so each forward pass pads little,
        and grouped so that no pass exceeds `max_batch_tokens` padded tokens.
        """
        flat = [list(ids) for request in batch for ids in request]
        order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
        vectors: list[torch.Tensor | None] = [None] * len(flat)
        for group in self._groups(order, flat):
            for index, vector in zip(group, self._forward([flat[i] for i in group]),
                                     strict=True):
                vectors[index] = vector
        out, start = [], 0
        for request in batch:
            rows = vectors[start : start + len(request)]
            out.append(torch.stack([v for v in rows if v is not None]))
            start += len(request)
        return out

    def _groups(self, order: list[int], flat: list[list[int]]) -> list[list[int]]:
        groups: list[list[int]] = [[]]
        for index in order:  # ascending length: the newest member is the longest
            group = groups[-1]
            if group and len(flat[index]) * (len(group) + 1) > self.max_batch_tokens:
                groups.append([index])
            else:
                group.append(index)
        return [g for g in groups if g]

    def _forward(self, sequences: list[list[int]]) -> torch.Tensor:
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, : len(sequence)] = 1
        device = self.model.device
        with torch.inference_mode():
            hidden = self.model(input_ids=ids.to(device),
                                attention_mask=mask.to(device)).last_hidden_state
            pooled = _pool(hidden.float(), mask.to(device), self.spec.pooling)
        return pooled.cpu()


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
