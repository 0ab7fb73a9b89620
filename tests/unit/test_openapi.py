"""`/openapi.json` documents every endpoint: request bodies, answers and the error shape."""

from __future__ import annotations

from typing import Any

import httpx

ENDPOINTS = {
    "/v1/completions": "CompletionRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/embeddings": "EmbeddingRequest",
    "/v2/embed": "CohereEmbedRequest",
}


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


async def test_every_endpoint_is_documented(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    components = schema["components"]["schemas"]
    for path, model in ENDPOINTS.items():
        post = schema["paths"][path]["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert {"200", "4XX", "5XX"} <= set(post["responses"])
    assert {"/health", "/v1/models"} <= set(schema["paths"])
    # Every reference resolves inside the document.
    for ref in refs(schema):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[-1] in components, ref
    completion = components["CompletionRequest"]["properties"]
    assert "prompt_embeds" in completion and completion["prompt_embeds"]["description"]
    assert "messages" in components["ChatCompletionRequest"]["properties"]
    assert set(components["ErrorInfo"]["properties"]) == {"message", "type", "param", "code",
                                                          "request_id"}
