"""The demo model: a tiny Llama-architecture checkpoint with a byte-level tokenizer.

Built locally with no network in about 20 seconds of one CPU core, identical on every
build (seeded, single-threaded training on `DEMO_TEXT` and its questions as chats), so the
default config runs anywhere and a client can rebuild the very same model to compute its
own prompt embeddings:

    python -m serve_app.demo.model DIR
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from serve_app.demo import text
from serve_app.demo.text import DEMO_TEXT

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
TURN_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>"]
"""Special tokens, as in real chat models: typed in a message they are text, never a turn."""
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_CONTEXT = 512
_TRAIN_STEPS = 500
_TRAIN_SEQ = 64
_TRAIN_BATCH = 16
_SEED = 1234


def _build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    # After the byte alphabet, so every byte keeps its id.
    core.add_special_tokens(SPECIAL_TOKENS + TURN_MARKERS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=_CONTEXT,
        chat_template=CHAT_TEMPLATE,
    )


_QUESTION = re.compile(r"(What is [^?]+\?) (.+)")


def _chats(tokenizer: Any, lines: list[str]) -> list[int]:
    """The text's questions and answers as chats, so the turn markers' rows are trained,
    each beside the same line as plain text after a BOS, so a prompt without turn markers
    is still continued as text."""
    ids: list[int] = []
    for line in lines:
        match = _QUESTION.fullmatch(line)
        if match:
            chat = [{"role": "user", "content": match[1]},
                    {"role": "assistant", "content": match[2]}]
            ids += tokenizer.apply_chat_template(chat, return_dict=False)
            ids += tokenizer(line + "\n").input_ids
    return ids


def _train(model: torch.nn.Module, ids: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, _TRAIN_STEPS)
    model.train()
    for _ in range(_TRAIN_STEPS):
        high = ids.numel() - _TRAIN_SEQ - 1
        starts = torch.randint(0, high, (_TRAIN_BATCH,), generator=generator)
        batch = torch.stack([ids[s : s + _TRAIN_SEQ] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_demo_model(target: Path) -> Path:
    """Write the demo checkpoint (config, safetensors, tokenizer) into `target`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with _single_threaded(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = LlamaForCausalLM(config)
        lines = [line for line in DEMO_TEXT.splitlines() if line]
        encoded = tokenizer("\n".join(lines * 4), verbose=False).input_ids
        # The chats and their plain lines, repeated, are under half of what the model reads.
        _train(model, torch.tensor(encoded + _chats(tokenizer, lines) * 12))
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def build_once(target: Path, build: Callable[[Path], Path], marker: str) -> Path:
    """`target`, built by `build` once (atomically, under a lock); concurrent callers wait.

    `marker` is a file that exists only in a finished build.
    """
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / marker).exists():
            return target
        logger.warning("building %s (first start only)", target)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-build-"))
        try:
            build(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def recipe_digest(*modules: ModuleType) -> str:
    """A digest of the modules' source, which names a build in the cache: a build from an
    older recipe is never reused, and no version number has to be remembered."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


def ensure_demo_model(cache_dir: Path) -> Path:
    """The demo checkpoint under `cache_dir`, built once per recipe; concurrent callers wait."""
    name = f"demo-llama-{recipe_digest(sys.modules[__name__], text)}"
    return build_once(cache_dir / name, build_demo_model, "config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the serve_app demo model into DIR.")
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    path = build_demo_model(args.dir)
    print(f"demo model written to {path}")


if __name__ == "__main__":
    main()
