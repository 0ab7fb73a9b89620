"""A checkpoint with Llama-3.1-8B's vocabulary and hidden sizes and random weights, for
benchmarks: the embedding matrix (128256 x 4096 bf16, 1 GiB) is the real size; one decoder
layer stands in for 32, so the whole model still loads in seconds on a small machine.

Its word-level tokenizer maps `w0 ... w128255` to one token each, so a prompt of N words
is exactly N tokens. `ensure_llama8b_shape` writes the same model with all 32 layers and no
weights, for `vllm serve --load-format dummy` (random weights made on the GPU).

    python benchmarks/llama8b_sized.py DIR
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

VOCAB, HIDDEN = 128256, 4096
logger = logging.getLogger(__name__)


def prompt_of(tokens: int, offset: int = 0) -> str:
    """A prompt that the tokenizer turns into exactly `tokens` ids."""
    return " ".join(f"w{(offset * 7919 + index * 31) % (VOCAB - 1)}" for index in range(tokens))


def _tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{index}": index for index in range(VOCAB - 1)}
    vocab["<unk>"] = VOCAB - 1
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                   eos_token="<unk>", model_max_length=131072)


def llama8b_config(layers: int) -> object:
    """Llama-3.1-8B's shape (but its RoPE scaling) with `layers` decoder layers."""
    from transformers import LlamaConfig

    # `architectures` is what vLLM picks its model class by; save_pretrained of a model
    # writes it, of a bare config not.
    return LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )


def ensure_llama8b_sized(directory: Path) -> Path:
    """Build the checkpoint once into `directory` (about 2.6 GB); later calls reuse it."""
    if (directory / "config.json").exists():
        return directory
    # Imported here: the load generator's processes import this module for `prompt_of`.
    import torch
    from transformers import LlamaForCausalLM

    logger.warning("building the Llama-3.1-8B-sized benchmark checkpoint in %s", directory)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(llama8b_config(layers=1)).to(torch.bfloat16)
    partial = directory.with_name(directory.name + ".partial")
    model.save_pretrained(partial)
    _tokenizer().save_pretrained(partial)  # type: ignore[attr-defined]
    partial.rename(directory)
    return directory


def ensure_llama8b_shape(directory: Path) -> Path:
    """Llama-3.1-8B's config (32 layers) and the word-level tokenizer, without weights:
    what `vllm serve --load-format dummy` reads. Written once; later calls reuse it."""
    if (directory / "config.json").exists():
        return directory
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a run stopped while writing it
    llama8b_config(layers=32).save_pretrained(partial)  # type: ignore[attr-defined]
    _tokenizer().save_pretrained(partial)  # type: ignore[attr-defined]
    partial.rename(directory)
    return directory


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    print(ensure_llama8b_sized(parser.parse_args().directory))
