"""The Encoder deployment through Serve where its token budget is set apart from the
gateway's config: a `deployments:` override of its `user_config` gives it a budget smaller
than the chunks the gateway sends, and a batch refuses any item over its budget, so the
Encoder queues such a chunk in pieces."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from serve_app.config import AppConfig, EmbeddingModelConfig
from tests.integration.conftest import delete_app

pytestmark = pytest.mark.integration

PREFIX = "/small-batches"
EMBED = "serve-app-demo-embed"
ENCODER_BUDGET = 256


@pytest.fixture(scope="module")
def gateway(serve_graph: Any) -> Iterator[str]:
    from ray import serve

    from serve_app.deployments import encoder_deployment_name, gateway_graph

    config = AppConfig(embedding_models=[EmbeddingModelConfig()])
    encoder = encoder_deployment_name(EMBED)
    override = {"user_config": {"max_batch_tokens": ENCODER_BUDGET,
                                "batch_wait_timeout_s": 0.005}}
    serve.run(gateway_graph(config, {encoder: override}), name="small-batches",
              route_prefix=PREFIX)
    try:
        yield f"{serve_graph.base_url}{PREFIX}"
    finally:
        delete_app("small-batches")


def test_a_chunk_over_the_encoders_budget_is_encoded_in_pieces(
    gateway: str, sentence_transformer: Any,
) -> None:
    texts = [f"{i} " + "paris tokyo rome " * 30 for i in range(100)]  # ~95 tokens each
    response = httpx.post(f"{gateway}/v1/embeddings", timeout=120, json={
        "model": EMBED, "input": texts, "encoding_format": "float"})
    assert response.status_code == 200, response.text[:300]
    got = np.asarray([item["embedding"] for item in response.json()["data"]],
                     dtype=np.float32)
    assert np.allclose(got, sentence_transformer.encode(texts), atol=1e-5)
