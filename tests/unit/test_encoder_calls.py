"""Encoder work in bounded calls: a request's inputs go to the Encoder in chunks of one
batch's tokens, a few calls at a time, so a request within `limits.max_items` cannot flood
the Encoder's queue, and other requests' calls are served between its own."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from serve_app.api.embeddings import EmbeddingsService
from serve_app.config import AppConfig, EmbeddingModelConfig, LimitsConfig
from serve_app.sentence.encoder import EncoderCore, chunks
from serve_app.sentence.service import ENCODER_CALLS_PER_REQUEST, SentenceService
from tests.unit.conftest import UPSTREAM

EMBED = "serve-app-demo-embed"
TEXT_640 = ("paris tokyo rome " * 38)[:640]
"""640 characters that fit the demo encoder's 128 tokens (words of its vocabulary)."""
MAX_ITEMS = LimitsConfig().max_items


class OneReplica:
    """An Encoder replica as Serve runs one: calls wait in arrival order and one runs at a
    time. Records each call's chunk and how many calls it had in flight."""

    def __init__(self, core: EncoderCore) -> None:
        self.core = core
        self.turn = asyncio.Lock()  # asyncio's lock wakes its waiters in arrival order
        self.chunks: list[list[list[int]]] = []
        """Each call's chunk, in the order the calls ran."""
        self.in_flight = 0
        self.most_in_flight = 0

    async def encode(self, model: str, chunk: list[list[int]]) -> torch.Tensor:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            async with self.turn:
                self.chunks.append(chunk)
                return (await asyncio.to_thread(self.core.encode, [chunk]))[0]
        finally:
            self.in_flight -= 1


@pytest.fixture(scope="module")
def core(demo_encoder_dir: Path) -> EncoderCore:
    return EncoderCore.from_checkpoint(demo_encoder_dir, EmbeddingModelConfig())


def service(core: EncoderCore) -> tuple[SentenceService, OneReplica]:
    replica = OneReplica(core)
    config = AppConfig(upstream=UPSTREAM, embedding_models=[EmbeddingModelConfig()])
    return SentenceService.from_config(config, replica), replica


def body(texts: list[str]) -> bytes:
    return orjson.dumps({"model": EMBED, "input": texts, "encoding_format": "float"})


def test_chunks_keep_order_and_their_token_budget() -> None:
    sequences = [[i] * (1 + i % 7) for i in range(100)]
    packed = chunks(sequences, 10)
    assert [s for chunk in packed for s in chunk] == sequences
    assert all(sum(map(len, chunk)) <= 10 for chunk in packed)
    assert all(sum(map(len, a)) + len(b[0]) > 10  # each chunk as full as the next allows
               for a, b in zip(packed, packed[1:], strict=False))
    assert chunks([[1] * 30, [2]], 10) == [[[1] * 30], [[2]]]  # too long: alone


async def test_a_max_items_request_keeps_a_few_full_calls_in_flight(
    core: EncoderCore, sentence_transformer: Any,
) -> None:
    sentences, replica = service(core)
    texts = [f"{i} {TEXT_640}"[:640] for i in range(MAX_ITEMS)]
    response = await EmbeddingsService(sentences).create_embedding(body(texts))
    assert response.status_code == 200, response.body
    assert replica.most_in_flight <= ENCODER_CALLS_PER_REQUEST
    budget = sentences.models[EMBED].chunk_tokens
    sizes = [sum(map(len, chunk)) for chunk in replica.chunks]
    assert max(sizes) <= budget
    assert len(sizes) <= sum(sizes) // budget + 2  # packed full, not one call per input
    rows = np.asarray([item["embedding"] for item in orjson.loads(response.body)["data"]],
                      dtype=np.float32)
    picks = [0, 1, 777, MAX_ITEMS - 1]  # in input order
    expected = sentence_transformer.encode([texts[i] for i in picks])
    assert np.allclose(rows[picks], expected, atol=1e-5)


async def test_a_small_request_waits_for_a_few_calls_of_a_large_one_not_all(
    core: EncoderCore,
) -> None:
    sentences, replica = service(core)
    embeddings = EmbeddingsService(sentences)
    large = asyncio.ensure_future(embeddings.create_embedding(body([TEXT_640] * MAX_ITEMS)))
    while not replica.chunks:  # the large request's calls are in the replica's queue
        await asyncio.sleep(0.001)
    started = len(replica.chunks)
    small = await embeddings.create_embedding(body(["paris"]))
    assert small.status_code == 200
    [position] = [i for i, chunk in enumerate(replica.chunks) if len(chunk[0]) < 10]
    assert position - started <= ENCODER_CALLS_PER_REQUEST
    assert not large.done()  # it was served between the large request's calls
    assert (await large).status_code == 200
