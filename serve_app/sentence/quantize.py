"""Cohere's `int8` and `uint8` embeddings: each model's calibration (its texts, the vectors
the gateway makes of them, cached beside the model cache) and the quantization itself.

The values equal sentence-transformers' `quantize_embeddings(rows, precision, ranges=...)`
with `ranges` the per-dimension minimum and maximum of the calibration vectors, shaped as
the request's vectors are (Matryoshka-truncated, then normalised when the model
normalises): so the ranges are per dimension count, and a query and a document quantize
onto one scale, whatever their `input_type`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from serve_app import envs
from serve_app.config import EmbeddingModelConfig
from serve_app.sentence.encoder import SentenceSpec

Precision = Literal["int8", "uint8"]

CALIBRATION_MAX_TEXTS = 1000
"""Calibration texts read per model: enough for stable ranges, few enough that computing
them stays a fraction of a second per 100 on a CPU (each text is cut to the model's limit)."""

_CACHE_VERSION = 1  # bump when what the cache file holds changes

_TOPICS = (
    "the capital of France", "photosynthesis in plants", "a recipe for tomato soup",
    "the history of the Roman Empire", "how vaccines train the immune system",
    "the rules of chess", "a bug in a Python web server", "interest rates and inflation",
    "the water cycle", "training a neural network", "the plot of Hamlet",
    "renting an apartment in Tokyo", "the migration of birds", "black holes",
    "a football match last night", "the symptoms of the flu",
)
_FRAMES = (
    "What is {}?", "Tell me about {}.", "{}: a short explanation for beginners.",
    "Here is a detailed article about {}, with examples and references.",
    "I have a question about {} that my teacher could not answer.",
    "Notes from a meeting: we discussed {} and agreed to follow up next week.",
    "A review: the book on {} was clear, though the last chapters felt rushed.",
    "search for documents about {}",
)
BUILTIN_TEXTS: tuple[str, ...] = tuple(frame.format(topic) for topic in _TOPICS
                                       for frame in _FRAMES)
"""The calibration sample without `calibration_file`: 128 texts over topics, lengths and
registers (questions, passages, notes, queries)."""


@dataclass(frozen=True)
class Calibration:
    """One model's calibration texts, and the file its calibration vectors are kept in
    (None: kept in memory only)."""

    texts: tuple[str, ...] = BUILTIN_TEXTS
    cache_file: Path | None = None


def read_calibration_texts(path: str | None) -> tuple[str, ...]:
    """The non-blank lines of `path` (the first `CALIBRATION_MAX_TEXTS`), or the built-in
    sample; an unreadable or too small file stops the start, naming the field."""
    if path is None:
        return BUILTIN_TEXTS
    texts: list[str] = []
    try:
        with Path(path).expanduser().open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    texts.append(line.rstrip("\r\n"))
                if len(texts) == CALIBRATION_MAX_TEXTS:
                    break
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"embedding_models[].calibration_file cannot be read "
                         f"({type(exc).__name__})") from None
    if len(texts) < 2:  # one vector's minimum is its maximum: no range to quantize over
        raise ValueError("embedding_models[].calibration_file needs at least 2 non-blank "
                         "lines")
    return tuple(texts)


def calibration_for(config: EmbeddingModelConfig, model_dir: Path,
                    spec: SentenceSpec) -> Calibration:
    """The model's calibration, its cache file named by everything its vectors depend on:
    the checkpoint's files (path, sizes, modification times), the spec, the dtype, the
    texts. A new checkpoint or calibration file is calibrated afresh."""
    texts = read_calibration_texts(config.calibration_file)
    files = sorted((str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in model_dir.rglob("*") if p.is_file())
    identity = json.dumps({
        "version": _CACHE_VERSION, "model": config.name, "dir": str(model_dir.resolve()),
        "files": files, "spec": asdict(spec), "dtype": config.dtype,
        "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
    }, sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", config.name)
    return Calibration(texts, envs.cache_dir() / "calibration" / f"{name}-{digest}.npy")


def quantization_ranges(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """`(2, dimensions)`: each dimension's minimum and maximum, as sentence-transformers
    computes them from calibration embeddings."""
    return np.vstack((rows.min(axis=0), rows.max(axis=0))).astype(np.float32)


def quantize(rows: npt.NDArray[np.float32], ranges: npt.NDArray[np.float32],
             precision: Precision) -> npt.NDArray[np.int8] | npt.NDArray[np.uint8]:
    """sentence-transformers' `quantize_embeddings` with `ranges`, step for step in
    float32: 255 equal steps from each dimension's minimum, floored and clipped to
    [0, 255]; int8 shifts by -128. A dimension without a range gets a step of 1."""
    starts = ranges[0, :]
    steps = (ranges[1, :] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((rows - starts) / steps), 0, 255)
    if precision == "uint8":
        return buckets.astype(np.uint8)
    return (buckets - 128).astype(np.int8)


def _load(path: Path | None) -> torch.Tensor | None:
    if path is None or not path.is_file():
        return None
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except (OSError, ValueError):
        return None  # a torn or foreign file: calibrate again and replace it


def _store(path: Path | None, vectors: torch.Tensor) -> None:
    """Written to a private name, then renamed: replicas calibrating at once never read
    half a file."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with partial.open("wb") as out:
        np.save(out, vectors.numpy(), allow_pickle=False)
    os.replace(partial, path)


Embed = Callable[[Sequence[str]], Awaitable[torch.Tensor]]
"""The gateway's own vectors for texts: tokenized and encoded as a request's are."""
Shape = Callable[[torch.Tensor], npt.NDArray[np.float32]]
"""The request's shaping of vectors (Matryoshka size, normalisation) into float32 rows."""


class CalibrationCache:
    """Each model's calibration vectors, read from its cache file or computed once (on its
    first int8 / uint8 request, one computation however many arrive at once), and their
    ranges per shape."""

    def __init__(self) -> None:
        self._vectors: dict[str, torch.Tensor] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ranges: dict[tuple[str, int | None], npt.NDArray[np.float32]] = {}

    async def ranges(self, model: str, calibration: Calibration, embed: Embed, shape: Shape,
                     size: int | None) -> npt.NDArray[np.float32]:
        """The ranges for `model`'s vectors of `size` dimensions (None: all)."""
        key = (model, size)
        if key not in self._ranges:
            vectors = await self._calibration_vectors(model, calibration, embed)
            self._ranges[key] = quantization_ranges(shape(vectors))
        return self._ranges[key]

    async def _calibration_vectors(self, model: str, calibration: Calibration,
                                   embed: Embed) -> torch.Tensor:
        async with self._locks.setdefault(model, asyncio.Lock()):
            if model not in self._vectors:
                vectors = await asyncio.to_thread(_load, calibration.cache_file)
                if vectors is None:
                    vectors = await embed(calibration.texts)
                    await asyncio.to_thread(_store, calibration.cache_file, vectors)
                self._vectors[model] = vectors
        return self._vectors[model]
