"""The demo embedding model: a tiny BERT-style encoder with sentence-transformers files.

Built locally with no network in about a second, identical on every build (seeded
initialisation, no training), so the embeddings endpoints work out of the box and tests can
compare the gateway's vectors with sentence-transformers on the very same files:

    python -m serve_app.demo.encoder DIR
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Literal

import torch

from serve_app.demo import text
from serve_app.demo.model import build_once, recipe_digest
from serve_app.demo.text import DEMO_TEXT

HIDDEN = 32
MAX_SEQ_LENGTH = 128
MATRYOSHKA_DIMENSIONS = [8, 16, 32]
PROMPTS = {"query": "query: ", "document": "passage: "}
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SEED = 4321


def _vocabulary() -> list[str]:
    """Specials, every printable ASCII character (alone and as a continuation), demo words."""
    chars = [chr(c) for c in range(33, 127)]
    words = sorted(set(re.findall(r"[a-z]+", DEMO_TEXT.lower())) - set(chars))
    return _SPECIALS + chars + ["##" + c for c in chars] + words


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_sentence_files(target: Path, hidden: int, max_seq_length: int,
                         pooling: Literal["mean", "cls", "lasttoken"], prompts: dict[str, str],
                         lower_case: bool) -> None:
    """sentence-transformers' files beside a saved BERT: Transformer, Pooling, Normalize."""
    _write_json(target / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ])
    _write_json(target / "sentence_bert_config.json",
                {"max_seq_length": max_seq_length, "do_lower_case": lower_case})
    _write_json(target / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_lasttoken": pooling == "lasttoken",
    })
    (target / "2_Normalize").mkdir(exist_ok=True)
    _write_json(target / "config_sentence_transformers.json", {
        "prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine",
    })


def build_demo_encoder(target: Path) -> Path:
    """Write the demo encoder (config, safetensors, tokenizer, sentence-transformers files)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    target.mkdir(parents=True, exist_ok=True)
    (target / "vocab.txt").write_text("\n".join(_vocabulary()) + "\n")
    tokenizer = BertTokenizer(str(target / "vocab.txt"), do_lower_case=True,
                                  model_max_length=MAX_SEQ_LENGTH)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=MAX_SEQ_LENGTH,
    )
    config.matryoshka_dimensions = MATRYOSHKA_DIMENSIONS  # read as vLLM reads it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = BertModel(config).eval()
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    write_sentence_files(target, HIDDEN, MAX_SEQ_LENGTH, "mean", PROMPTS, lower_case=False)
    return target


def ensure_demo_encoder(cache_dir: Path) -> Path:
    """The demo encoder under `cache_dir`, built once; concurrent callers wait for it."""
    # Its vocabulary comes from the demo text: a change there is a new recipe too.
    name = f"demo-encoder-{recipe_digest(sys.modules[__name__], text)}"
    return build_once(cache_dir / name, build_demo_encoder, "modules.json")


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the serve_app demo encoder into DIR.")
    parser.add_argument("dir", type=Path)
    path = build_demo_encoder(parser.parse_args().dir)
    print(f"demo encoder written to {path}")


if __name__ == "__main__":
    main()
