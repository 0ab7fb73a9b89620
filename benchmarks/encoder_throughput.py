"""The sentence Encoder on one device: tokens/s and sequences/s of what the Encoder
deployment runs per Serve batch (`EncoderCore.encode`: pad, forward, pool, copy back),
alone and between the ingress's tokenization and normalisation, against the model's
forward pass alone.

    PYTHONPATH=. SERVE_APP_CACHE_DIR=/tmp/cache python benchmarks/encoder_throughput.py \\
        --out benchmarks/results --name encoder_h200        # CUDA: fp16 and fp32, ~3 min
    python benchmarks/encoder_throughput.py --device cpu --tiny --out /tmp/encoder  # smoke

The checkpoint has bge-base-en-v1.5's shapes (BERT: 12 layers, hidden 768, 12 heads,
intermediate 3072, vocabulary 30522, 512 positions) and its sentence-transformers files
(CLS pooling, Normalize), with random weights; it is built once under
`$SERVE_APP_CACHE_DIR` with no hub access (`--tiny`: 2 layers, hidden 32). Its WordPiece
vocabulary is made-up lower-case words of one token each, so a text of N - 2 words is
exactly N tokens with [CLS] and [SEP]; English text costs the tokenizer a little more per
token (words split into pieces).

Each cell (dtype, tokens per sequence, sequences per call) sends its sequences as the
ingress does (packed in order into chunks of at most the model's 512 tokens, all chunks
in one Serve batch) with the token budget set to sequences x tokens, so a call is one
forward pass; `--max-batch-tokens 8192` keeps the deployment's default budget instead
(several passes per call). After a warm-up, each column runs for `--seconds`:
- encode: `EncoderCore.encode` wall time; it ends with a copy to the host, so the device
  has finished when it returns;
- tokenize: `SentenceModel.tokenize` of the texts (the ingress's call, fast tokenizer);
- tokenize + encode: tokenize, encode, then the ingress's L2 normalisation of the vectors
  (`spec.normalize`, which the service applies after pooling), in one
  thread; the deployment runs the two sides in different processes, where they overlap,
  so this is the floor of the pipeline's rate;
- forward: the model's forward pass alone on device-resident ids (CUDA events on a GPU),
  the bound against which the core's host work (padding, copies, pooling) shows.

Needs torch, transformers and tokenizers, and serve_app's import chain, which has no Ray:
pydantic, starlette, orjson, pybase64, numpy and jinja2 (`pip install -e .` installs them;
torch brings jinja2). The numbers are of the serve_app code in the working tree: the
output names the commit and whether serve_app had uncommitted changes. Writes
`<name>.md` and `<name>.json` into `--out`, with published figures of TEI and Infinity.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

try:
    from serve_app import envs
    from serve_app.config import EmbeddingModelConfig
    from serve_app.demo.encoder import write_sentence_files
    from serve_app.demo.model import build_once
    from serve_app.prompts.checkpoint import load_tokenizer
    from serve_app.sentence.encoder import EncoderCore
    from serve_app.sentence.inputs import SentenceModel
except ModuleNotFoundError as missing:  # a bare torch host: name the module, no traceback
    raise SystemExit(
        f"encoder_throughput: cannot import {missing.name!r}. Run it from the repository "
        "root with PYTHONPATH=. and serve_app's dependencies installed (`pip install -e .`, "
        "or at least `pip install pydantic starlette orjson pybase64 numpy jinja2`); Ray is "
        "not needed.") from None

VOCAB, MAX_POSITIONS = 30522, 512
BUILD_VERSION = "v1"
"""Bump when the recipe changes, so cached builds of older recipes are not reused."""
MIN_CALLS = 3
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int


BERT_BASE = Shape("bert-base", hidden=768, layers=12, heads=12, intermediate=3072)
TINY = Shape("tiny", hidden=32, layers=2, heads=4, intermediate=64)


@dataclass(frozen=True)
class Published:
    """A throughput figure someone else measured; `tokens_per_s` derived as `derivation` says."""

    server: str
    model: str
    gpu: str
    workload: str
    figure: str
    tokens_per_s: str
    derivation: str
    source: str


PUBLISHED = (
    Published(
        "TEI (candle, flash-bert), Docker 89-0.6", "BAAI/bge-large-en-v1.5 (BERT-large, 335M)",
        "1x NVIDIA L4", "HTTP /embeddings, 50 requests at concurrency 50 (ab), 256 "
        "sentences = 115,000 tokens per request (~450 tokens/sentence), fp16",
        "0.54 requests/s", "~62,000",
        "0.54 x 115,000 tokens (the page's own tokens per request)",
        "github.com/michaelfeil/infinity docs/docs/benchmarking.md @ "
        "fcb951cb679d0de185bf254600d9b7d2cd3a263a (last changed dd5a6fa, 2024-05-19)"),
    Published(
        "Infinity 0.0.25 (torch + compile + flash-attn 2)", "BAAI/bge-large-en-v1.5",
        "1x NVIDIA L4", "as above (engine batch size 32)", "0.51 requests/s", "~58,600",
        "0.51 x 115,000 tokens", "same page"),
    Published(
        "Infinity (onnx-gpu fp16, fused layers)", "BAAI/bge-large-en-v1.5", "1x NVIDIA L4",
        "as above", "0.41 requests/s", "~47,200", "0.41 x 115,000 tokens", "same page"),
    Published(
        "sentence-transformers (fp16), same harness", "BAAI/bge-large-en-v1.5",
        "1x NVIDIA L4", "as above", "0.17 requests/s", "~19,600", "0.17 x 115,000 tokens",
        "same page"),
    Published(
        "Infinity (torch, no compile, flash-attn off)", "BAAI/bge-large-en-v1.5",
        "1x AMD MI210", "as above", "0.75 requests/s", "~86,000", "0.75 x 115,000 tokens",
        "same page"),
    Published(
        "TEI vs Infinity, maintainer's comment", "BERT-large (bge-large class)",
        "1x NVIDIA L4", "batches of ~256 inputs x ~380 tokens", "TEI 0.55, Infinity 0.52 "
        "requests/s", "TEI ~53,500; Infinity ~50,600", "requests/s x 256 x 380",
        "github.com/michaelfeil/infinity/issues/108 (2024-02-21)"),
    Published(
        "Infinity (torch, --dtype float32, --no-bettertransformer)", "BAAI/bge-base-en-v1.5",
        "not stated in the text read", "vllm bench serve, ShareGPT prompts, one input per "
        "request", "150.42 requests/s", "n/a", "tokens per request not in the text read",
        "github.com/vllm-project/vllm/pull/26641 (2025-10-11)"),
    Published(
        "TEI", "BAAI/bge-base-en-v1.5", "1x NVIDIA A10", "512 tokens per input, client "
        "batch 1 and 32", "plots only (assets/bs1-tp.png, assets/bs32-tp.png)", "n/a",
        "the values are in Git LFS images, not in text",
        "github.com/huggingface/text-embeddings-inference README.md @ "
        "0d124dc9773be6ac5a9a57d8439aba9bbbf33273"),
)


def vocabulary() -> list[str]:
    """Specials, then made-up words of two and three consonant-vowel syllables."""
    syllables = [c + v for c in "bdfghklmnprstvwz" for v in "aeiou"]
    words = itertools.chain(
        ("".join(p) for p in itertools.product(syllables, repeat=2)),
        ("".join(p) for p in itertools.product(syllables, repeat=3)),
    )
    return _SPECIALS + list(itertools.islice(words, VOCAB - len(_SPECIALS)))


def build_tokenizer(words: list[str]) -> Any:
    """A BERT WordPiece tokenizer (lower-casing, [CLS] ... [SEP]) over `words`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {word: index for index, word in enumerate(words)}
    core = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_POSITIONS)


