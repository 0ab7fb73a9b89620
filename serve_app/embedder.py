"""EmbedderCore: token ids -> input-embedding lookup -> encoded prompt embeds.

Plain Python (no Ray): the Serve deployment in `deployments.py` batches calls into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from serve_app.checkpoint import load_input_embeddings, read_model_spec, select_device
from serve_app.codec import EncodedPromptEmbeds, encode_prompt_embeds
from serve_app.config import ModelConfig


class EmbedderCore:
    """Holds only the input-embedding matrix of the served model."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2:
            raise ValueError("the input-embedding weight must be (vocab, hidden)")
        self.weight = weight

    @classmethod
    def from_checkpoint(cls, model_dir: Path, config: ModelConfig) -> EmbedderCore:
        dtype = read_model_spec(model_dir, config).dtype
        device = select_device(config.device)
        return cls(load_input_embeddings(model_dir, dtype, device))

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def lookup(self, batch: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """One lookup for the whole batch; one CPU tensor per prompt (views of one copy)."""
        lengths = [len(ids) for ids in batch]
        flat = torch.tensor([i for ids in batch for i in ids], dtype=torch.long)
        with torch.inference_mode():
            rows = torch.nn.functional.embedding(flat.to(self.weight.device), self.weight)
        return list(rows.cpu().split(lengths))

    def embed_batch(self, batch: Sequence[Sequence[int]]) -> list[EncodedPromptEmbeds]:
        return [encode_prompt_embeds(rows) for rows in self.lookup(batch)]
