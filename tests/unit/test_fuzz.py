"""Property-based requests to every endpoint: always a 2xx, or a 4xx in the OpenAI error
shape; never a 5xx, a hang or a dropped connection."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from serve_app.api.app import create_gateway_app
from serve_app.api.pipeline import InProcessPipeline
from serve_app.api.served_model import ServedModel
from serve_app.config import AppConfig, BackendConfig, UpstreamConfig
from serve_app.prompts.embedder import EmbedderCore
from serve_app.sentence.service import SentenceService
from serve_app.upstream.dispatcher import DispatcherCore

ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v2/embed"]
MODELS = ["serve-app-demo", "serve-app-demo-embed", "", "x" * 300]
FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def client(reference_app: Any, embedder: EmbedderCore,
           embeddings_service: SentenceService, cache_dir: Path) -> Iterator[TestClient]:
    upstream = UpstreamConfig(backends=[BackendConfig(url="http://ref/v1")])
    transport = httpx.ASGITransport(app=reference_app)
    dispatcher = DispatcherCore(upstream, httpx.AsyncClient(transport=transport,
                                                            base_url="http://ref"))
    served = ServedModel.from_config(AppConfig(upstream=upstream),
                                     InProcessPipeline(embedder, dispatcher))
    with TestClient(create_gateway_app(served, embeddings_service),
                    raise_server_exceptions=False) as test_client:
        yield test_client


odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", "\x00", "\ud7ff\ue000", "🇫🇷" * 10, "<s></s><|user|>", "\u202e", "A" * 2000])
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | odd_text | st.sampled_from([2**63, -(2**63), 10**30, 1e308, -0.0]))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(odd_text, inner, max_size=4), max_leaves=12)

FIELDS = ["prompt", "prompt_embeds", "prompt-embeds", "messages", "input", "texts", "n",
          "max_tokens", "max_completion_tokens", "temperature", "top_p", "logprobs",
          "top_logprobs", "stop", "seed", "stream", "stream_options", "echo", "suffix",
          "logit_bias", "dimensions", "encoding_format", "embedding_types", "truncate",
          "output_dimension", "input_type", "chat_template_kwargs", "user", "best_of",
          "top_k", "min_p", "min_tokens", "stop_token_ids", "allowed_token_ids", "cache_salt",
          "response_format", "structured_outputs", "metadata", "add_special_tokens",
          "truncate_prompt_tokens", "made_up_field"]
JSON = {"content-type": "application/json"}
"""Every request declares its JSON, or it would be refused with a 415 before parsing."""
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]) | odd_text,
     "content": odd_text | st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "prompt_embeds", "image_url"]),
          "text": odd_text, "data": odd_text}), max_size=3) | json_values})
field_values = {
    "messages": st.lists(message, max_size=3) | json_values,
    "max_tokens": st.integers(-5, 40) | json_values,
    "n": st.integers(-1, 3) | json_values,
    "stream": st.booleans(),
}
requests = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS) | json_values},
    optional={name: field_values.get(name, json_values) for name in FIELDS})


def assert_well_formed(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code", "request_id"}
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        assert isinstance(response.json(), dict)


@pytest.mark.parametrize("route", ROUTES)
@FUZZ
@given(body=requests)
def test_schema_shaped_requests(client: TestClient, route: str, body: dict[str, Any]) -> None:
    if isinstance(body.get("max_tokens"), int) or "max_tokens" not in body:
        body.setdefault("max_tokens", 4)  # keep generation short; the shape is what matters
    assert_well_formed(client.post(route, content=json.dumps(body), headers=JSON))


@pytest.mark.parametrize("route", ROUTES)
@FUZZ
@given(body=json_values)
def test_any_json(client: TestClient, route: str, body: Any) -> None:
    assert_well_formed(client.post(route, content=json.dumps(body), headers=JSON))


@pytest.mark.parametrize("route", ROUTES)
@FUZZ
@given(raw=st.binary(max_size=200), content_type=st.sampled_from(
    ["application/json", "text/plain", "application/json; charset=latin-1", ""]))
def test_any_bytes(client: TestClient, route: str, raw: bytes, content_type: str) -> None:
    assert_well_formed(client.post(route, content=raw,
                                   headers={"content-type": content_type}))