def build_checkpoint(target: Path, shape: Shape) -> Path:
    """Weights, tokenizer and bge-base's sentence-transformers files (CLS, Normalize)."""
    from transformers import BertConfig, BertModel

    target.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocabulary()).save_pretrained(target)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
        max_position_embeddings=MAX_POSITIONS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config).eval()
    model.save_pretrained(target, safe_serialization=True)
    write_sentence_files(target, shape.hidden, MAX_POSITIONS, "cls", {}, lower_case=True)
    return target


def ensure_checkpoint(shape: Shape) -> Path:
    target = envs.cache_dir() / f"bench-encoder-{shape.name}-{BUILD_VERSION}"
    return build_once(target, partial(build_checkpoint, shape=shape), "modules.json")


def texts_of(tokens: int, count: int, seed: int) -> list[str]:
    """`count` texts of exactly `tokens` tokens each, [CLS] and [SEP] included."""
    rng = random.Random(seed)
    words = vocabulary()[len(_SPECIALS):]
    return [" ".join(rng.choices(words, k=tokens - 2)) for _ in range(count)]


def serve_batch(ids: list[list[int]], limit: int) -> list[list[list[int]]]:
    """The ingress's chunks (inputs in order, at most `limit` tokens each, as
    `SentenceService.vectors` packs them), all in one Serve batch."""
    chunks: list[list[list[int]]] = [[]]
    used = 0
    for sequence in ids:
        if chunks[-1] and used + len(sequence) > limit:
            chunks.append([])
            used = 0
        chunks[-1].append(sequence)
        used += len(sequence)
    return chunks


