"""Cohere's `int8` and `uint8` embeddings: each model's calibration (its texts, the vectors
the gateway makes of them, cached beside the model cache) and the quantization itself.

The values equal sentence-transformers' `quantize_embeddings(rows, precision, ranges=...)`
with `ranges` the per-dimension minimum and maximum of the calibration vectors, shaped as
the request's vectors are (Matryoshka-truncated, then normalised when the model
normalises): so the ranges are per dimension count, and a query and a document quantize
onto one scale, whatever their `input_type`.

Calibration is bounded and off the request path: the texts are capped at start (file size
and count), the vectors are computed in the background from the gateway's start with the
Encoder calls any request makes (a few at a time, so other requests' calls are served
between them), and a cache file is used only when its digest, shape and values check out.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
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

logger = logging.getLogger(__name__)

Precision = Literal["int8", "uint8"]

CALIBRATION_MAX_TEXTS = 1000
"""Calibration texts per model: enough for stable ranges, few enough that their vectors
cost the Encoder at most this many inputs of the model's limit."""
CALIBRATION_MAX_BYTES = 4 << 20
"""Largest `calibration_file`: 1000 passages of 4 KB. Each text is cut to what the model's
limit may cover before it is tokenized, so tokenizing them costs seconds at most."""

_CACHE_VERSION = 2  # bump when what the cache file holds changes

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
    """One model's calibration texts, the file its calibration vectors are kept in (None:
    kept in memory only), and what a kept file must match: the digest of everything the
    vectors depend on, and their width."""

    texts: tuple[str, ...] = BUILTIN_TEXTS
    cache_file: Path | None = None
    digest: str = ""
    hidden_size: int = 0


def read_calibration_texts(path: str | None) -> tuple[str, ...]:
    """The non-blank lines of `path`, or the built-in sample. A file that cannot be read,
    is over CALIBRATION_MAX_BYTES, or holds fewer than 2 or more than
    CALIBRATION_MAX_TEXTS texts stops the start, naming the field."""
    if path is None:
        return BUILTIN_TEXTS
    field = "embedding_models[].calibration_file"
    try:
        with Path(path).expanduser().open("rb") as file:
            raw = file.read(CALIBRATION_MAX_BYTES + 1)  # never more, whatever the file is
        if len(raw) > CALIBRATION_MAX_BYTES:
            raise ValueError(f"{field} is over {CALIBRATION_MAX_BYTES} bytes; give at most "
                             f"{CALIBRATION_MAX_TEXTS} texts in at most that much")
        # Lines as a file opened in text mode splits them (at \n, \r\n or \r).
        lines = io.StringIO(raw.decode("utf-8"), newline=None).read().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{field} cannot be read ({type(exc).__name__})") from None
    texts = tuple(line for line in lines if line.strip())
    if len(texts) > CALIBRATION_MAX_TEXTS:
        raise ValueError(f"{field} has {len(texts)} non-blank lines; at most "
                         f"{CALIBRATION_MAX_TEXTS} are accepted")
    if len(texts) < 2:  # one vector's minimum is its maximum: no range to quantize over
        raise ValueError(f"{field} needs at least 2 non-blank lines")
    return texts


def calibration_for(config: EmbeddingModelConfig, model_dir: Path,
                    spec: SentenceSpec) -> Calibration:
    """The model's calibration, its cache file named by the digest of everything its
    vectors depend on: the checkpoint's files (path, sizes, modification times), the spec,
    the dtype, the texts. A new checkpoint or calibration file is calibrated afresh."""
    texts = read_calibration_texts(config.calibration_file)
    files = sorted((str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in model_dir.rglob("*") if p.is_file())
    identity = json.dumps({
        "version": _CACHE_VERSION, "model": config.name, "dir": str(model_dir.resolve()),
        "files": files, "spec": asdict(spec), "dtype": config.dtype,
        "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
    }, sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", config.name)
    return Calibration(texts, envs.cache_dir() / "calibration" / f"{name}-{digest[:16]}.npz",
                       digest, spec.hidden_size)


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


def read_cache(calibration: Calibration) -> torch.Tensor | None:
    """The kept vectors, if the file holds exactly what this calibration makes: its
    digest, one finite float32 row of the model's width per text. Anything else (torn,
    foreign, stale, corrupted) is None: calibrate again and replace it."""
    path = calibration.cache_file
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as kept:
            if set(kept.files) != {"vectors", "digest"}:
                return None
            digest, vectors = str(kept["digest"]), kept["vectors"]
    except (OSError, ValueError, EOFError):  # zipfile.BadZipFile is an OSError
        return None
    shape = (len(calibration.texts), calibration.hidden_size)
    if (digest != calibration.digest or vectors.dtype != np.float32 or vectors.shape != shape
            or not np.isfinite(vectors).all()):
        logger.warning("calibration cache %s does not match its model; calibrating again",
                       path.name)
        return None
    return torch.from_numpy(vectors)


def write_cache(calibration: Calibration, vectors: torch.Tensor) -> None:
    """Written to a private name, then renamed: replicas calibrating at once never read
    half a file."""
    path = calibration.cache_file
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with partial.open("wb") as out:
        np.savez(out, vectors=vectors.numpy().astype(np.float32),
                 digest=np.array(calibration.digest))
    os.replace(partial, path)


Embed = Callable[[Sequence[str]], Awaitable[torch.Tensor]]
"""The gateway's own vectors for texts: tokenized and encoded as a request's are."""
Shape = Callable[[torch.Tensor], npt.NDArray[np.float32]]
"""The request's shaping of vectors (Matryoshka size, normalisation) into float32 rows."""


async def _calibration_vectors(calibration: Calibration, embed: Embed) -> torch.Tensor:
    vectors = await asyncio.to_thread(read_cache, calibration)
    if vectors is None:
        vectors = await embed(calibration.texts)
        await asyncio.to_thread(write_cache, calibration, vectors)
    return vectors


class CalibrationCache:
    """Each model's calibration vectors, one computation per model however many requests
    wait for it, started in the background (`start`, at the gateway's start; a request
    that finds none started starts it), and their ranges per shape. A failed computation
    is tried again by the next request that needs it."""

    def __init__(self) -> None:
        self._vectors: dict[str, asyncio.Future[torch.Tensor]] = {}
        self._ranges: dict[tuple[str, int | None], npt.NDArray[np.float32]] = {}

    def start(self, model: str, calibration: Calibration,
              embed: Embed) -> asyncio.Future[torch.Tensor]:
        """`model`'s calibration vectors, computing (or read back) in the background."""
        running = self._vectors.get(model)
        if running is None or (running.done() and (running.cancelled()
                                                   or running.exception() is not None)):
            running = asyncio.ensure_future(_calibration_vectors(calibration, embed))
            running.add_done_callback(lambda done: _log_failure(model, done))
            self._vectors[model] = running
        return running

    async def ranges(self, model: str, calibration: Calibration, embed: Embed, shape: Shape,
                     size: int | None) -> npt.NDArray[np.float32]:
        """The ranges for `model`'s vectors of `size` dimensions (None: all)."""
        key = (model, size)
        if key not in self._ranges:
            # Shielded: a request that goes away does not cancel what others wait for.
            vectors = await asyncio.shield(self.start(model, calibration, embed))
            self._ranges[key] = quantization_ranges(shape(vectors))
        return self._ranges[key]


def _log_failure(model: str, done: asyncio.Future[torch.Tensor]) -> None:
    if not done.cancelled() and done.exception() is not None:
        logger.warning("calibration of %s failed (%s); its next int8 / uint8 request tries "
                       "again", model, type(done.exception()).__name__)
