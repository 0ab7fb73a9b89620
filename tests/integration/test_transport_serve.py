"""The payload's one crossing in the real Serve graph: the Dispatcher asks the Embedder for
a request's embeddings, which come back through Ray's object store and are read in place.
The exact embeddings must reach the upstream for short and long prompts, streamed or not,
and for a request whose payload is beyond gRPC's 4 MiB message limit, in both of Serve's
modes (`.ci/check` runs this tier again throughput-optimized)."""

from __future__ import annotations

import io

import orjson
import pybase64
import pytest
import torch

from serve_app.prompts.codec import encode_prompt_embeds

pytestmark = pytest.mark.integration

SHORT = "Tell me about France"
LONG = "Tell me about France, its rivers and its towns. " * 6


def _upstream_tensor(data: str) -> torch.Tensor:
    raw = pybase64.b64decode(data, validate=True)
    tensor: torch.Tensor = torch.load(io.BytesIO(raw), weights_only=True)
    return tensor


@pytest.mark.parametrize("prompt", [SHORT, LONG])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_gets_the_prompts_exact_embeddings(  # type: ignore[no-untyped-def]
    client, serve_graph, demo_tokenizer, demo_causal_lm, prompt, stream
) -> None:
    ids = demo_tokenizer(prompt).input_ids
    before = len(serve_graph.proxy.bodies)
    response = client.completions.create(model=serve_graph.model, prompt=prompt, max_tokens=8,
                                         temperature=0, stream=stream)
    text = ("".join(c.choices[0].text for c in response if c.choices) if stream
            else response.choices[0].text)
    assert text

    [body] = serve_graph.proxy.bodies[before:]
    with torch.no_grad():
        expected = demo_causal_lm.get_input_embeddings()(torch.tensor(ids))
    torch.testing.assert_close(_upstream_tensor(orjson.loads(body)["prompt_embeds"]), expected,
                               rtol=0, atol=0)


def test_a_payload_over_grpcs_message_limit_goes_whole(  # type: ignore[no-untyped-def]
    client, serve_graph, demo_tokenizer, demo_causal_lm
) -> None:
    """Many long prompts: one Embedder call, one upstream body of more than 4 MiB, every
    prompt's rows there in order. Serve's gRPC channel would refuse the Embedder's answer,
    so it must come through the object store whatever Serve's default transport."""
    prompts = [f"{index} {LONG}" for index in range(64)]
    before = len(serve_graph.proxy.bodies)
    response = client.completions.create(model=serve_graph.model, prompt=prompts,
                                         max_tokens=1, temperature=0)
    assert sorted(choice.index for choice in response.choices) == list(range(64))
    [body] = serve_graph.proxy.bodies[before:]
    assert len(body) > 4 * 1024 * 1024
    sent = orjson.loads(body)["prompt_embeds"]
    embedding = demo_causal_lm.get_input_embeddings()
    with torch.no_grad():
        for prompt, data in zip(prompts, sent, strict=True):
            expected = embedding(torch.tensor(demo_tokenizer(prompt).input_ids))
            torch.testing.assert_close(_upstream_tensor(data), expected, rtol=0, atol=0)


def test_the_object_store_hands_encoded_embeds_over_in_place(serve_graph) -> None:  # type: ignore[no-untyped-def]
    """What the one crossing rests on: Ray stores the encoded embeddings' buffers out of
    band and the reader gets read-only views of the store's memory, not copies as bytes."""
    import ray

    encoded = encode_prompt_embeds(torch.randn(4096, 64))
    received = ray.get(ray.put(encoded))
    assert received.data == encoded.data
    assert all(isinstance(part, memoryview) and part.readonly for part in received.buffers)