@dataclass(frozen=True)
class Timing:
    calls: int
    seconds: float
    median_ms: float

    def rate(self, per_call: int) -> float:
        return per_call * self.calls / self.seconds


def wall_timing(work: Callable[[], object], seconds: float,
                sync: Callable[[], None]) -> Timing:
    """Calls of `work` for `seconds` (at least MIN_CALLS), each ended by `sync`."""
    samples: list[float] = []
    sync()
    while sum(samples) < seconds or len(samples) < MIN_CALLS:
        start = time.perf_counter()
        work()
        sync()
        samples.append(time.perf_counter() - start)
    return Timing(len(samples), sum(samples), statistics.median(samples) * 1e3)


def cuda_timing(work: Callable[[], object], seconds: float) -> Timing:
    """Device time of `work` between CUDA events, for `seconds` of it (at least MIN_CALLS)."""
    samples: list[float] = []
    while sum(samples) < seconds or len(samples) < MIN_CALLS:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / 1e3)
    return Timing(len(samples), sum(samples), statistics.median(samples) * 1e3)


@dataclass(frozen=True)
class Cell:
    dtype: str
    tokens: int
    sequences: int
    max_batch_tokens: int
    passes: int
    encode: Timing
    tokenize: Timing
    tokenize_encode: Timing
    forward: Timing

    def row(self) -> str:
        per_call = self.tokens * self.sequences
        overhead = 1 - self.forward.median_ms / self.encode.median_ms
        shown = f"{overhead:.0%}" if overhead >= 0 else "<0 (noise)"
        return (
            f"| {self.dtype} | {self.tokens} | {self.sequences} | {self.passes} | "
            f"{self.encode.median_ms:.2f} | {self.encode.rate(per_call):,.0f} | "
            f"{self.encode.rate(self.sequences):,.0f} | {self.tokenize.median_ms:.2f} | "
            f"{self.tokenize_encode.rate(per_call):,.0f} | "
            f"{self.tokenize_encode.rate(self.sequences):,.0f} | "
            f"{self.forward.median_ms:.2f} | {self.forward.rate(per_call):,.0f} | "
            f"{shown} |")


class Bench:
    """One loaded encoder (one dtype) and the ingress-side model that tokenizes for it."""

    def __init__(self, model_dir: Path, dtype: str, device: str, seconds: float) -> None:
        config = EmbeddingModelConfig(source=str(model_dir), dtype=dtype, device=device)
        self.core = EncoderCore.from_checkpoint(model_dir, config)
        self.sentences = SentenceModel("bench", self.core.spec, load_tokenizer(model_dir),
                                       truncate_by_default=False)
        self.dtype, self.seconds = dtype, seconds
        self.cuda = self.core.model.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        limit = self.core.spec.max_seq_length
        return self.sentences.tokenize(texts, "", None, limit, "input")

    def measure(self, tokens: int, sequences: int, budget: int | None) -> Cell:
        texts = texts_of(tokens, sequences, seed=tokens * 7919 + sequences)
        ids = self.tokenize(texts)
        assert all(len(s) == tokens for s in ids), "texts must tokenize to exactly `tokens`"
        self.core.max_batch_tokens = budget or tokens * sequences  # as reconfigure() does
        limit = self.core.spec.max_seq_length
        batch = serve_batch(ids, limit)
        device_ids = torch.tensor(ids, device=self.core.model.device)
        mask = torch.ones_like(device_ids)

        def forward() -> None:
            with torch.inference_mode():
                self.core.model(input_ids=device_ids, attention_mask=mask)

        def tokenize_encode() -> None:
            vectors = torch.cat(self.core.encode(serve_batch(self.tokenize(texts), limit)))
            if self.core.spec.normalize:  # as the service does with the vectors it gets back
                torch.nn.functional.normalize(vectors, p=2, dim=1)

        for _ in range(2):  # kernel selection, allocator growth
            self.core.encode(batch)
            forward()
        self.sync()
        per_pass = max(1, self.core.max_batch_tokens // tokens)
        return Cell(
            self.dtype, tokens, sequences, self.core.max_batch_tokens,
            math.ceil(sequences / per_pass),
            encode=wall_timing(lambda: self.core.encode(batch), self.seconds, self.sync),
            tokenize=wall_timing(lambda: self.tokenize(texts), self.seconds / 2, lambda: None),
            tokenize_encode=wall_timing(tokenize_encode, self.seconds, self.sync),
            forward=(cuda_timing(forward, self.seconds) if self.cuda
                     else wall_timing(forward, self.seconds, self.sync)))


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent)
    return out.stdout.strip()


