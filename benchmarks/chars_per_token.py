"""How many characters a run of tokens can cover, per kind of text: the measurement behind
`prompts.text_budget.MEASURED_CHARS_PER_TOKEN`.

    python benchmarks/chars_per_token.py [--tokenizer PATH ...] [--window 128] [--out DIR]

A tokenizer whose normalizer or pre-tokenizer drops characters (BERT's whitespace split,
WordPiece's one `[UNK]` for a word over `max_input_chars_per_word`) has no bound on the text
one token stands for, and a byte-level BPE's own bound (its longest vocabulary entry, times
four under NFKC) is far above what text reaches. So the gateway cuts text before tokenizing
at a measured density instead. For each tokenizer and kind of text, this reports the most
characters any `--window` consecutive tokens cover, per token (from the tokenizer's
offsets), and the whole sample's average.

Tokenizers: the demo encoder's WordPiece (always), and any `tokenizer.json` or tokenizer
directory given with `--tokenizer`. The byte-level BPE of the committed result is the
65,000-entry one that the `anthropic` 0.38.0 wheel ships:

    pip download anthropic==0.38.0 --no-deps -d /tmp/bpe
    unzip -o /tmp/bpe/anthropic-0.38.0-py3-none-any.whl anthropic/tokenizer.json -d /tmp/bpe
    python benchmarks/chars_per_token.py --tokenizer /tmp/bpe/anthropic/tokenizer.json

Writes `chars_per_token.md` under `--out` (and prints it).
"""

from __future__ import annotations

import argparse
import base64
import inspect
import json
import os
import platform
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_app import envs
from serve_app.demo.encoder import ensure_demo_encoder
from serve_app.demo.text import DEMO_TEXT
from serve_app.prompts.text_budget import MEASURED_CHARS_PER_TOKEN, chars_per_token

ROOT = Path(__file__).resolve().parents[1]


def _source(*modules: str) -> str:
    import importlib

    return "\n".join(inspect.getsource(importlib.import_module(m)) for m in modules)


def _nested(depth: int, rng: random.Random) -> Any:
    if depth == 0:
        return rng.choice([rng.randrange(10_000), "value", True, None, 3.25])
    return {f"field_{i}": _nested(depth - 1, rng) for i in range(3)}


def ordinary_texts() -> dict[str, str]:
    """Text that clients send: prose, code, data, other scripts."""
    rng = random.Random(0)
    prose = "\n".join((m.__doc__ or "") for m in (argparse, json, inspect)) + DEMO_TEXT * 20
    return {
        "English prose": prose,
        "Python source": _source("argparse", "json.decoder", "http.server"),
        "JSON, indent 4, nested 6": json.dumps(_nested(6, rng), indent=4),
        "URLs": " ".join(f"https://example.com/docs/{rng.getrandbits(32):x}/page.html?q={i}"
                         for i in range(2000)),
        "digits in groups": " ".join(str(rng.randrange(10**9)) for _ in range(5000)),
        "Japanese": "東京は日本の首都です。人口は約千四百万人で、多くの企業が集まっています。"
                    * 600,
        "accented Latin": "Élan, façade, naïve, crème brûlée, Ångström, Nguyễn Thị Minh Khai. "
                          * 800,
        "emoji": "Great job 🎉👍🏽 see you 🇫🇷 tomorrow! " * 1500,
        "base64, 76 a line": "\n".join(base64.encodebytes(rng.randbytes(45_000)).decode()
                                       .splitlines()),
        "hex digests, one a line": "\n".join(rng.randbytes(32).hex() for _ in range(1500)),
    }


def dense_texts() -> dict[str, str]:
    """Text whose characters outnumber its tokens without limit: cut as if it were at the
    measured density, it keeps fewer tokens than the limit."""
    rng = random.Random(1)
    return {
        "a word between 99 spaces": ("word" + " " * 99) * 600,
        "one character repeated": "=" * 60_000,
        "words over 100 characters": " ".join(rng.randbytes(60).hex() for _ in range(500)),
    }


def densest_window(tokenizer: Any, text: str, window: int) -> tuple[float, float]:
    """(the most characters any `window` consecutive tokens span, per token; the sample's
    characters per token)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoded["offset_mapping"]]
    tokens = len(starts)
    average = len(text) / max(tokens, 1)
    if tokens <= window:
        return average, average
    spans = [starts[i + window] - starts[i] for i in range(tokens - window)]
    return max(spans) / window, average


def load(path: str) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path.endswith(".json"):
        return PreTrainedTokenizerFast(tokenizer_file=path)
    return AutoTokenizer.from_pretrained(path)


def describe(tokenizer: Any) -> str:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]["type"]
    pre = (backend.get("pre_tokenizer") or {}).get("type")
    bound = chars_per_token(tokenizer, parse_special=True)
    return (f"{model}, {len(tokenizer)} entries, pre-tokenizer {pre}; bound from its "
            f"pipeline: {bound if bound is not None else 'none'}")


def rows_for(name: str, tokenizer: Any, window: int,
             kinds: dict[str, Callable[[], dict[str, str]]]) -> list[str]:
    rows = []
    for group, make in kinds.items():
        for kind, text in make().items():
            densest, average = densest_window(tokenizer, text, window)
            rows.append(f"| {name} | {group} | {kind} | {average:.2f} | {densest:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", action="append", default=[],
                        help="a tokenizer.json or tokenizer directory (repeatable)")
    parser.add_argument("--window", type=int, default=128,
                        help="tokens per window (the demo encoder's limit by default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    tokenizers = {"demo encoder (WordPiece)": load(str(ensure_demo_encoder(envs.cache_dir())))}
    for path in args.tokenizer:
        tokenizers[Path(path).name if not path.endswith(".json") else path] = load(path)
    kinds = {"ordinary": ordinary_texts, "dense": dense_texts}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    command = " ".join(["python benchmarks/chars_per_token.py",
                        *(f"--tokenizer {p}" for p in args.tokenizer)])
    lines = ["# Characters per token, by kind of text", "",
             f"Machine: {machine}. Command: `{command}` (see the script's docstring for the "
             f"byte-level BPE). Window: {args.window} tokens. "
             f"`MEASURED_CHARS_PER_TOKEN` is {MEASURED_CHARS_PER_TOKEN}.", ""]
    lines += [f"- {name}: {describe(tok)}" for name, tok in tokenizers.items()]
    lines += ["", "| tokenizer | text | kind | chars per token, whole sample | "
              f"chars per token, densest {args.window}-token window |", "|---|---|---|---:|---:|"]
    for name, tokenizer in tokenizers.items():
        lines += rows_for(name, tokenizer, args.window, kinds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chars_per_token.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
