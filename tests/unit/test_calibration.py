"""int8 / uint8 calibration off the request path: its input capped at start, its vectors
computed in the background from the gateway's start in calls that other requests' calls
pass between, and its cache file used only when it checks out."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson
import pytest
import torch
from starlette.testclient import TestClient

from serve_app.api.app import create_gateway_app
from serve_app.api.cohere import CohereEmbedService
from serve_app.api.pipeline import InProcessPipeline
from serve_app.api.served_model import ServedModel
from serve_app.config import AppConfig, EmbeddingModelConfig
from serve_app.prompts.embedder import EmbedderCore
from serve_app.sentence.encoder import EncoderCore
from serve_app.sentence.quantize import (
    BUILTIN_TEXTS,
    CALIBRATION_MAX_BYTES,
    CALIBRATION_MAX_TEXTS,
    Calibration,
    read_cache,
    read_calibration_texts,
    write_cache,
)
from serve_app.sentence.service import ENCODER_CALLS_PER_REQUEST, SentenceService
from serve_app.upstream.dispatcher import DispatcherCore
from tests.unit.conftest import UPSTREAM

EMBED = "serve-app-demo-embed"
LONG_TEXTS = [f"{i} " + "paris tokyo rome " * 36 for i in range(CALIBRATION_MAX_TEXTS)]
"""A full calibration file: 1000 texts of about 115 tokens, 15 Encoder calls' worth."""


class OneReplica:
    """An Encoder replica as Serve runs one: calls wait in arrival order, one runs at a
    time. Keeps each call's chunk in the order the calls ran."""

    def __init__(self, core: EncoderCore) -> None:
        self.core = core
        self.turn = asyncio.Lock()  # asyncio's lock wakes its waiters in arrival order
        self.chunks: list[list[list[int]]] = []

    @property
    def sequences(self) -> int:
        return sum(map(len, self.chunks))

    async def encode(self, model: str, chunk: list[list[int]]) -> torch.Tensor:
        async with self.turn:
            self.chunks.append(chunk)
            return (await asyncio.to_thread(self.core.encode, [chunk]))[0]


@pytest.fixture(scope="module")
def core(demo_encoder_dir: Path) -> EncoderCore:
    return EncoderCore.from_checkpoint(demo_encoder_dir, EmbeddingModelConfig())


def service(core: EncoderCore, calibration_file: Path | None = None) -> tuple[
        SentenceService, OneReplica]:
    replica = OneReplica(core)
    model = EmbeddingModelConfig(calibration_file=str(calibration_file)
                                 if calibration_file else None)
    config = AppConfig(upstream=UPSTREAM, embedding_models=[model])
    return SentenceService.from_config(config, replica), replica


def cohere(texts: list[str], *types: str) -> bytes:
    return orjson.dumps({"model": EMBED, "texts": texts, "embedding_types": list(types)})


def int8_of(response: object) -> list[list[int]]:
    body = orjson.loads(response.body)  # type: ignore[attr-defined]
    return body["embeddings"]["int8"]  # type: ignore[no-any-return]


# ------------------------------------------------------------------ bounded at start


def test_an_over_size_calibration_file_is_refused_at_start(
    tmp_path: Path, core: EncoderCore,
) -> None:
    big = tmp_path / "big.txt"
    line = "paris tokyo rome " * 1000 + "\n"  # 17 KB a line: 1000 lines are 17 MB
    big.write_text(line * (CALIBRATION_MAX_BYTES // len(line) + 1))
    with pytest.raises(ValueError, match=r"calibration_file is over 4194304 bytes"):
        read_calibration_texts(str(big))
    with pytest.raises(ValueError, match=r"embedding_models\[\]\.calibration_file"):
        service(core, big)
    many = tmp_path / "many.txt"
    many.write_text("".join(f"text {i}\n\n" for i in range(CALIBRATION_MAX_TEXTS + 1)))
    with pytest.raises(ValueError, match=r"calibration_file has 1001 non-blank lines"):
        read_calibration_texts(str(many))
    many.write_text("".join(f"text {i}\r\n\n" for i in range(CALIBRATION_MAX_TEXTS)))
    texts = read_calibration_texts(str(many))
    assert len(texts) == CALIBRATION_MAX_TEXTS and texts[-1] == "text 999"


# ------------------------------------------------------------------ the cache


@pytest.mark.parametrize("bad", ["wrong width", "NaN rows", "wrong digest", "not a zip"])
async def test_a_bad_cache_file_is_calibrated_again_and_replaced(
    core: EncoderCore, bad: str,
) -> None:
    fresh, _ = service(core)
    calibration = fresh.models[EMBED].calibration
    assert calibration.cache_file is not None
    calibration.cache_file.unlink(missing_ok=True)
    expected = int8_of(await CohereEmbedService(fresh).embed(cohere(["paris"], "int8")))
    good = read_cache(calibration)
    assert good is not None and good.shape == (len(BUILTIN_TEXTS), 32)

    if bad == "wrong width":
        write_cache(calibration, good[:, :-1])
    elif bad == "NaN rows":
        write_cache(calibration, good.clone().index_fill_(0, torch.tensor([3]), float("nan")))
    elif bad == "wrong digest":  # the vectors of other texts, say, under this file's name
        write_cache(Calibration(calibration.texts, calibration.cache_file, "0" * 64,
                           calibration.hidden_size), good)
    else:
        calibration.cache_file.write_bytes(b"torn")
    assert read_cache(calibration) is None

    second, replica = service(core)
    assert int8_of(await CohereEmbedService(second).embed(cohere(["paris"], "int8"))) == expected
    assert replica.sequences == len(BUILTIN_TEXTS) + 1  # calibrated again, then the input
    replaced = read_cache(calibration)
    assert replaced is not None and torch.equal(replaced, good)
    third, replica = service(core)
    assert int8_of(await CohereEmbedService(third).embed(cohere(["paris"], "int8"))) == expected
    assert replica.sequences == 1  # the replaced file is read back


# ------------------------------------------------------------------ off the request path


async def test_a_float_request_is_not_held_up_by_calibration(
    core: EncoderCore, tmp_path: Path,
) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(LONG_TEXTS) + "\n")
    sentences, replica = service(core, texts)
    embed = CohereEmbedService(sentences).embed
    quantized = asyncio.ensure_future(embed(cohere(["paris"], "int8")))
    while not any(len(chunk[0]) > 10 for chunk in replica.chunks):  # calibration's
        await asyncio.sleep(0.001)  # calls are in the replica's queue, and one has run
    started = len(replica.chunks)
    floats = await embed(cohere(["rome"], "float"))
    assert floats.status_code == 200
    rome = list(sentences.models[EMBED].tokenizer("rome").input_ids)
    [position] = [i for i, chunk in enumerate(replica.chunks) if chunk == [rome]]
    assert position - started <= ENCODER_CALLS_PER_REQUEST
    assert not quantized.done()  # calibration goes on after the float request is answered
    assert (await quantized).status_code == 200


def test_calibration_starts_with_the_gateway(
    core: EncoderCore, embedder: EmbedderCore, tmp_path: Path,
) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(LONG_TEXTS[:50]) + "\n")
    sentences, replica = service(core, texts)
    config = AppConfig(upstream=UPSTREAM)
    served = ServedModel.from_config(
        config, InProcessPipeline(embedder, DispatcherCore(UPSTREAM, httpx.AsyncClient())))
    app = create_gateway_app(served, sentences)
    with TestClient(app):  # runs the app's start, as Serve does
        deadline = time.monotonic() + 60
        while replica.sequences < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert replica.sequences == 50  # calibrated before any request asked for it