def _git_commit() -> str:
    """HEAD, marked when serve_app differs from it: the numbers are of the working tree."""
    try:
        changed = _git("status", "--porcelain", "--", "../serve_app")
        return _git("rev-parse", "--short", "HEAD") + (" + uncommitted serve_app changes"
                                                       if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"


def machine(device: str, attention: str) -> dict[str, Any]:
    import transformers

    cuda = device == "cuda"
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "attention": attention,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "commit": _git_commit(),
        "command": " ".join(["python", *sys.argv]),
    }


def markdown(facts: dict[str, Any], settings: dict[str, Any], cells: list[Cell]) -> str:
    shape = settings["shape"]
    lines = [
        "# Encoder throughput",
        "",
        f"Device: {facts['device']}; torch {facts['torch']} (CUDA {facts['cuda']}), "
        f"transformers {facts['transformers']}, attention `{facts['attention']}`, TF32 "
        f"matmul {facts['tf32_matmul']}; {facts['cpus']} CPUs; commit {facts['commit']}.",
        f"Command: `{facts['command']}`",
        f"Checkpoint: {shape['name']} (hidden {shape['hidden']}, {shape['layers']} layers, "
        f"{shape['heads']} heads, intermediate {shape['intermediate']}, vocabulary {VOCAB}),"
        " random weights, CLS pooling + Normalize. Token budget: "
        f"{settings['max_batch_tokens'] or 'sequences x tokens (one forward pass a call)'};"
        f" at least {settings['seconds']} s per column after a warm-up.",
        "",
        "Rates are per second of each column's own time; ms are medians per call. "
        "Overhead: the share of an encode call outside the forward pass.",
        "",
        "| dtype | tokens/seq | seqs/call | passes | encode ms | encode tokens/s | "
        "encode seqs/s | tokenize ms | tok+encode tokens/s | tok+encode seqs/s | "
        "forward ms | forward tokens/s | overhead |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(cell.row() for cell in cells),
        "",
        "## Published figures (other servers, models and GPUs: for orientation only)",
        "",
        "| server | model | GPU | workload | figure | tokens/s | derivation | source |",
        "|---|---|---|---|---|---:|---|---|",
        *(f"| {p.server} | {p.model} | {p.gpu} | {p.workload} | {p.figure} | "
          f"{p.tokens_per_s} | {p.derivation} | {p.source} |" for p in PUBLISHED),
    ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="2-layer hidden-32 model, short inputs: a smoke test")
    parser.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16", "float32"],
                        help="default: float16 float32 on cuda, float32 on cpu")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="tokens per sequence (default 128 512; --tiny: 16 64)")
    parser.add_argument("--batches", type=int, nargs="+",
                        help="sequences per call (default 32 64 256; --tiny: 4 16)")
    parser.add_argument("--seconds", type=float,
                        help="per column and cell (default 3; --tiny: 0.3)")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="the Encoder's token budget (default: sequences x tokens)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="encoder_throughput",
                        help="file name stem of the .md and .json written into --out")
    args = parser.parse_args()
    args.dtypes = args.dtypes or (["float16", "float32"] if args.device == "cuda"
                                  else ["float32"])
    args.lengths = args.lengths or ([16, 64] if args.tiny else [128, 512])
    args.batches = args.batches or ([4, 16] if args.tiny else [32, 64, 256])
    args.seconds = args.seconds or (0.3 if args.tiny else 3.0)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; use --device cpu (with --tiny to smoke-test)")
    if max(args.lengths) > MAX_POSITIONS or min(args.lengths) < 3:
        parser.error(f"--lengths must lie in [3, {MAX_POSITIONS}]")
    return args


def main() -> None:
    args = parse_args()
    shape = TINY if args.tiny else BERT_BASE
    model_dir = ensure_checkpoint(shape)
    cells: list[Cell] = []
    attention = "unknown"
    for dtype in args.dtypes:
        bench = Bench(model_dir, dtype, args.device, args.seconds)
        attention = str(getattr(bench.core.model.config, "_attn_implementation", "unknown"))
        for tokens, sequences in itertools.product(args.lengths, args.batches):
            cells.append(bench.measure(tokens, sequences, args.max_batch_tokens))
            print(cells[-1].row(), flush=True)
        del bench
        if args.device == "cuda":
            torch.cuda.empty_cache()
    facts = machine(args.device, attention)
    settings = {"shape": asdict(shape), "model_dir": str(model_dir), "seconds": args.seconds,
                "max_batch_tokens": args.max_batch_tokens}
    text = markdown(facts, settings, cells)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(text)
    (args.out / f"{args.name}.json").write_text(json.dumps({
        "machine": facts, "settings": settings, "cells": [asdict(c) for c in cells],
        "published": [asdict(p) for p in PUBLISHED]}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
